"""Pipeline schedules: the order of forward and backward micro-batch steps of each stage, and their accounting.

A schedule is a list of `("F", m)` / `("B", m)` steps for one stage. `gpipe` runs every
forward, then every backward; `one_f_one_b` (PipeDream-flush / Megatron's 1F1B) runs
`pp - stage - 1` warm-up forwards, then alternates one forward with one backward, then
drains the backwards, so a stage holds at most `pp - stage` micro-batches of activations
(at most `pp`). Fewer micro-batches than stages is fine: the warm-up shrinks to fit.
`ActivationLedger` is the runtime's own count of the micro-batches whose activations a
stage keeps, so that bound can be checked.
"""

from __future__ import annotations

from luoshu.core.errors import Error

SCHEDULES = ("gpipe", "1f1b")


def gpipe(stage: int, stages: int, micro_batches: int) -> list[tuple[str, int]]:
    return [("F", m) for m in range(micro_batches)] + [("B", m) for m in range(micro_batches)]


def one_f_one_b(stage: int, stages: int, micro_batches: int) -> list[tuple[str, int]]:
    warmup = min(stages - stage - 1, micro_batches)
    steps = [("F", m) for m in range(warmup)]
    forward, backward = warmup, 0
    while forward < micro_batches:
        steps.append(("F", forward))
        forward += 1
        steps.append(("B", backward))
        backward += 1
    steps += [("B", m) for m in range(backward, micro_batches)]
    return steps


def schedule(name: str, stage: int, stages: int, micro_batches: int) -> list[tuple[str, int]]:
    if name not in SCHEDULES:
        raise Error(f"pipeline: unknown schedule {name!r}; the schedules are {SCHEDULES}")
    if not 0 <= stage < stages or micro_batches < 1:
        raise Error(f"pipeline: stage {stage} of {stages} with {micro_batches} micro-batches is not a schedule")
    return (gpipe if name == "gpipe" else one_f_one_b)(stage, stages, micro_batches)


class ActivationLedger:
    """Counts the micro-batches whose saved activations are alive on a stage; keeps the peak."""

    def __init__(self):
        self.alive: set[int] = set()
        self.peak = 0

    def saved(self, micro_batch: int) -> None:
        self.alive.add(micro_batch)
        self.peak = max(self.peak, len(self.alive))

    def freed(self, micro_batch: int) -> None:
        self.alive.discard(micro_batch)


__all__ = ["SCHEDULES", "ActivationLedger", "gpipe", "one_f_one_b", "schedule"]
