"""Passes over a graph before it runs: pruning, activation recompute, comm scheduling, the
gradient all-reduce of data parallelism; whole-step compilation (TorchInductor)."""

from luoshu.compiler.comm_schedule import schedule_comm
from luoshu.compiler.gradient_allreduce import insert_gradient_allreduce
from luoshu.compiler.inductor import CompiledStep, LoweringWarning
from luoshu.compiler.passes import prune
from luoshu.compiler.recompute import apply_recompute

__all__ = ["CompiledStep", "LoweringWarning", "apply_recompute", "insert_gradient_allreduce", "prune", "schedule_comm"]
