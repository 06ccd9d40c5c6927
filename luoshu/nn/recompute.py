"""`recompute(module)`: train a module without keeping its intermediate activations.

In a define-and-run graph, every call of a marked module records a region; the compiler's
recompute pass (`luoshu.compiler.recompute`) drops the region's intermediate activations after
the forward and recomputes them in the backward from the region's inputs, trading one more
forward of the module for its activation memory (Chen et al. 2016, "gradient checkpointing";
Megatron's full recompute). Gradients are unchanged: dropout reapplies the masks it drew in the
forward. `scope="attention"` marks only the attention modules inside (selective recompute:
attention's activations grow with the square of the sequence length, the rest linearly). Eager
mode keeps every activation (there is no later backward to rewrite); the mark has no effect there.
"""

from __future__ import annotations

from luoshu.core.errors import Error
from luoshu.nn.module import Module

SCOPES = ("full", "attention")


def _is_attention(module: Module) -> bool:
    return type(module).__name__.endswith("Attention")


def recompute(module: Module, scope: str = "full", enabled: bool = True) -> Module:
    """Marks `module` (or, with scope="attention", every attention module in it) for
    recompute; returns `module`. `enabled=False` removes the mark."""
    if not isinstance(module, Module):
        raise Error(f"recompute takes a luoshu.nn.Module, found {type(module).__name__}")
    if scope not in SCOPES:
        raise Error(f"recompute: scope must be one of {SCOPES}, found {scope!r}")
    targets = [module] if scope == "full" else [m for m in module.modules() if _is_attention(m)]
    if not targets:
        raise Error(f"recompute(scope='attention'): {type(module).__name__} has no attention module")
    for m in targets:
        object.__setattr__(m, "_recompute", bool(enabled))
    return module
