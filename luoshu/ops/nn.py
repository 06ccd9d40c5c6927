"""Neural-network operators: softmax, convolution, pooling, normalisation, dropout, embeddings, attention."""

from __future__ import annotations

__all__: list[str] = []
