"""Passes over a graph before it runs: pruning to what the fetches need (more passes follow)."""

from luoshu.compiler.passes import prune

__all__ = ["prune"]
