"""Shared by the benchmarks: interleaved, warmed-up timing (medians), so a shared CPU's load hits every
contender alike instead of whichever happened to run during a busy minute."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved(contenders: dict[str, Callable[[int], object]], steps: int, repeats: int,
                warmup: int = 3) -> dict[str, float]:
    """Median steps/s of each `step(i)` function: warm-up steps for all, then `repeats` rounds in each
    of which every contender runs `steps` steps in turn (the order rotating from round to round)."""
    for step in contenders.values():
        for i in range(warmup):
            step(i)
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            step = contenders[name]
            start = time.perf_counter()
            for i in range(steps):
                step(i)
            rates[name].append(steps / (time.perf_counter() - start))
    return {name: statistics.median(r) for name, r in rates.items()}
