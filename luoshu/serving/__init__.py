"""Deployment: the model package for inference (`export`, `load`, `InferenceModel`, `TensorSpec`)."""

from luoshu.serving.package import InferenceModel, PackageError, TensorSpec, export, load

__all__ = ["InferenceModel", "PackageError", "TensorSpec", "export", "load"]
