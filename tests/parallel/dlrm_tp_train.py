"""DLRM with its slot tables row-wise or table-wise over TP; run under `luoshu launch` by the tests.

    luoshu launch -n 2 tests/parallel/dlrm_tp_train.py --tables table --out PREFIX

Rank r writes the losses of 3 AdamW steps (float64) and the full parameters (table in its
original row order) to PREFIX.rank<r>.npz; `train(None, ...)` is the one-process reference.
`--save CKPT` then writes `ls.save`'s checkpoint; `--load CKPT` instead loads one (`ls.load`)
into a fresh model of this layout and writes its full parameters and optimizer state.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import luoshu as ls
from luoshu.models.recommendation import DLRM, CTRConfig

SLOTS, DENSE, BATCH, STEPS = [7, 3, 12, 5, 3], 4, 16, 3


def build(mesh, tables: str = "row", seed: int = 3):
    ls.manual_seed(seed)
    config = CTRConfig(dense_dim=DENSE, slot_sizes=SLOTS, embedding_dim=4, mlp_dims=(8,), bottom_mlp_dims=(8,))
    model = DLRM(config).to(dtype="float64")
    if mesh is not None:
        ls.parallel.parallelize(model, mesh, tables=tables)
    return model, ls.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.01)


def train(mesh, tables: str = "row"):
    model, opt = build(mesh, tables)
    with ls.Graph() as g:
        dense = ls.placeholder("dense", (None, DENSE), "float64")
        sparse = ls.placeholder("sparse", (None, len(SLOTS)), "int64")
        y = ls.placeholder("y", (None,), "float64")
        loss = ls.nn.functional.binary_cross_entropy_with_logits(model(dense, sparse), y)
        step = opt.minimize(loss)
    rng = np.random.default_rng(9)
    losses = []
    for _ in range(STEPS):
        d = rng.standard_normal((BATCH, DENSE))
        s = np.stack([rng.integers(0, n, BATCH) for n in SLOTS], axis=1)
        t = (rng.random(BATCH) < 0.4).astype(np.float64)
        rows = mesh.batch_slice(BATCH) if mesh is not None else slice(None)
        losses.append(float(g.run([loss, step], {dense: d[rows], sparse: s[rows], y: t[rows]})[0]))
    if mesh is None:
        params = {n: p.value.clone() for n, p in model.named_parameters()}
    else:
        params = ls.parallel.gather_parameters(model, mesh)
    return np.array(losses), {n: v.numpy() for n, v in params.items()}, model, opt


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tables", default="row")
    parser.add_argument("--out", required=True)
    parser.add_argument("--save", default=None)
    parser.add_argument("--load", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    ls.distributed.init()
    mesh = ls.distributed.DeviceMesh(tp=ls.distributed.world_size())
    if args.load:
        from luoshu.parallel.checkpoint import _full_tensors
        from tests.parallel.tp_checkpoint import full_state

        model, opt = build(mesh, args.tables, seed=5)  # other values: all must come from the checkpoint
        ls.load(args.load, model, opt)
        with _full_tensors(model, opt, mesh.group("tp").ranks):
            state = full_state(model, opt)
        np.savez(f"{args.out}.rank{ls.distributed.rank()}.npz", **state)
        ls.distributed.shutdown()
        return
    losses, params, model, opt = train(mesh, args.tables)
    if args.save:
        ls.save(args.save, model, opt)
    local_rows = model.embedding.weight._value.shape[0]
    np.savez(
        f"{args.out}.rank{ls.distributed.rank()}.npz",
        losses=losses,
        local_rows=local_rows,
        **{f"param.{k}": v for k, v in params.items()},
    )
    ls.distributed.shutdown()


if __name__ == "__main__":
    main()
