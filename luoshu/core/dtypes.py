"""Dtype names and their mapping to torch dtypes; type promotion."""

from __future__ import annotations

import numpy as np
import torch

from luoshu.core.errors import DTypeError

_TO_TORCH: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_FROM_TORCH: dict[torch.dtype, str] = {v: k for k, v in _TO_TORCH.items()}
_ALIASES = {"float": "float32", "double": "float64", "half": "float16", "long": "int64", "int": "int64"}

FLOATING = frozenset({"float16", "bfloat16", "float32", "float64"})
INTEGER = frozenset({"int8", "int16", "int32", "int64", "uint8"})
DEFAULT_FLOAT = "float32"
DEFAULT_INT = "int64"


def dtype_name(dtype) -> str:
    """Normalises a dtype given as a name, torch dtype, NumPy dtype or Python type."""
    if isinstance(dtype, str):
        name = _ALIASES.get(dtype, dtype)
        if name in _TO_TORCH:
            return name
        raise DTypeError(f"unknown dtype {dtype!r}; expected one of {sorted(_TO_TORCH)}")
    if isinstance(dtype, torch.dtype):
        if dtype in _FROM_TORCH:
            return _FROM_TORCH[dtype]
        raise DTypeError(f"torch dtype {dtype} is not supported; expected one of {sorted(_TO_TORCH)}")
    if dtype is float:
        return DEFAULT_FLOAT
    if dtype is int:
        return DEFAULT_INT
    if dtype is bool:
        return "bool"
    try:
        return dtype_name(np.dtype(dtype).name)
    except TypeError as exc:
        raise DTypeError(f"cannot interpret {dtype!r} as a dtype") from exc


def to_torch(dtype) -> torch.dtype:
    return _TO_TORCH[dtype_name(dtype)]


def to_numpy(dtype: str) -> np.dtype:
    # NumPy has no bfloat16: values leave luoshu as float32.
    return np.dtype("float32" if dtype == "bfloat16" else dtype)


def is_floating(dtype: str) -> bool:
    return dtype in FLOATING


def is_integer(dtype: str) -> bool:
    return dtype in INTEGER


def promote(*dtypes: str) -> str:
    """Result dtype of combining tensors of these dtypes (torch's promotion lattice)."""
    result = _TO_TORCH[dtypes[0]]
    for d in dtypes[1:]:
        result = torch.promote_types(result, _TO_TORCH[d])
    return _FROM_TORCH[result]
