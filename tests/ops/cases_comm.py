"""Cases for luoshu/ops/comm.py in a single process, where every group has one member.

Here each collective is the identity (a one-member sum, gather, scatter or exchange);
these cases check shapes, both graph modes and that gradients pass through. What the
collectives do across processes, and their gradients there, is checked by
tests/distributed/test_comm_ops.py against NumPy.
"""

import luoshu as ls
from tests.ops.harness import OpCase

O = ls.ops

CASES = [
    OpCase("all_reduce_sum", lambda x: O.all_reduce(x) * x, lambda x: x * x, [(3, 4)], second_order=True),
    OpCase("all_reduce_mean", lambda x: O.all_reduce(x, reduce="mean"), lambda x: x.clone(), [(5,)]),
    OpCase("all_reduce_max", lambda x: O.all_reduce(x, reduce="max") * x, lambda x: x * x, [(3, 4)]),
    OpCase("all_reduce_min", lambda x: O.all_reduce(x, reduce="min"), lambda x: x.clone(), [(2, 3)]),
    OpCase("all_reduce_async_wait", lambda x: O.comm_wait(O.all_reduce(x.exp(), async_op=True)),
           lambda x: x.exp(), [(2, 3)]),
    OpCase("all_gather", lambda x: O.all_gather(x) * 2, lambda x: x * 2, [(3, 2)]),
    OpCase("reduce_scatter", lambda x: O.reduce_scatter(x, reduce="mean"), lambda x: x.clone(), [(4, 2)]),
    OpCase("broadcast", lambda x: O.broadcast(x, src=0).sin(), lambda x: x.sin(), [(3,)]),
    OpCase("reduce", lambda x: O.reduce(x, dst=0) ** 2, lambda x: x ** 2, [(2, 2)]),
    OpCase("all_to_all_equal", lambda x: O.all_to_all(x), lambda x: x.clone(), [(4, 3)]),
    OpCase("all_to_all_splits", lambda x: O.all_to_all(x, [3], [3]), lambda x: x.clone(), [(3, 2)]),
]
