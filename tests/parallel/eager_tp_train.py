"""GPT-2 trained in eager mode under tensor (and sequence) parallelism; run under `luoshu launch` by
tests/parallel/test_eager_tp.py.

    luoshu launch -n 2 tests/parallel/eager_tp_train.py [--model gpt2|llama] --tp 2 [--sp] [--minimize] [--clip NORM]
        --out PREFIX

Every rank feeds the same global batches; rank r writes the losses and the full parameters
(all-gathered over its TP group) to PREFIX.rank<r>.npz. `train(...)` without a mesh is the
one-process reference.
"""

from __future__ import annotations

import argparse
import contextlib
import json

import numpy as np
import torch

import luoshu as ls
from luoshu.compiler import states
from luoshu.models.language import GPT2, GPTConfig, Llama, LlamaConfig

VOCAB, LENGTH, BATCH, STEPS = 64, 8, 4, 3


def batches(seed: int = 5):
    rng = np.random.default_rng(seed)
    for _ in range(STEPS):
        ids = rng.integers(0, VOCAB, (BATCH, LENGTH))
        yield ids, np.roll(ids, -1, axis=1)


def build(model: str):
    if model == "gpt2":
        return GPT2(GPTConfig(vocab_size=VOCAB, block_size=LENGTH, n_layer=2, n_head=4, n_embd=32))
    return Llama(
        LlamaConfig(vocab_size=VOCAB, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=LENGTH)
    )


def train(mesh=None, sequence_parallel: bool = False, minimize: bool = False, model_name: str = "gpt2",
          clip: float | None = None):
    """(losses, {name: full parameter}) after STEPS eager AdamW steps (SGD clipped to global norm `clip`)."""
    ls.manual_seed(7)
    model = build(model_name).to(dtype="float64")
    if mesh is not None:
        ls.parallel.parallelize(model, mesh, sequence_parallel=sequence_parallel)
    if clip is None:
        opt = ls.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    else:  # SGD: the clipping coefficient scales the step itself (Adam would all but cancel it)
        opt = ls.optim.SGD(model.parameters(), lr=0.5, max_grad_norm=clip)
    losses = []
    for ids_v, y_v in batches():
        ids, y = ls.tensor(ids_v, dtype="int64"), ls.tensor(y_v, dtype="int64")
        loss = ls.nn.functional.cross_entropy(model(ids).reshape((-1, VOCAB)), y.reshape((-1,)))
        if minimize:
            opt.minimize(loss)
        else:
            opt.zero_grad()
            loss.backward()
            opt.step()
        losses.append(float(loss.value))
    if mesh is not None:
        params = ls.parallel.gather_parameters(model, mesh)
        states.set_default(None)
    else:
        params = {n: p.value.clone() for n, p in model.named_parameters()}
    return np.array(losses), {n: v.numpy() for n, v in params.items()}


COMM = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")


@contextlib.contextmanager
def _counting(counts: dict, phase: list):
    """Counts the collectives run (on activations: 2-D or more) into counts[phase[0]], by kind (a max
    all-reduce as "all_reduce_max")."""
    from luoshu.core.op import get_opdef

    originals = {name: get_opdef(name).compute for name in COMM}

    def counting(name):
        def compute(x, *args, **attrs):
            if x.ndim >= 2:
                reduce = attrs.get("reduce", "sum")
                kind = name if reduce in ("sum", "mean") else f"{name}_{reduce}"
                counts[phase[0]][kind] = counts[phase[0]].get(kind, 0) + 1
            return originals[name](x, *args, **attrs)

        return compute

    for name in COMM:
        get_opdef(name).compute = counting(name)
    try:
        yield
    finally:
        for name in COMM:
            get_opdef(name).compute = originals[name]
        states.set_default(None)


