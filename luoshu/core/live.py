"""Live objects named by an op's attributes: one registry of integer keys for every op that
must reach a Python object at run time (an optimizer, a loss scaler, a parameter-server
embedding, a data-parallel sync mode, a persistent bucket buffer).

Op attributes stay plain JSON (DESIGN.md §2), so such an op carries an integer key instead
of the object. The registry holds objects weakly; a graph that records such an op keeps its
objects alive with `keep_alive(graph, obj)`, so they live exactly as long as someone can
still run the op.
"""

from __future__ import annotations

import itertools
import weakref

from luoshu.core.errors import ExecutionError

_LIVE: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_KEEP_ALIVE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_next_key = itertools.count()


def register(obj) -> int:
    """A new key for `obj`, valid while `obj` is alive."""
    key = next(_next_key)
    _LIVE[key] = obj
    return key


def lookup(key: int, what: str, op: str):
    """The object registered under `key`; an `ExecutionError` naming the op and what it
    looked for when that object no longer exists."""
    obj = _LIVE.get(key)
    if obj is None:
        raise ExecutionError(f"{op}: the {what} with key {key} no longer exists")
    return obj


def keep_alive(graph, obj) -> None:
    """Keeps `obj` alive for as long as `graph` is (no-op for `graph=None`, an eager op)."""
    if graph is None:
        return
    held = _KEEP_ALIVE.setdefault(graph, [])
    if not any(o is obj for o in held):
        held.append(obj)


def alive() -> list:
    """Every registered object still alive (a strategy finds its live sync modes by kind)."""
    return list(_LIVE.values())
