"""Passes over a graph before it runs: pruning, comm scheduling, data-parallel gradient synchronisation."""

from luoshu.compiler.comm_schedule import schedule_comm
from luoshu.compiler.gradient_allreduce import insert_gradient_allreduce
from luoshu.compiler.passes import prune

__all__ = ["insert_gradient_allreduce", "prune", "schedule_comm"]
