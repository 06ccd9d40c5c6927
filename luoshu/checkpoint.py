"""Checkpoints in luoshu's package format (DESIGN.md §6).

A checkpoint is a directory:
  graph.json            format version, the module's class and its tensors' metas
  weights.safetensors   parameters and buffers by dotted name
  optimizer.json        optimizer hyperparameters and step counts (optional)
  optimizer.safetensors optimizer state tensors (optional)
  manifest.json         SHA-256 and size of every file above

`save` writes a new directory beside the target and swaps it in only when complete,
so a failed save never destroys the previous checkpoint. `load` verifies the manifest,
the format version and every name, shape and dtype before it changes anything. No
pickle is involved anywhere.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from luoshu.core.digest import file_sha256
from luoshu.core.errors import CheckpointError

FORMAT = "luoshu-package"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True))


def _tensors_for_disk(tensors: dict) -> dict[str, torch.Tensor]:
    return {name: (t.value if hasattr(t, "value") else t).detach().cpu().contiguous().clone()
            for name, t in tensors.items()}


def save(path, module, optimizer=None, metadata: dict | None = None) -> Path:
    """Saves `module` (and `optimizer`) as a checkpoint directory at `path`."""

    def write(staging: Path) -> None:
        state = module.state_dict()
        save_file(_tensors_for_disk(state), staging / "weights.safetensors")
        graph = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "module": {
                "class": f"{type(module).__module__}.{type(module).__qualname__}",
                "tensors": {name: {"shape": list(t.shape), "dtype": t.dtype} for name, t in state.items()},
            },
            "metadata": metadata or {},
        }
        _write_json(staging / "graph.json", graph)
        if optimizer is not None:
            opt_state = optimizer.state_dict()
            save_file(_tensors_for_disk(opt_state["tensors"]), staging / "optimizer.safetensors")
            _write_json(staging / "optimizer.json", {"class": type(optimizer).__name__, "meta": opt_state["meta"]})

    return write_package(path, write)


def write_package(path, write: Callable[[Path], None]) -> Path:
    """Writes a package directory at `path`: `write(staging)` fills a fresh staging directory
    (graph.json, weights.safetensors, ...), then the manifest of every file in it is added and
    the directory swapped in whole (a failed write never destroys what was at `path`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        write(staging)
        files = {f.name: {"sha256": file_sha256(f), "bytes": f.stat().st_size}
                 for f in sorted(staging.iterdir()) if f.name != MANIFEST}
        _write_json(staging / MANIFEST, {"format": FORMAT, "format_version": FORMAT_VERSION, "files": files})
        _swap_in(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def _swap_in(staging: Path, path: Path) -> None:
    if not path.exists():
        os.replace(staging, path)
        return
    if not path.is_dir():
        raise CheckpointError(f"checkpoint path {path} exists and is not a directory")
    retired = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(path, retired)
    os.replace(staging, path)
    shutil.rmtree(retired, ignore_errors=True)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint file {path} is not valid JSON: {exc}") from None


def verify(path) -> dict:
    """Checks a checkpoint's manifest, format version and file hashes; returns its graph.json."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint directory at {path}")
    manifest = _read_json(path / MANIFEST)
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path / MANIFEST}: expected format {FORMAT!r} version {FORMAT_VERSION}, found "
            f"{manifest.get('format')!r} version {manifest.get('format_version')!r}")
    files = manifest.get("files")
    if not isinstance(files, dict) or "weights.safetensors" not in files or "graph.json" not in files:
        raise CheckpointError(f"{path / MANIFEST}: the manifest does not list weights.safetensors and graph.json")
    for name, entry in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint file {f} listed in the manifest is missing")
        size = f.stat().st_size
        if size != entry.get("bytes"):
            raise CheckpointError(f"checkpoint file {f} is truncated or altered: expected {entry.get('bytes')} "
                                  f"bytes, found {size}")
        digest = file_sha256(f)
        if digest != entry.get("sha256"):
            raise CheckpointError(f"checkpoint file {f} is corrupt: SHA-256 {digest[:16]}… does not match the "
                                  f"manifest's {str(entry.get('sha256'))[:16]}…")
    graph = _read_json(path / "graph.json")
    if graph.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path / 'graph.json'}: expected format version {FORMAT_VERSION}, "
                              f"found {graph.get('format_version')!r}")
    return graph


def load_tensors(f: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; a `CheckpointError` naming the file if it cannot be read."""
    try:
        return load_file(f)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint file {f} cannot be read: {exc}") from None


def load(path, module, optimizer=None) -> dict:
    """Loads a checkpoint into `module` (and `optimizer`); returns the saved metadata.

    Everything is verified first (hashes, names, shapes, dtypes); on any error the
    module and optimizer are left exactly as they were.
    """
    path = Path(path)
    graph = verify(path)
    weights = load_tensors(path / "weights.safetensors")
    staged = module._stage_state_dict(weights)
    if optimizer is not None:
        if not (path / "optimizer.safetensors").is_file():
            raise CheckpointError(f"checkpoint {path} holds no optimizer state")
        meta = _read_json(path / "optimizer.json")
        if meta.get("class") != type(optimizer).__name__:
            raise CheckpointError(f"checkpoint {path} holds {meta.get('class')} state, not "
                                  f"{type(optimizer).__name__}")
        tensors = load_tensors(path / "optimizer.safetensors")
        optimizer.load_state_dict({"tensors": tensors, "meta": meta["meta"]})  # validates before changing
    module._apply_staged(staged)
    return graph.get("metadata", {})
