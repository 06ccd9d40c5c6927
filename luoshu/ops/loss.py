"""Loss operators: cross entropy, nll, mse, l1, smooth l1, binary cross entropy."""

from __future__ import annotations

__all__: list[str] = []
