"""Thread-local execution context: the current graph, gradient mode and autocast dtype."""

from __future__ import annotations

import contextlib
import threading

from luoshu.core.errors import GraphError


class _State(threading.local):
    def __init__(self):
        self.graphs: list = []
        self.grad_enabled: bool = True
        self.autocast_dtype: str | None = None


_state = _State()


def current_graph():
    """The innermost define-and-run graph being built, or None in eager mode."""
    graphs = _state.graphs
    return graphs[-1] if graphs else None


def push_graph(graph) -> None:
    _state.graphs.append(graph)


def pop_graph(graph) -> None:
    if not _state.graphs or _state.graphs[-1] is not graph:
        raise GraphError(f"graph {graph.name!r} is not the innermost graph; exit graphs in reverse order")
    _state.graphs.pop()


def is_grad_enabled() -> bool:
    return _state.grad_enabled


@contextlib.contextmanager
def _grad_mode(enabled: bool):
    previous = _state.grad_enabled
    _state.grad_enabled = enabled
    try:
        yield
    finally:
        _state.grad_enabled = previous


def no_grad():
    """Eager ops inside this block record no history (their outputs do not require grad)."""
    return _grad_mode(False)


def enable_grad():
    return _grad_mode(True)


def autocast_dtype() -> str | None:
    return _state.autocast_dtype


@contextlib.contextmanager
def autocast_scope(dtype: str | None):
    previous = _state.autocast_dtype
    _state.autocast_dtype = dtype
    try:
        yield
    finally:
        _state.autocast_dtype = previous
