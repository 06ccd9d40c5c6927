"""ONNX export from the IR (not through torch.onnx): `export`, the op mappings, `OnnxExportError`."""

from luoshu.onnx.exporter import MIN_OPSET, export, to_onnx, unmapped_ops
from luoshu.onnx.mappings import MAPPINGS, OnnxExportError

__all__ = ["MAPPINGS", "MIN_OPSET", "OnnxExportError", "export", "to_onnx", "unmapped_ops"]