def block_collectives(mesh, sequence_parallel: bool) -> dict:
    """The collectives (on activations) one eager GPT-2 block's forward and backward run under `mesh`."""
    from luoshu.models.language import GPTBlock

    ls.manual_seed(1)
    block = GPTBlock(GPTConfig(vocab_size=VOCAB, block_size=LENGTH, n_layer=1, n_head=4, n_embd=32))
    block.to(dtype="float64")
    ls.parallel.parallelize(block, mesh, sequence_parallel=sequence_parallel)
    counts: dict = {"forward": {}, "backward": {}}
    phase = ["forward"]
    with _counting(counts, phase):

        def global_tensor(full):  # with sequence parallelism the activations between blocks hold the sequence split
            if not sequence_parallel:
                return ls.Tensor.from_value(full, requires_grad=True)
            t = ls.Tensor.from_value(full.chunk(mesh.tp, 1)[mesh.index("tp")].clone(), requires_grad=True)
            t.shape, t.ds = tuple(full.shape), [ls.core.dstates.DStates(mesh.tp, {1: mesh.tp})]
            return t

        x = global_tensor(torch.randn(BATCH, LENGTH, 32, dtype=torch.float64))
        out = block(x)
        phase[0] = "backward"
        seed = global_tensor(torch.randn(BATCH, LENGTH, 32, dtype=torch.float64))
        ls.gradients(out, block.parameters() + [x], grad_ys=seed)
    return counts


def llama_step_collectives(mesh, sequence_parallel: bool = False) -> dict:
    """The collectives (on activations) of one eager LLaMA loss's forward and backward under `mesh`."""
    ls.manual_seed(1)
    model = build("llama").to(dtype="float64")
    ls.parallel.parallelize(model, mesh, sequence_parallel=sequence_parallel)
    counts: dict = {"forward": {}, "backward": {}}
    phase = ["forward"]
    ids_v, y_v = next(batches())
    with _counting(counts, phase):
        ids, y = ls.tensor(ids_v, dtype="int64"), ls.tensor(y_v, dtype="int64")
        loss = ls.nn.functional.cross_entropy(model(ids).reshape((-1, VOCAB)), y.reshape((-1,)))
        phase[0] = "backward"
        loss.backward()
    return counts


def llama_graph_collectives(index: int, tp: int = 2, sequence_parallel: bool = False) -> dict:
    """The collectives (on activations, as `_counting` counts them) of the define-and-run LLaMA step
    (loss, `minimize`) on TP member `index`: the states pass alone, in one process (nothing runs);
    what `llama_step_collectives`' eager step is compared with."""
    from luoshu.compiler.passes import prune

    ls.manual_seed(1)
    model = build("llama").to(dtype="float64")
    ls.parallel.parallelize(model, ls.distributed.DeviceMesh(tp=tp, world_size=tp), sequence_parallel=sequence_parallel,
                            broadcast=False)
    try:
        opt = ls.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        with ls.Graph() as g:
            ids = ls.placeholder("ids", (BATCH, LENGTH), "int64")
            y = ls.placeholder("y", (BATCH, LENGTH), "int64")
            loss = ls.nn.functional.cross_entropy(model(ids).reshape((-1, VOCAB)), y.reshape((-1,)))
            step = opt.minimize(loss)
        strategy = states.Strategy(tuple(range(tp)), index, sequence_parallel)

        def count(fetches) -> dict:
            found: dict = {}
            for op in states.localize_graph(prune(g, fetches), fetches, strategy).graph.ops:
                if op.opdef.name in COMM and len(op.inputs[0].shape) >= 2:
                    reduce = op.attrs.get("reduce", "sum")
                    kind = op.opdef.name if reduce in ("sum", "mean") else f"{op.opdef.name}_{reduce}"
                    found[kind] = found.get(kind, 0) + 1
            return found

        forward, both = count([loss]), count([loss, step])
    finally:
        states.set_default(None)
    backward = {k: n - forward.get(k, 0) for k, n in both.items() if n - forward.get(k, 0)}
    return {"forward": forward, "backward": backward}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="gpt2")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--sp", action="store_true")
    parser.add_argument("--minimize", action="store_true")
    parser.add_argument("--clip", type=float, default=None)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    ls.distributed.init()
    mesh = ls.distributed.DeviceMesh(tp=args.tp)
    losses, params = train(mesh, args.sp, args.minimize, args.model, args.clip)
    np.savez(f"{args.out}.rank{ls.distributed.rank()}.npz", losses=losses, **params)
    with open(f"{args.out}.rank{ls.distributed.rank()}.json", "w") as f:
        counts = block_collectives(mesh, args.sp)
        if args.model == "llama":
            counts["llama"] = llama_step_collectives(mesh, args.sp)
        json.dump(counts, f)
    ls.distributed.shutdown()


if __name__ == "__main__":
    main()
