"""The seeded random generators every random operator draws from (one per device)."""

from __future__ import annotations

import torch

_seed: int | None = None
_generators: dict[str, torch.Generator] = {}


def manual_seed(seed: int) -> None:
    """Seeds every random operator in luoshu (all devices) for reproducible runs."""
    global _seed
    _seed = int(seed)
    _generators.clear()


def generator(device: str = "cpu") -> torch.Generator:
    gen = _generators.get(device)
    if gen is None:
        gen = torch.Generator(device=device)
        if _seed is None:
            gen.seed()
        else:
            gen.manual_seed(_seed)
        _generators[device] = gen
    return gen
