"""Turning a compiled graph into a flat `Plan` and running it."""

from luoshu.core import graph as _graph
from luoshu.runtime.plan import Plan, Step, build_plan

_graph.set_plan_builder(build_plan)

__all__ = ["Plan", "Step", "build_plan"]
