"""Deployment: the model package for inference (`export`, `load`, `InferenceModel`, `TensorSpec`),
also from `luoshu.ctr` models (`export_ctr`, `export_ctr_files`); the Open Inference Protocol server
(`InferenceServer`, `ServerConfig`, `serve`); the hierarchical embedding store (`EmbeddingStore`,
`StoreConfig`, `StoreBackedModel`)."""

from luoshu.serving.ctr import export_ctr, export_ctr_files
from luoshu.serving.embedding_store import EmbeddingStore, ReadOnlyTierError, StoreConfig, StoreError
from luoshu.serving.package import InferenceModel, PackageError, TensorSpec, export, load, weight_rows
from luoshu.serving.protocol import RequestError
from luoshu.serving.server import InferenceServer, ServerConfig, ServerError, serve
from luoshu.serving.store_model import StoreBackedModel

__all__ = [
    "EmbeddingStore", "InferenceModel", "InferenceServer", "PackageError", "ReadOnlyTierError", "RequestError",
    "ServerConfig", "ServerError", "StoreBackedModel", "StoreConfig", "StoreError", "TensorSpec", "export",
    "export_ctr", "export_ctr_files", "load", "serve", "weight_rows",
]
