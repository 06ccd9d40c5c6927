"""Python operators and methods of `Tensor` (`+ - * / @ **`, comparisons, `.sum()`, ...),
`Tensor.backward` and `IndexedSlices.to_dense`: every method that builds an op.

They are installed here, not written in core's class body, because they call operators and
autodiff, which are built on `Tensor`: the one mechanism that binds them, so core never
imports upward.
"""

from __future__ import annotations

from luoshu.core import autodiff
from luoshu.core.op import apply
from luoshu.core.tensor import IndexedSlices, Tensor


def _binary(name: str, reflected: bool = False):
    if reflected:
        return lambda self, other: apply(name, other, self)
    return lambda self, other: apply(name, self, other)


def _backward(self, gradient=None, create_graph: bool = False) -> None:
    """Accumulates d(self)/d(leaf) into `.grad` of every leaf that requires grad."""
    autodiff.backward(self, gradient, create_graph=create_graph)


def _to_dense(self) -> Tensor:
    """The dense (num_rows, ...) tensor an IndexedSlices stands for (repeated rows summed)."""
    return apply("sparse_to_dense", self.indices, self.values, num_rows=self.dense_shape[0])


def install(ops) -> None:
    """Binds the operator functions of `luoshu.ops` onto Tensor."""
    Tensor.backward = _backward
    IndexedSlices.to_dense = _to_dense
    for dunder, name in [("add", "add"), ("sub", "sub"), ("mul", "mul"), ("truediv", "div"),
                         ("pow", "pow"), ("and", "logical_and"), ("or", "logical_or"),
                         ("xor", "logical_xor")]:
        setattr(Tensor, f"__{dunder}__", _binary(name))
        setattr(Tensor, f"__r{dunder}__", _binary(name, reflected=True))
    for dunder, name in [("eq", "equal"), ("ne", "not_equal"), ("lt", "less"), ("le", "less_equal"),
                         ("gt", "greater"), ("ge", "greater_equal")]:
        setattr(Tensor, f"__{dunder}__", _binary(name))
    Tensor.__matmul__ = lambda self, other: ops.matmul(self, other)
    Tensor.__rmatmul__ = lambda self, other: ops.matmul(other, self)
    Tensor.__neg__ = lambda self: apply("neg", self)
    Tensor.__abs__ = lambda self: apply("abs", self)
    Tensor.__invert__ = lambda self: apply("logical_not", self)
    Tensor.__getitem__ = lambda self, index: ops.getitem(self, index)

    for name in ["exp", "log", "log1p", "sqrt", "rsqrt", "sin", "cos", "tanh", "sigmoid", "relu",
                 "abs", "neg", "sign", "erf", "isfinite", "logical_not"]:
        setattr(Tensor, name, _unary(name))
    for name in ["sum", "mean", "max", "min", "prod", "var", "std", "norm", "logsumexp", "argmax",
                 "argmin", "cumsum", "reshape", "transpose", "permute", "squeeze", "unsqueeze",
                 "broadcast_to", "flip", "repeat", "clamp", "softmax", "log_softmax", "gather",
                 "index_select", "tril", "triu", "split", "maximum", "minimum", "pow"]:
        if hasattr(ops, name):
            setattr(Tensor, name, getattr(ops, name))
    Tensor.astype = lambda self, dtype: apply("cast", self, dtype=dtype)
    Tensor.float = lambda self: apply("cast", self, dtype="float32")
    Tensor.T = property(lambda self: ops.transpose(self) if self.ndim >= 2 else self)
    Tensor.view = ops.reshape
    Tensor.matmul = lambda self, other: ops.matmul(self, other)


def _unary(name: str):
    return lambda self: apply(name, self)
