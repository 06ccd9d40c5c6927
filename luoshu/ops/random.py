"""Random operators drawing from luoshu's seeded generators (`luoshu.manual_seed`)."""

from __future__ import annotations

__all__: list[str] = []
