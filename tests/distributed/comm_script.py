"""Runs every comm op (forward and gradient, eager and define-and-run) on the launched workers.

    python -m luoshu.distributed.launch -n 2 tests/distributed/comm_script.py OUT_DIR

Worker r writes OUT_DIR/rank{r}.npz with, per case, the output and the gradient of
its input for the cotangent `cotangent(r, shape)`; tests/distributed/test_comm_ops.py
recomputes both for every worker in NumPy.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch

import luoshu as ls

O = ls.ops


def splits_in(rank: int, n: int) -> list[int]:
    """Rows worker `rank` sends to each worker (unequal, 1 to 3)."""
    return [(rank + 2 * s) % 3 + 1 for s in range(n)]


def splits_out(rank: int, n: int) -> list[int]:
    return [splits_in(s, n)[rank] for s in range(n)]


def subgroup(rank: int) -> tuple[int, ...]:
    """With 4 workers: the even and the odd workers form two groups."""
    return (0, 2) if rank % 2 == 0 else (1, 3)


def x_of(rank: int, shape) -> np.ndarray:
    return np.random.default_rng(10 + rank).standard_normal(shape)


def cotangent(rank: int, shape) -> np.ndarray:
    return np.random.default_rng(100 + rank).standard_normal(shape)


def cases(rank: int, n: int):
    """(name, input shape, function of one luoshu tensor, output shape)."""
    sub = [
        ("subgroup_all_reduce", (3,), lambda x: O.all_reduce(x, group=ls.DeviceGroup(subgroup(rank))), (3,)),
        ("subgroup_all_gather", (2, 2), lambda x: O.all_gather(x, group=subgroup(rank)), (4, 2)),
    ] if n == 4 else []
    return sub + [
        ("all_reduce_sum", (3, 2), lambda x: O.all_reduce(x), (3, 2)),
        ("all_reduce_mean", (3, 2), lambda x: O.all_reduce(x, reduce="mean"), (3, 2)),
        ("all_reduce_async", (3, 2), lambda x: O.comm_wait(O.all_reduce(x, async_op=True)), (3, 2)),
        ("all_reduce_max", (3, 2), lambda x: O.all_reduce(x, reduce="max"), (3, 2)),
        ("all_reduce_min", (3, 2), lambda x: O.all_reduce(x, reduce="min"), (3, 2)),
        ("all_gather", (2, 3), lambda x: O.all_gather(x), (2 * n, 3)),
        ("all_gather_async", (2, 3), lambda x: O.comm_wait(O.all_gather(x, async_op=True)), (2 * n, 3)),
        ("reduce_scatter", (2 * n, 3), lambda x: O.reduce_scatter(x), (2, 3)),
        ("reduce_scatter_mean", (2 * n, 3), lambda x: O.reduce_scatter(x, reduce="mean"), (2, 3)),
        ("broadcast", (3,), lambda x: O.broadcast(x, src=1), (3,)),
        ("reduce", (3,), lambda x: O.reduce(x, dst=1), (3,)),
        ("all_to_all", (2 * n, 2), lambda x: O.all_to_all(x), (2 * n, 2)),
        ("all_to_all_unequal", (sum(splits_in(rank, n)), 2),
         lambda x: O.all_to_all(x, splits_in(rank, n), splits_out(rank, n)), (sum(splits_out(rank, n)), 2)),
    ]


def main() -> None:
    torch.set_num_threads(1)
    ls.distributed.init()
    rank = ls.distributed.rank()
    out: dict[str, np.ndarray] = {}
    for name, shape, fn, out_shape in cases(rank, ls.distributed.world_size()):
        x_np, g_np = x_of(rank, shape), cotangent(rank, out_shape)
        x = ls.tensor(x_np, requires_grad=True)
        y = fn(x)
        (dx,) = ls.gradients(y, [x], [ls.tensor(g_np)])
        out[f"{name}/eager/y"], out[f"{name}/eager/dx"] = y.numpy(), dx.numpy()
        with ls.Graph() as g:
            xp = ls.placeholder("x", shape, "float64")
            gp = ls.placeholder("g", out_shape, "float64")
            yg = fn(xp)
            (dxg,) = ls.gradients(yg, [xp], [gp])
        out[f"{name}/graph/y"], out[f"{name}/graph/dx"] = g.run([yg, dxg], {xp: x_np, gp: g_np})
    # the data-parallel pieces: one bucket of two gradients, and a sparse gradient of
    # a different number of rows on each worker
    a, b = x_of(rank, (2, 3)), x_of(rank + 5, (4,))
    flat = ls.core.apply("bucket_all_reduce", ls.tensor(a), ls.tensor(b), reduce="mean")
    pa, pb = ls.core.apply("bucket_unpack", flat, shapes=((2, 3), (4,)))
    out["bucket/a"], out["bucket/b"] = pa.numpy(), pb.numpy()
    # a persistent buffer over three steps: filled, reused, then fed its own previous piece (which
    # the fill must not overwrite while reading it)
    from luoshu.ops.comm import BucketBuffer

    held = BucketBuffer()
    pa = ls.tensor(a)
    for step in range(3):
        first = pa if step == 2 else ls.tensor(a * (step + 1))
        flat = ls.core.apply("bucket_all_reduce", first, ls.tensor(b), reduce="mean", buffer=held.key)
        pa, pb = ls.core.apply("bucket_unpack", flat, shapes=((2, 3), (4,)))
        out[f"held/{step}/a"], out[f"held/{step}/b"] = pa.numpy(), pb.numpy()
    rows = 2 + rank
    idx, val = ls.core.apply("sparse_all_gather", ls.tensor(np.arange(rows) + 10 * rank),
                             ls.tensor(x_of(rank, (rows, 2))), reduce="mean")
    out["sparse/indices"], out["sparse/values"] = idx.numpy(), val.numpy()
    ls.distributed.barrier()
    np.savez(os.path.join(sys.argv[1], f"rank{rank}.npz"), **out)
    ls.distributed.shutdown()


if __name__ == "__main__":
    main()
