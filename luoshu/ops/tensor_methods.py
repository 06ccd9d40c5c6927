"""Python operators and methods of `Tensor` (`+ - * / @ **`, comparisons, `.sum()`, ...).

They live here, not in core, because they call the operator functions of this package.
"""

from __future__ import annotations

from luoshu.core.op import apply
from luoshu.core.tensor import Tensor


def _binary(name: str, reflected: bool = False):
    if reflected:
        return lambda self, other: apply(name, other, self)
    return lambda self, other: apply(name, self, other)


def install(ops) -> None:
    """Binds the operator functions of `luoshu.ops` onto Tensor."""
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
