"""Files of `luoshu.ml`: the libsvm reader, and estimators saved as model packages (`save` / `load`).

A saved estimator is a checkpoint directory in luoshu's package format (DESIGN.md §6),
written and verified by `luoshu.checkpoint`: `graph.json` (format version; under
`metadata` the estimator's class name, its hyper-parameters and its fitted state as JSON,
where every array is a reference into the weights file), `weights.safetensors` (the
arrays) and `manifest.json` (each file's SHA-256 and size). Loading verifies the
manifest before it reads anything, rebuilds only classes `luoshu.ml` registered
(nothing the file names is imported) and uses no pickle.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from luoshu import checkpoint
from luoshu.core.errors import CheckpointError
from luoshu.ml.base import REGISTRY, DataError, Estimator

__all__ = ["load", "load_libsvm", "save"]

KIND = "luoshu.ml.estimator"
STATE_VERSION = 1


# ---------------------------------------------------------------- libsvm


def load_libsvm(
    path: str | os.PathLike, n_features: int | None = None, zero_based: bool | str = "auto", dtype=np.float64
) -> tuple[sp.csr_matrix, np.ndarray]:
    """Reads a libsvm / svmlight file: `label idx:value idx:value ...  # comment` per line.

    Returns `(X, y)` with X a CSR matrix. `zero_based="auto"` treats the indices as 1-based
    unless some index is 0 (as scikit-learn does); `n_features` widens X (a file whose
    largest index does not fit is refused). `qid:` fields are skipped. A malformed line
    raises `DataError` naming the file, the line number and the bad field.
    """
    path = Path(path)
    labels: list[float] = []
    indptr = [0]
    indices: list[int] = []
    values: list[float] = []
    try:
        f = open(path, encoding="utf-8")
    except OSError as exc:
        raise DataError(f"cannot open libsvm file {path}: {exc.strerror}") from None
    with f:
        for lineno, line in enumerate(f, start=1):
            body = line.split("#", 1)[0].strip()
            if not body:
                continue
            fields = body.split()
            try:
                labels.append(float(fields[0]))
            except ValueError:
                raise DataError(f"{path}:{lineno}: the label must be a number, found {fields[0]!r}") from None
            last = -1
            for field in fields[1:]:
                idx, sep, val = field.partition(":")
                if not sep:
                    raise DataError(f"{path}:{lineno}: expected index:value, found {field!r}")
                if idx == "qid":
                    continue
                try:
                    i, v = int(idx), float(val)
                except ValueError:
                    raise DataError(
                        f"{path}:{lineno}: expected an integer index and a number, found {field!r}"
                    ) from None
                if i < 0:
                    raise DataError(f"{path}:{lineno}: feature indices must be non-negative, found {i}")
                if i <= last:
                    raise DataError(
                        f"{path}:{lineno}: feature indices must increase along a line, found {i} after {last}"
                    )
                last = i
                indices.append(i)
                values.append(v)
            indptr.append(len(indices))
    if not labels:
        raise DataError(f"libsvm file {path} holds no samples")
    idx_arr = np.asarray(indices, dtype=np.int64)
    if zero_based == "auto":
        zero_based = bool(idx_arr.size) and int(idx_arr.min()) == 0
    if not zero_based:
        if idx_arr.size and idx_arr.min() == 0:
            raise DataError(f"{path}: zero_based=False, but the file uses feature index 0")
        idx_arr = idx_arr - 1
    width = int(idx_arr.max()) + 1 if idx_arr.size else 0
    if n_features is not None:
        if n_features < width:
            raise DataError(
                f"{path}: n_features={n_features}, but the file has feature index {width - 1} "
                f"({'0' if zero_based else '1'}-based)"
            )
        width = n_features
    X = sp.csr_matrix(
        (np.asarray(values, dtype=dtype), idx_arr, np.asarray(indptr, dtype=np.int64)), shape=(len(labels), width)
    )
    return X, np.asarray(labels, dtype=np.float64)


# ---------------------------------------------------------------- model packages


class _Arrays:
    """Collects the arrays of a fitted state under stable names while it is encoded as JSON."""

    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}

    def add(self, array: np.ndarray) -> str:
        name = f"a{len(self.tensors)}"
        self.tensors[name] = torch.from_numpy(np.ascontiguousarray(array).copy())
        return name


def _encode(value, arrays: _Arrays, where: str):
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return {"__float__": repr(float(value))}  # repr keeps nan/inf and every bit
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "biuf":
            return {"__array__": arrays.add(value)}
        if value.dtype.kind in "OU" and all(isinstance(v, (str, int, float, np.generic)) for v in value.ravel()):
            return {
                "__list_array__": [_encode(v, arrays, where) for v in value.ravel().tolist()],
                "shape": list(value.shape),
                "dtype": "object" if value.dtype.kind == "O" else str(value.dtype),
            }
    if isinstance(value, (list, tuple)):
        return {"__list__" if isinstance(value, list) else "__tuple__": [_encode(v, arrays, where) for v in value]}
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"__dict__": {k: _encode(v, arrays, f"{where}.{k}") for k, v in value.items()}}
    raise CheckpointError(f"cannot save {where}: values of type {type(value).__name__} have no file format")


def _decode(value, tensors: dict, where: str):
    if not isinstance(value, dict):
        return value
    if "__float__" in value:
        return float(value["__float__"])
    if "__array__" in value:
        name = value["__array__"]
        if name not in tensors:
            raise CheckpointError(f"model file: {where} refers to array {name!r}, which the weights file lacks")
        return tensors[name].numpy()
    if "__list_array__" in value:
        items = [_decode(v, tensors, where) for v in value["__list_array__"]]
        arr = (
            np.empty(len(items), dtype=object)
            if value["dtype"] == "object"
            else np.asarray(items, dtype=value["dtype"])
        )
        if value["dtype"] == "object":
            arr[:] = items
        return arr.reshape(value["shape"])
    if "__list__" in value:
        return [_decode(v, tensors, where) for v in value["__list__"]]
    if "__tuple__" in value:
        return tuple(_decode(v, tensors, where) for v in value["__tuple__"])
    if "__dict__" in value:
        return {k: _decode(v, tensors, f"{where}.{k}") for k, v in value["__dict__"].items()}
    raise CheckpointError(f"model file: {where} holds an unknown value {str(value)[:80]}")


class _StoredArray:
    """What `luoshu.checkpoint.save` expects of a state entry: a value, a shape and a dtype name."""

    def __init__(self, value: torch.Tensor):
        self.value, self.shape, self.dtype = value, tuple(value.shape), str(value.dtype).removeprefix("torch.")


class _EstimatorState:
    """Presents an estimator's arrays to `luoshu.checkpoint.save` as a module's state dict."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self._tensors = tensors

    def state_dict(self) -> dict:
        return {k: _StoredArray(v) for k, v in self._tensors.items()}


