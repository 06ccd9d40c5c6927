"""Pipeline-parallel GPT-2 training step: luoshu's pipeline vs `torch.distributed.pipelining`.

Same model (GPT-2 blocks as in bench_tp.py; float32), same stages (the layers split evenly,
embeddings on the first stage, final norm, head and loss on the last), same micro-batches,
both with GPT-2's tied embedding: the head on the last stage is the token embedding of the
first, so each step both sum that weight's gradient over the first and last stage (torch:
a copy of the weight on each, its gradient all-reduced over the two after the schedule,
as Megatron's embedding group does; luoshu: the pipeline's shared-parameter all-reduce),
GPipe and 1F1B, Gloo on CPU, both in the same processes with repeats interleaved; median
step time (all micro-batches forward and backward, then AdamW) after warm-up. luoshu's
bubble fraction is measured per stage as 1 - (time in the stage's plans) / (step time),
averaged over the stages, next to the ideal (pp-1)/(m+pp-1) (time a recv waits for its
peer counts as idle). Both keep each micro-batch's activations from its forward to its
backward (luoshu's backward plan reads the forward's saved values; nothing is recomputed).

    .venv/bin/python benchmarks/bench_pp.py [--procs 2 4] [--layers 4] [--width 256] [--length 128] [--batch 8]
        [--micro-batches 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.distributed as torch_dist
from _relaunch import run_per_process_count

import luoshu as ls
from luoshu.models.language import GPT2, GPTConfig

sys.path.insert(0, os.path.dirname(__file__))
from bench_tp import VOCAB, TorchBlock  # noqa: E402


class TorchStage(torch.nn.Module):
    """Layers [first, last) of the torch GPT, with the embeddings on stage 0 and the head on the last."""

    def __init__(
        self, layers: int, width: int, heads: int, length: int, first: int, last: int, pp_stage: int, stages: int
    ):
        super().__init__()
        self.first_stage, self.last_stage = pp_stage == 0, pp_stage == stages - 1
        if self.first_stage:
            self.wte, self.wpe = torch.nn.Embedding(VOCAB, width), torch.nn.Embedding(length, width)
        self.h = torch.nn.ModuleList(TorchBlock(width, heads) for _ in range(last - first))
        if self.last_stage:
            self.ln_f, self.head = torch.nn.LayerNorm(width), torch.nn.Linear(width, VOCAB, bias=False)

    def forward(self, x):
        if self.first_stage:
            x = self.wte(x) + self.wpe.weight[: x.shape[1]]
        for block in self.h:
            x = block(x)
        return self.head(self.ln_f(x)) if self.last_stage else x


def _loss(logits, y):
    return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))


def _compare(sched, args, pp, rank, ids_v, y_v):
    """(schedule, luoshu step s, torch step s, luoshu's mean bubble fraction) for one schedule."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    heads, length, batch, m = args.width // 64, args.length, args.batch, args.micro_batches
    per = args.layers // pp
    first, last = rank * per, (rank + 1) * per
    ls.manual_seed(0)
    model = GPT2(GPTConfig(vocab_size=VOCAB, block_size=length, n_layer=args.layers, n_head=heads, n_embd=args.width))
    opt = ls.optim.AdamW(model.parameters(), lr=1e-4)
    mesh = ls.distributed.DeviceMesh(pp=pp)
    pipe = ls.parallel.pipeline(
        model, mesh, stages=[f"h.{s * per}" for s in range(pp)], micro_batches=m, schedule=sched
    )
    pipe.compile(
        [("ids", (None, length), "int64")],
        [("y", (None, length), "int64")],
        lambda logits, y: ls.nn.functional.cross_entropy(logits.reshape((-1, VOCAB)), y.reshape((-1,))),
        opt,
    )

    torch.manual_seed(0)
    stage_mod = TorchStage(args.layers, args.width, heads, length, first, last, rank, pp)
    example = (
        torch.zeros((batch // m, length), dtype=torch.int64)
        if rank == 0
        else torch.zeros((batch // m, length, args.width))
    )
    stage = PipelineStage(stage_mod, rank, pp, torch.device("cpu"), input_args=example)
    schedule = (ScheduleGPipe if sched == "gpipe" else Schedule1F1B)(stage, m, loss_fn=_loss)
    # GPT-2's tied embedding: one weight on the first stage (wte) and the last (head), the same at
    # the start and its gradient summed over the two every step (new_group: every rank calls it)
    tie_group = torch_dist.new_group([0, pp - 1])
    tied = stage_mod.wte.weight if rank == 0 else stage_mod.head.weight if rank == pp - 1 else None
    if tied is not None:
        with torch.no_grad():
            torch_dist.broadcast(tied, 0, group=tie_group)
    topt = torch.optim.AdamW(stage_mod.parameters(), lr=1e-4, foreach=True)
    tids, ty = torch.from_numpy(ids_v), torch.from_numpy(y_v)

    def torch_step():
        topt.zero_grad(set_to_none=True)
        if rank == 0:
            schedule.step(tids)
        elif rank == pp - 1:
            schedule.step(target=ty, losses=[])
        else:
            schedule.step()
        if tied is not None:
            torch_dist.all_reduce(tied.grad, group=tie_group)
        topt.step()

    busy = []

    def luoshu_step():
        pipe.step([ids_v], [y_v])
        busy.append(pipe.busy_s)

    for _ in range(2):
        torch_step()
        luoshu_step()
    busy.clear()
    lt, tt, lc, tc = [], [], [], []
    for _ in range(args.repeats):
        torch_dist.barrier()
        start, cpu = time.perf_counter(), time.process_time()
        luoshu_step()
        lt.append(time.perf_counter() - start)
        lc.append(time.process_time() - cpu)
        torch_dist.barrier()
        start, cpu = time.perf_counter(), time.process_time()
        torch_step()
        tt.append(time.perf_counter() - start)
        tc.append(time.process_time() - cpu)
    t_l, t_t = statistics.median(lt), statistics.median(tt)
    # the bubble and the CPU seconds of a step (this process and its Gloo threads), summed over the ranks:
    # the CPU time does not depend on how busy the machine is, the wall time does
    figures = torch.tensor([1.0 - statistics.median(busy) / t_l, statistics.median(lc), statistics.median(tc)])
    torch_dist.all_reduce(figures)
    return sched, t_l, t_t, float(figures[0]) / pp, float(figures[1]), float(figures[2])


def worker(args) -> None:
    torch.set_num_threads(1)
    ls.distributed.init()
    pp, rank = ls.distributed.world_size(), ls.distributed.rank()
    m = args.micro_batches
    rng = np.random.default_rng(0)
    ids_v = rng.integers(0, VOCAB, (args.batch, args.length))
    y_v = np.roll(ids_v, -1, axis=1)
    rows = [_compare(sched, args, pp, rank, ids_v, y_v) for sched in ("gpipe", "1f1b")]
    if rank == 0:
        ideal = (pp - 1) / (m + pp - 1)
        for sched, t_l, t_t, bubble, c_l, c_t in rows:
            print(
                f"pp={pp} {sched} layers={args.layers} width={args.width} length={args.length} batch={args.batch} "
                f"micro-batches={m}: luoshu {t_l * 1e3:.0f} ms/step, torch.distributed.pipelining "
                f"{t_t * 1e3:.0f} ms/step, ratio (torch/luoshu) {t_t / t_l:.2f}; luoshu bubble {bubble:.2f} "
                f"(ideal (pp-1)/(m+pp-1) = {ideal:.2f}); CPU s/step over the ranks: luoshu {c_l * 1e3:.0f} ms, "
                f"torch {c_t * 1e3:.0f} ms (ratio {c_t / c_l:.2f})",
                flush=True,
            )
    torch_dist.barrier()
    sys.stdout.flush()
    # torch.distributed.pipelining can leave point-to-point work that aborts the process group's
    # teardown (SIGABRT at exit); the figures are out, so leave without it.
    os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--procs", type=int, nargs="+", default=[2])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if "RANK" in os.environ:
        worker(args)
        return
    run_per_process_count(__file__, args)


if __name__ == "__main__":
    main()
