"""The error hierarchy: every user-facing luoshu failure is a subclass of `Error`."""

from __future__ import annotations


class Error(Exception):
    """Base class of every error luoshu raises for bad input or bad state."""


class ShapeError(Error, ValueError):
    """Shapes that break an operator's rule (names the op, the shapes and the rule)."""


class DTypeError(Error, TypeError):
    """A dtype an operator or placeholder cannot take."""


class DeviceError(Error, ValueError):
    """Inputs on different devices, or a device that does not exist here."""


class OpError(Error):
    """An unknown operator, an unknown attribute, or an attribute with a bad value."""


class FeedError(Error, ValueError):
    """A feed that does not match its placeholder, or a placeholder left unfed."""


class GraphError(Error):
    """Misuse of a graph: tensors from another graph, fetching something not in it."""


class GradientError(Error):
    """A gradient that cannot be built (non-scalar backward, non-differentiable op)."""


class CheckpointError(Error):
    """A checkpoint that is missing, corrupt, truncated, or does not match the model."""


class ExecutionError(Error, RuntimeError):
    """A kernel failed while running (names the op and its input shapes)."""