def save(estimator: Estimator, path: str | os.PathLike) -> Path:
    """Saves a fitted `luoshu.ml` estimator as a model package directory (replaced only once complete)."""
    if not isinstance(estimator, Estimator):
        raise CheckpointError(f"luoshu.ml.save: expected a luoshu.ml estimator, found {type(estimator).__name__}")
    name = type(estimator).__name__
    estimator._check_fitted("n_features_in_")
    state = estimator._fitted_state()
    arrays = _Arrays()
    params = _encode(estimator.get_params(deep=False), arrays, f"{name} parameters")
    fitted = _encode(state, arrays, f"{name} fitted state")
    metadata = {"kind": KIND, "state_version": STATE_VERSION, "estimator": name, "params": params, "state": fitted}
    return checkpoint.save(path, _EstimatorState(arrays.tensors), metadata=metadata)


def load(path: str | os.PathLike) -> Estimator:
    """Loads an estimator saved by `save` (or `estimator.save`); refuses a corrupt or foreign file."""
    path = Path(path)
    graph = checkpoint.verify(path)
    meta = graph.get("metadata") or {}
    if meta.get("kind") != KIND or meta.get("state_version") != STATE_VERSION:
        raise CheckpointError(
            f"{path}: not a luoshu.ml model (expected kind {KIND!r} version {STATE_VERSION}, "
            f"found {meta.get('kind')!r} version {meta.get('state_version')!r})"
        )
    cls = REGISTRY.get(meta.get("estimator"))
    if cls is None:
        raise CheckpointError(
            f"{path}: unknown estimator {meta.get('estimator')!r}; luoshu.ml knows {sorted(REGISTRY)}"
        )
    try:
        tensors = load_file(path / "weights.safetensors")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path / 'weights.safetensors'} cannot be read: {exc}") from None
    params = _decode(meta.get("params"), tensors, "parameters")
    state = _decode(meta.get("state"), tensors, "fitted state")
    try:
        estimator = cls(**params)
    except TypeError as exc:
        raise CheckpointError(f"{path}: the saved parameters do not fit {cls.__name__}: {exc}") from None
    estimator._restore_state(state)
    return estimator
