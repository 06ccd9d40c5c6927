"""Every operator, reachable as `luoshu.ops.<name>`.

Each family module holds one `OpDef` class per operator (shape rule, kernel, gradient
rule, distributed-states rule together) and the public functions that call it.
Registered operators without a hand-written function (gradient kernels such as
`threshold_backward`) are reachable too, as `luoshu.ops.<name>(*inputs, **attrs)`.
"""

from __future__ import annotations

from luoshu.core.op import apply, get_opdef, registered_ops
from luoshu.ops import (
    comm,
    conv,
    creation,
    elementwise,
    linalg,
    loss,
    nn,
    norm,
    parallel,
    ps,
    random,
    reduction,
    shape,
    sparse,
    update,
)
from luoshu.ops import tensor_methods as _tensor_methods
from luoshu.ops.comm import *  # noqa: F403
from luoshu.ops.conv import *  # noqa: F403
from luoshu.ops.creation import *  # noqa: F403
from luoshu.ops.elementwise import *  # noqa: F403
from luoshu.ops.linalg import *  # noqa: F403
from luoshu.ops.loss import *  # noqa: F403
from luoshu.ops.nn import *  # noqa: F403
from luoshu.ops.norm import *  # noqa: F403
from luoshu.ops.random import *  # noqa: F403
from luoshu.ops.reduction import *  # noqa: F403
from luoshu.ops.shape import *  # noqa: F403
from luoshu.ops.sparse import *  # noqa: F403

_FAMILIES = (comm, conv, creation, elementwise, linalg, loss, nn, norm, parallel, ps, random, reduction, shape, sparse,
             update)


def __getattr__(name: str):
    if name in registered_ops():
        opdef = get_opdef(name)
        return lambda *inputs, **attrs: apply(opdef, *inputs, **attrs)
    raise AttributeError(f"luoshu.ops has no operator {name!r}")


_tensor_methods.install(__import__(__name__, fromlist=["*"]))
