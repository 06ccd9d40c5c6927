"""Normalisation operators: batch, layer, group and RMS norm."""

from __future__ import annotations

__all__: list[str] = []
