"""Deployment: the model package for inference (`export`, `load`, `InferenceModel`, `TensorSpec`),
also from `luoshu.ctr` models (`export_ctr`, `export_ctr_files`)."""

from luoshu.serving.ctr import export_ctr, export_ctr_files
from luoshu.serving.package import InferenceModel, PackageError, TensorSpec, export, load, weight_rows

__all__ = [
    "InferenceModel",
    "PackageError",
    "TensorSpec",
    "export",
    "export_ctr",
    "export_ctr_files",
    "load",
    "weight_rows",
]
