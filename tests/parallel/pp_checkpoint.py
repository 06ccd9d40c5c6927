"""`ls.save` / `ls.load` called directly in a pipeline job; run under `luoshu launch` by the tests.

    luoshu launch -n N tests/parallel/pp_checkpoint.py --pp P --tp T --dp D --zero S --resume CKPT --out DIR [--bad BAD]

Trains GPT-2 (float64) for two steps through `pipeline` and saves with `ls.save` to DIR/trained
(a collective: the stages are gathered, rank 0 writes full tensors); its stage's parameters go
to DIR/stage.rank<r>.npz. Then a fresh model (other initial values) under a new pipeline loads
CKPT with `ls.load`, trains the third batch and saves to DIR/resumed; the optimizer state bytes
the rank holds then, and those of a fresh pipeline after one step, go to
DIR/state_bytes.rank<r>.json. `--zero S` shards each stage over its DP group (ZeRO stage S) in
both pipelines. `--bad BAD`: after that step, `ls.load` of the bad checkpoint BAD must raise
`CheckpointError` on every rank and leave the rank's parameters (its shards) and optimizer state
bit for bit as they were (DIR/bad.rank<r>.json says what was refused); before that, a second
`ls.save` to DIR/trained whose write fails on rank 0 must raise on every rank and keep DIR/trained
(DIR/failed_save.rank<r>.json says what each rank raised).
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import numpy as np
import torch

import luoshu as ls
from tests.parallel import pp_train


def pipelined(mesh, seed: int, zero: int = 0):
    ls.manual_seed(seed)
    model = pp_train.build("gpt2", 2)
    if mesh.tp > 1:
        ls.parallel.parallelize(model, mesh)
    opt = ls.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    pipe = ls.parallel.pipeline(model, mesh, micro_batches=2, zero=zero)
    pipe.compile(
        [("ids", (None, pp_train.LENGTH), "int64")], [("y", (None, pp_train.LENGTH), "int64")], pp_train.loss_fn, opt
    )
    return model, opt, pipe


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--dp", type=int, default=1)
    parser.add_argument("--zero", type=int, default=0)
    parser.add_argument("--resume", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--bad", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    ls.distributed.init()
    mesh = ls.distributed.DeviceMesh(dp=args.dp, tp=args.tp, pp=args.pp)
    out = Path(args.out)
    data = list(pp_train.batches())

    model, opt, pipe = pipelined(mesh, 11, args.zero)
    for ids, y in data[:2]:
        pipe.step([ids], [y])
    names = {id(p): n for n, p in model.named_parameters()}
    with whole(pipe):  # before the save gathers the other stages here
        full = ls.parallel.gather_parameters(model, mesh)
    stage = {names[id(p)]: full[names[id(p)]].numpy() for p in pipe.params}
    np.savez(out / f"stage.rank{ls.distributed.rank()}.npz", **stage)
    ls.save(out / "trained", model, opt)
    if args.bad:  # a save that fails on rank 0 (the disk full) raises on every rank and keeps "trained"
        failed_save(out, model, opt)

    model, opt, pipe = pipelined(mesh, 3, args.zero)
    ls.load(args.resume, model, opt)  # every rank reads the whole package; each trains its stage
    pipe.step(*[[a] for a in data[2]])
    loaded = state_bytes(pipe)
    if args.bad:
        before = held(model, pipe)
        try:
            ls.load(args.bad, model, opt)
        except ls.CheckpointError as exc:
            refused = str(exc)
        else:
            refused = None
        after = held(model, pipe)
        unchanged = before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
        (out / f"bad.rank{ls.distributed.rank()}.json").write_text(
            json.dumps({"refused": refused, "unchanged": unchanged, "held": len(before)}))
    ls.save(out / "resumed", model, opt)

    _, _, fresh = pipelined(mesh, 3, args.zero)
    fresh.step(*[[a] for a in data[2]])
    (out / f"state_bytes.rank{ls.distributed.rank()}.json").write_text(
        json.dumps({"loaded": loaded, "fresh": state_bytes(fresh)}))
    ls.distributed.shutdown()


def failed_save(out: Path, model, opt) -> None:
    import luoshu.checkpoint as package

    def full(*args, **kwargs):
        raise OSError("disk full")

    real = package.save_file
    if ls.distributed.rank() == 0:
        package.save_file = full
    try:
        ls.save(out / "trained", model, opt)
    except Exception as exc:  # noqa: BLE001 - what each rank raised is the result
        raised = f"{type(exc).__name__}: {exc}"
    else:
        raised = None
    finally:
        package.save_file = real
    (out / f"failed_save.rank{ls.distributed.rank()}.json").write_text(json.dumps({"raised": raised}))


def whole(pipe):
    """ZeRO-3: a context in which the stage's parameters are whole (else nothing to do)."""
    return pipe.zero.gathered_parameters() if pipe.zero is not None else contextlib.nullcontext()


def held(model, pipe) -> dict:
    """Copies of what this rank holds: its parameters' values and shards, and its optimizers' state."""
    values = {f"param.{n}": p._value.clone() for n, p in model.named_parameters() if p._value.device.type != "meta"}
    for k, o in enumerate(pipe.optimizers()):
        values.update((f"opt{k}.{n}", t.clone()) for n, t in o.state_dict()["tensors"].items())
        values.update((f"opt{k}.param{j}", p._value.clone()) for j, p in enumerate(o.parameters())
                      if p._value.device.type != "meta")
    return values


def state_bytes(pipe) -> int:
    """The bytes of optimizer state this rank holds (every optimizer it steps)."""
    return sum(t.numel() * t.element_size() for o in pipe.optimizers() for t in o.state_dict()["tensors"].values())


if __name__ == "__main__":
    main()
