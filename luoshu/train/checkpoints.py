"""Checkpoint bookkeeping of a training job: the `step-<N>` directories, the newest one, and the random
generator's state that a checkpoint carries so a resumed run draws the same numbers."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import torch

from luoshu.core.random import generator

CHECKPOINT_PREFIX = "step-"


def checkpoint_dir(directory: str | Path, step: int) -> Path:
    """Where the checkpoint of `step` goes in `directory` (zero-padded, so names sort by step)."""
    return Path(directory) / f"{CHECKPOINT_PREFIX}{step:08d}"


def list_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (`step-<N>` with a manifest) in `directory`, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and p.name[len(CHECKPOINT_PREFIX):].isdigit() \
                and (p / "manifest.json").is_file():
            found.append((int(p.name[len(CHECKPOINT_PREFIX):]), p))
    return sorted(found)


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The newest complete checkpoint in `directory`, or None."""
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def generator_state(device: str) -> str:
    """The state of `device`'s luoshu random generator, as text for a checkpoint's JSON metadata."""
    return base64.b64encode(generator(device).get_state().numpy().tobytes()).decode()


def set_generator_state(device: str, state: str) -> None:
    """Restores `device`'s random generator from `generator_state`'s text."""
    raw = np.frombuffer(base64.b64decode(state), dtype=np.uint8).copy()
    generator(device).set_state(torch.from_numpy(raw))

