"""Checkpoints in luoshu's package format (DESIGN.md §6).

A checkpoint is a directory:
  graph.json            format version, the module's class and its tensors' metas
  weights.safetensors   parameters and buffers by dotted name
  optimizer.json        optimizer hyperparameters and step counts (optional)
  optimizer.safetensors optimizer state tensors (optional)
  manifest.json         SHA-256 and size of every file above

`save` writes a new directory beside the target and swaps it in only when complete,
so a failed save never destroys the previous checkpoint. `load` verifies the manifest,
the format version and every name, shape and dtype before it changes anything. It reads
only files the manifest lists and hashes, and refuses a directory holding any other
file (an `optimizer.*` copied into a checkpoint saved without one is tampering, not
state). No pickle is involved anywhere.

Sharded jobs: a parallel strategy (`luoshu.parallel`) installs a `LayoutHook` with
`set_layout_hook`. When the hook claims a module (split parameters of tensor parallelism, an
optimizer sharded by ZeRO), `save` is a collective: every rank calls it, the hook makes every
tensor and optimizer state full, and one rank writes the regular package — full tensors, so
it loads into any layout or one process. `load` reads the package on every rank and the hook
keeps each rank's blocks (the layout of the job that loads).
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


class LayoutHook:
    """How a strategy layer turns a sharded job's tensors into full ones and back (see the module
    docstring); installed with `set_layout_hook`, consulted by `save` and `load`."""

    def applies(self, module, optimizer) -> bool:  # pragma: no cover - interface
        """Whether `module` / `optimizer` are sharded so that `save` and `load` must go through the hook."""
        raise NotImplementedError

    def save(self, path, module, optimizer, metadata: dict | None) -> Path | None:  # pragma: no cover
        """Writes the full package (with `save_full`) from one rank; every rank calls it."""
        raise NotImplementedError

    def load(self, path, module, optimizer) -> dict:  # pragma: no cover
        """Loads the full package (with `load_full`) and keeps this rank's blocks."""
        raise NotImplementedError


_LAYOUT_HOOK: LayoutHook | None = None


def set_layout_hook(hook: LayoutHook | None) -> None:
    """Installs the hook of sharded layouts (luoshu.parallel does, at import; a lower layer cannot import it)."""
    global _LAYOUT_HOOK
    _LAYOUT_HOOK = hook


def save(path, module, optimizer=None, metadata: dict | None = None) -> Path:
    """Saves `module` (and `optimizer`) as a checkpoint directory at `path`.

    For a sharded job (tensor parallel, ZeRO) this is a collective that writes full tensors from
    one rank (see the module docstring)."""
    if _LAYOUT_HOOK is not None and _LAYOUT_HOOK.applies(module, optimizer):
        _LAYOUT_HOOK.save(path, module, optimizer, metadata)
        return Path(path)
    return save_full(path, module, optimizer, metadata)


def save_full(path, module, optimizer=None, metadata: dict | None = None, optimizer_state: dict | None = None) -> Path:
    """`save` of the values this process holds, as they are (no layout hook). `optimizer_state`:
    the optimizer's `state_dict()` to write instead of asking `optimizer` (ZeRO's consolidated one)."""

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
            opt_state = optimizer.state_dict() if optimizer_state is None else optimizer_state
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
    """A checkpoint's JSON file, which must hold an object (a mapping) at the top."""
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint file {path} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"checkpoint file {path}: expected a JSON object at the top, found "
                              f"{type(value).__name__}")
    return value


def verify(path) -> dict:
    """Checks a checkpoint's manifest, format version and file hashes; returns its graph.json.

    The directory may hold only the manifest and the files it lists (plain names, each hashed)."""
    return _verify(Path(path))[0]


def _verify(path: Path) -> tuple[dict, set[str]]:
    """`verify`, also returning the names the manifest lists: all that `load` may read."""
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
        if not isinstance(name, str) or name in ("", ".", "..", MANIFEST) or "/" in name or "\\" in name:
            raise CheckpointError(f"{path / MANIFEST}: {name!r} is not a file name of the checkpoint")
        if not isinstance(entry, dict):
            raise CheckpointError(f"{path / MANIFEST}: the entry of {name} must be an object with sha256 and bytes, "
                                  f"found {entry!r}")
    unlisted = sorted(p.name for p in path.iterdir() if p.name != MANIFEST and p.name not in files)
    if unlisted:
        raise CheckpointError(f"checkpoint {path} holds {', '.join(unlisted)}, which the manifest does not list; "
                              "refusing it (a checkpoint holds only the manifest and the files it hashes)")
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
    if not isinstance(graph.get("metadata", {}), dict):
        raise CheckpointError(f"{path / 'graph.json'}: metadata must be a JSON object, found "
                              f"{type(graph['metadata']).__name__}")
    return graph, set(files)


def load_tensors(f: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; a `CheckpointError` naming the file if it cannot be read."""
    try:
        return load_file(f)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint file {f} cannot be read: {exc}") from None


def load(path, module, optimizer=None) -> dict:
    """Loads a checkpoint into `module` (and `optimizer`); returns the saved metadata.

    Everything is verified first (hashes, names, shapes, dtypes); on any error the
    module and optimizer are left exactly as they were. A sharded module (or optimizer)
    keeps its blocks of the full tensors (see the module docstring).
    """
    if _LAYOUT_HOOK is not None and _LAYOUT_HOOK.applies(module, optimizer):
        return _LAYOUT_HOOK.load(path, module, optimizer)
    return load_full(path, module, optimizer)


def load_full(path, module, optimizer=None, load_optimizer_state: Callable[[dict], None] | None = None) -> dict:
    """`load` into tensors of the checkpoint's full shapes (no layout hook). `load_optimizer_state`:
    takes the optimizer's state dict instead of `optimizer.load_state_dict` (ZeRO's shards)."""
    path = Path(path)
    graph, listed = _verify(path)
    weights = load_tensors(path / "weights.safetensors")
    staged = module._stage_state_dict(weights)
    if optimizer is not None:
        missing = [n for n in ("optimizer.json", "optimizer.safetensors") if n not in listed]
        if missing:  # only files the manifest lists (and verify hashed) are ever read
            raise CheckpointError(f"checkpoint {path} holds no optimizer state (its manifest does not list "
                                  f"{' or '.join(missing)})")
        meta = _read_json(path / "optimizer.json")
        if meta.get("class") != type(optimizer).__name__:
            raise CheckpointError(f"checkpoint {path} holds {meta.get('class')} state, not "
                                  f"{type(optimizer).__name__}")
        tensors = load_tensors(path / "optimizer.safetensors")
        # validates before changing anything
        (load_optimizer_state or optimizer.load_state_dict)({"tensors": tensors, "meta": meta["meta"]})
    module._apply_staged(staged)
    return graph.get("metadata", {})
