"""Checkpoint bookkeeping of a training job: the `step-<N>` directories, the newest one, the random
generator's state that a checkpoint carries so a resumed run draws the same numbers, and the previous
run's results that a new run keeps until it has a checkpoint of its own."""

from __future__ import annotations

import base64
import os
import shutil
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



PREVIOUS_RUN = ".previous-run"


class PreviousRun:
    """A previous run's results, kept until a new run (one not resuming) has saved its first checkpoint.

    `set_aside()` moves the old `step-<N>` checkpoints, `metrics.csv`, `config.yaml` and TensorBoard events
    into a `.previous-run` folder (a rename on the same file system); `discard()` deletes them once the new
    run has a checkpoint; `restore()` puts them back (removing what the failed run wrote) when it fails
    first. A run killed before either leaves the folder behind: `recover()` at the next start puts it
    back if no newer checkpoint exists, so nothing is lost however the re-run ends."""

    JOB_FILES = ("metrics.csv", "config.yaml")

    def __init__(self, job_dir: str | Path, checkpoint_path: str | Path):
        self.job_dir, self.checkpoint_path = Path(job_dir), Path(checkpoint_path)
        self.job_aside = self.job_dir / PREVIOUS_RUN
        self.checkpoint_aside = self.checkpoint_path / PREVIOUS_RUN
        self.pending = False

    def _job_outputs(self) -> list[Path]:
        names = [self.job_dir / n for n in self.JOB_FILES]
        return [p for p in names if p.is_file()] + sorted(self.job_dir.glob("events.out.tfevents.*"))

    def _new_checkpoints(self) -> list[Path]:
        """Every `step-*` entry, complete or not (a failed run's partial ones go too)."""
        if not self.checkpoint_path.is_dir():
            return []
        return sorted(p for p in self.checkpoint_path.iterdir() if p.name.startswith(CHECKPOINT_PREFIX))

    def set_aside(self) -> str | None:
        """Moves the previous run's results aside; returns what was moved, in words, or None if nothing."""
        checkpoints = [p for _, p in list_checkpoints(self.checkpoint_path)]
        outputs = self._job_outputs()
        if not checkpoints and not outputs:
            return None
        for folder in (self.job_aside, self.checkpoint_aside):
            folder.mkdir(parents=True, exist_ok=True)
        for p in checkpoints:
            os.replace(p, self.checkpoint_aside / p.name)
        for p in outputs:
            os.replace(p, self.job_aside / p.name)
        self.pending = True
        return f"{len(checkpoints)} checkpoint(s)" + (f" and {', '.join(p.name for p in outputs)}" if outputs else "")

    def discard(self) -> None:
        """The new run has a checkpoint: the previous run's results go."""
        for folder in (self.checkpoint_aside, self.job_aside):
            shutil.rmtree(folder, ignore_errors=True)
        self.pending = False

    def restore(self) -> None:
        """The new run failed before its first checkpoint: its outputs go, the previous run's come back."""
        for p in self._job_outputs():  # the old ones are all aside: what is here is the failed run's
            p.unlink()
        for p in self._new_checkpoints():
            shutil.rmtree(p, ignore_errors=True)
        for folder, target in ((self.checkpoint_aside, self.checkpoint_path), (self.job_aside, self.job_dir)):
            if folder.is_dir():
                for p in folder.iterdir():
                    os.replace(p, target / p.name)
                folder.rmdir()
        self.pending = False

    def recover(self) -> bool:
        """A `.previous-run` left by a run killed before its first checkpoint: put it back (True), or
        delete it when a newer checkpoint exists after all (False)."""
        if not (self.job_aside.is_dir() or self.checkpoint_aside.is_dir()):
            return False
        if list_checkpoints(self.checkpoint_path):
            self.discard()
            return False
        self.restore()
        return True
