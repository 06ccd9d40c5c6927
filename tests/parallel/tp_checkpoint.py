"""Saves or loads a GPT-2 checkpoint under a DeviceMesh; run under `luoshu launch` by the tests.

    luoshu launch -n 4 tests/parallel/tp_checkpoint.py save --dp 2 --tp 2 --path CKPT
    luoshu launch -n 2 tests/parallel/tp_checkpoint.py load --tp 2 --path CKPT --out PREFIX

`save` trains two AdamW steps and saves with `ls.save`; `load` loads (`ls.load`) into its own layout and writes the
full parameters and optimizer state (gathered over its TP group) to PREFIX.rank<r>.npz.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import luoshu as ls
from luoshu.parallel.checkpoint import _full_tensors
from tests.parallel import tp_train


def full_state(model, opt) -> dict:
    out = {f"param.{n}": p.value.clone().numpy() for n, p in model.named_parameters()}
    index = {id(p): i for i, p in enumerate(opt.parameters())}
    for n, p in model.named_parameters():
        st = opt._state[index[id(p)]]
        for k in sorted(k for k in (st or {}) if k != "step"):
            out[f"state.{n}.{k}"] = st[k].clone().numpy()
        if st is not None:
            out[f"step.{n}"] = np.array(float(st["step"]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("save", "load"))
    parser.add_argument("--dp", type=int, default=1)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--path", required=True)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    ls.distributed.init()
    mesh = ls.distributed.DeviceMesh(dp=args.dp, tp=args.tp, pp=args.pp)
    ls.manual_seed(11)
    model = tp_train.build("gpt2").to(dtype="float64")
    ls.parallel.parallelize(model, mesh)
    opt = ls.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    if args.mode == "save":
        with ls.Graph() as g:
            ids = ls.placeholder("ids", (None, tp_train.LENGTH), "int64")
            y = ls.placeholder("y", (None, tp_train.LENGTH), "int64")
            loss = ls.nn.functional.cross_entropy(model(ids).reshape((-1, tp_train.VOCAB)), y.reshape((-1,)))
            step = opt.minimize(loss)
        rows = mesh.batch_slice(tp_train.BATCH)
        for i, (ids_v, y_v) in enumerate(tp_train.batches()):
            if i < 2:
                g.run([loss, step], {ids: ids_v[rows], y: y_v[rows]})
        ls.save(args.path, model, opt)  # a collective under TP: full tensors written by rank 0
    else:
        ls.load(args.path, model, opt)
        with _full_tensors(model, opt, mesh.group("tp").ranks):
            state = full_state(model, opt)
        np.savez(f"{args.out}.rank{ls.distributed.rank()}.npz", **state)
    ls.distributed.shutdown()


if __name__ == "__main__":
    main()
