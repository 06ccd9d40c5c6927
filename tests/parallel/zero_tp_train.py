"""ZeRO over the DP axis of a dp x tp mesh (GPT-2, float64, AdamW with global-norm clipping); run
under `luoshu launch` by the tests.

    luoshu launch -n 4 tests/parallel/zero_tp_train.py --dp 2 --tp 2 --zero 0,1,2 --out PREFIX \
        [--optimizers adamw,sgd,...] [--save-zero 1 --save CKPT] [--load-zero 2 --load CKPT2]

For each stage of `--zero` (0: plain dp x tp) rank r writes the losses, the full parameters
(all-gathered over its TP group) and its optimizer-state bytes at the first step (`plan.memory()`)
(and parameter bytes, an evaluation's loss, and the error of reading a row-parallel bias outside
`gathered_parameters()`) to PREFIX.zero<N>.rank<r>.npz. `--save`: the
`--save-zero` run then saves a checkpoint (`ls.save`, the layout hook). `--load`: a run of each
stage of `--load-zero` loads CKPT2 before training and writes PREFIX.load<N>.rank<r>.npz.
"""

from __future__ import annotations

import argparse
import contextlib

import numpy as np
import torch

import luoshu as ls
from tests.parallel import tp_train

CLIP = 0.05  # below the gradients' norm: the clipping takes effect
STEPS = 5


def train(mesh=None, zero: int = 0, save=None, load=None, optimizer: str = "adamw"):
    """(losses, {name: full parameter}, {optimizer-state and parameter bytes at the first step
    (`plan.memory()`), the loss of the last batch after the last step, the error a read of a
    row-parallel bias raises there, or "" (`left_read`), and what compiling a graph that reads one
    raises, or "" (`bias_graph`)}) after `STEPS` steps;
    `load`: a checkpoint loaded before the first, `save`: saved after the last."""
    ls.manual_seed(11)
    model = tp_train.build("gpt2").to(dtype="float64")
    tp = ls.parallel.parallelize(model, mesh) if mesh is not None else None
    opt = ls.optim.OPTIMIZERS[optimizer](model.parameters(), lr=1e-2, max_grad_norm=CLIP,
                                         **({"weight_decay": 0.1} if optimizer == "adamw" else {}))
    with ls.Graph() as g:
        ids = ls.placeholder("ids", (None, tp_train.LENGTH), "int64")
        y = ls.placeholder("y", (None, tp_train.LENGTH), "int64")
        loss = ls.nn.functional.cross_entropy(model(ids).reshape((-1, tp_train.VOCAB)), y.reshape((-1,)))
        step = opt.minimize(loss)
    dp = ls.parallel.DataParallel(g, zero=zero) if zero else None
    if load is not None:
        ls.load(load, model, opt)
    rows = mesh.batch_slice(tp_train.BATCH) if mesh is not None else slice(None)
    losses, memory = [], None
    for i, (ids_v, y_v) in enumerate(tp_train.batches(steps=STEPS)):
        feed = {ids: ids_v[rows], y: y_v[rows]}
        if i == 0:
            report = g.memory([loss, step], feed)
            value, memory = report.outputs[0], {"state_bytes": report.optimizer_state,
                                                "parameter_bytes": report.parameters}
        else:
            value, _ = g.run([loss, step], feed)
        losses.append(float(value))
    # a plan of another fetch set, compiled after the layout (ZeRO-3: its reads gather too)
    eval_loss = float(g.run(loss, {ids: ids_v[rows], y: y_v[rows]}))
    # a graph of the same model that reads a row-parallel bias on every member: under ZeRO x TP refused
    # on every member (members other than 0 left it to member 0), none going on alone
    with g:
        bias_read = (model.h[0].mlp.c_proj.bias * 2.0).sum()
    try:
        g.run(bias_read, {})
        bias_graph = ""
    except ls.Error as exc:
        bias_graph = str(exc)
    if save is not None:
        ls.save(save, model, opt)
    # what a read of a row-parallel bias gives outside `gathered_parameters()` (ZeRO x TP: TP members
    # other than 0 hold none of it)
    try:
        model.h[0].mlp.c_proj.bias.value
        left_read = ""
    except ls.Error as exc:
        left_read = str(exc)
    with dp.sync.gathered_parameters() if dp is not None else contextlib.nullcontext():  # ZeRO-3: whole
        if tp is not None:
            params = ls.parallel.gather_parameters(model, mesh)
        else:
            params = {n: p.value.clone() for n, p in model.named_parameters()}
    memory["eval_loss"], memory["left_read"], memory["bias_graph"] = eval_loss, left_read, bias_graph
    return np.array(losses), {n: v.numpy() for n, v in params.items()}, memory


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dp", type=int, default=2)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--zero", default="0,1,2,3")
    parser.add_argument("--optimizers", default="adamw", help="comma-separated; files of others: PREFIX.<name>.zero<N>")
    parser.add_argument("--save-zero", type=int, default=None)
    parser.add_argument("--save", default=None)
    parser.add_argument("--load-zero", default="2", help="comma-separated stages")
    parser.add_argument("--load", default=None)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    ls.distributed.init()
    mesh = ls.distributed.DeviceMesh(dp=args.dp, tp=args.tp)
    rank = ls.distributed.rank()
    for name in args.optimizers.split(","):
        prefix = args.out if name == "adamw" else f"{args.out}.{name}"
        for zero in (int(z) for z in args.zero.split(",")):
            save = args.save if zero == args.save_zero and name == "adamw" else None
            losses, params, memory = train(mesh, zero, save=save, optimizer=name)
            np.savez(f"{prefix}.zero{zero}.rank{rank}.npz", losses=losses, **memory, **params)
    for zero in (int(z) for z in args.load_zero.split(",")) if args.load is not None else ():
        losses, params, _ = train(mesh, zero, load=args.load)
        np.savez(f"{args.out}.load{zero}.rank{rank}.npz", losses=losses, **params)
    ls.distributed.shutdown()


if __name__ == "__main__":
    main()
