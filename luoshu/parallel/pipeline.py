"""`pipeline`: pipeline parallelism over the mesh's pp axis, micro-batches run by a GPipe or 1F1B schedule.

The model's repeated layers (the first `ModuleList`: GPT-2's `h`, LLaMA's and BERT's
`layers`) are cut into `pp` stages: balanced by parameter count (`stages=None`) or at the
module names given (the first layer of each stage). What runs before the first layer
(embeddings) joins the first stage and what runs after the last (final norm, head, the
loss) the last one; the model code does not change: each stage's graph is traced from the
model's own forward, with the stage's first layer reading a placeholder (the activation
received from the previous stage) and everything the stage does not need pruned away.

Each rank compiles its stage's forward and backward plans once; the backward plan
recomputes the stage's forward from the saved stage input (full activation
recomputation), so a stage keeps one input per micro-batch in flight, counted by the
runtime's `ActivationLedger` (1F1B: at most `pp`). Activations and their gradients
travel between neighbouring stages point to point (torch.distributed send/recv issued
by this runtime, not comm ops of the graph). Gradients accumulate over the micro-batches
and are scaled once (1/M: each micro-batch's loss is a mean over its rows); a table's
sparse gradient stays rows (so a lazy optimizer touches the rows one whole batch would);
parameters used by several stages (GPT-2's tied embedding) sum their gradients over
those stages; the DP axis averages them; then the optimizer applies one update. A stage
may be tensor parallel (`parallelize` the model first): its graph compiles through the
states pass, its gradients are fetched as this rank's blocks.

Data convention: every rank passes the same global batch to `step`; the first stage
reads only the inputs and the last only the labels (`feeds_of` says what a rank needs),
each rank takes its DP share (`mesh.batch_slice`) and cuts it into M micro-batches.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch
import torch.distributed as torch_dist

from luoshu.compiler import states
from luoshu.core.errors import Error
from luoshu.core.graph import Graph
from luoshu.core.graph import placeholder as make_placeholder
from luoshu.core.op import topological_ops
from luoshu.core.tensor import IndexedSlices
from luoshu.distributed import env
from luoshu.distributed.mesh import DeviceMesh
from luoshu.nn.container import ModuleList
from luoshu.nn.module import Module
from luoshu.optim.optimizer import Optimizer
from luoshu.runtime.pipeline import SCHEDULES, ActivationLedger, schedule


class PipelineError(Error):
    """A pipeline that cannot be built or run as asked (names the stage, module or sizes)."""


def _layers(model: Module) -> tuple[str, ModuleList]:
    for name, m in model.named_modules():
        if isinstance(m, ModuleList) and len(m) > 0:
            return name, m
    raise PipelineError(f"pipeline: {type(model).__name__} has no ModuleList of layers to cut into stages")


def _balance(sizes: list[int], parts: int) -> list[int]:
    """The first layer of each of `parts` contiguous groups with about equal sums (greedy on prefix sums)."""
    total, starts, acc = sum(sizes), [0], 0
    for i, s in enumerate(sizes[:-1]):
        acc += s
        if len(starts) < parts and acc >= total * len(starts) / parts and len(sizes) - (i + 1) >= parts - len(starts):
            starts.append(i + 1)
    while len(starts) < parts:  # too few layers passed a boundary: take the last ones one by one
        starts.append(len(sizes) - (parts - len(starts)))
    return starts


class Pipeline:
    """One rank's stage of a pipeline-parallel model; `compile` builds its plans, `step` trains one batch."""

    def __init__(self, model: Module, mesh: DeviceMesh, stages=None, micro_batches: int = 1, schedule: str = "1f1b"):
        if not isinstance(mesh, DeviceMesh):
            raise PipelineError(f"pipeline: mesh must be a DeviceMesh, found {type(mesh).__name__}")
        if schedule not in SCHEDULES:
            raise PipelineError(f"pipeline: unknown schedule {schedule!r}; the schedules are {SCHEDULES}")
        if isinstance(micro_batches, bool) or not isinstance(micro_batches, int) or micro_batches < 1:
            raise PipelineError(f"pipeline: micro_batches must be a positive int, found {micro_batches!r}")
        prefix, layers = _layers(model)
        pp = mesh.pp
        if len(layers) < pp:
            raise PipelineError(f"pipeline: {len(layers)} layers in {prefix!r} cannot fill {pp} stages")
        names = [f"{prefix}.{i}" for i in range(len(layers))]
        if stages is None:
            sizes = [sum(p.numel() for p in layer.parameters()) for layer in layers]
            starts = _balance(sizes, pp)
        else:
            stages = list(stages)
            if len(stages) != pp:
                raise PipelineError(f"pipeline: stages names {len(stages)} modules, one per stage of pp={pp} expected")
            for s in stages:
                if s not in names:
                    raise PipelineError(
                        f"pipeline: stages names unknown module {s!r}; the layers are {names[0]} .. {names[-1]}"
                    )
            starts = [names.index(s) for s in stages]
            if starts[0] != 0 or starts != sorted(set(starts)):
                raise PipelineError(f"pipeline: stages {stages} must start at {names[0]} and increase")
        self.model, self.mesh, self.micro_batches, self.schedule_name = model, mesh, micro_batches, schedule
        self.stage, self.stages = mesh.index("pp"), pp
        ends = starts[1:] + [len(layers)]
        self.layers = layers
        self.first, self.last = starts[self.stage], ends[self.stage] - 1
        self.boundaries = list(zip(starts, ends))
        self.ledger = ActivationLedger()
        self._compiled = False

    # --- building --------------------------------------------------------------------
    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.stages - 1

    def feeds_of(self) -> tuple[bool, bool]:
        """(needs the inputs, needs the labels) for this rank's stage."""
        return self.is_first, self.is_last

    def compile(self, inputs: list[tuple], labels: list[tuple], loss_fn, optimizer: Optimizer) -> None:
        """Traces this stage's graph. `inputs` / `labels`: (name, shape, dtype) of the model's
        inputs and the loss's extra arguments (batch dim None); `loss_fn(model_output, *labels)`."""
        if not isinstance(optimizer, Optimizer):
            raise PipelineError(
                f"pipeline.compile: optimizer must be a luoshu.optim.Optimizer, found {type(optimizer).__name__}"
            )
        self.optimizer = optimizer
        g = Graph(name=f"pipeline-stage{self.stage}")
        holder: dict = {}
        first, last = self.layers[self.first], self.layers[self.last]
        originals = (first.forward, last.forward)

        def first_forward(x, *args, **kwargs):
            if not self.is_first:
                holder["in"] = make_placeholder("stage_input", x.shape, x.dtype, x.device)
                x = holder["in"]
            out = originals[0](x, *args, **kwargs)
            if first is last:
                holder["out"] = out
            return out

        def last_forward(x, *args, **kwargs):
            out = originals[1](x, *args, **kwargs)
            holder["out"] = out
            return out

        object.__setattr__(first, "forward", first_forward)
        if last is not first:
            object.__setattr__(last, "forward", last_forward)
        try:
            with g:
                self.input_phs = [make_placeholder(n, s, d) for n, s, d in inputs]
                self.label_phs = [make_placeholder(n, s, d) for n, s, d in labels]
                output = self.model(*self.input_phs)
                out = loss_fn(output, *self.label_phs) if self.is_last else holder["out"]
        finally:
            object.__delattr__(first, "forward")
            if last is not first:
                object.__delattr__(last, "forward")
        from luoshu.core.autodiff import gradients

        self.graph, self.out = g, out
        self.stage_input = holder.get("in")
        used = {id(t) for op in topological_ops([out], g) for t in op.inputs}
        params = optimizer.parameters()
        self.param_index = [i for i, p in enumerate(params) if id(p) in used]
        self.params = [params[i] for i in self.param_index]
        with g:
            self.grad_out = None if self.is_last else make_placeholder("stage_output_grad", out.shape, out.dtype)
            xs = self.params + ([self.stage_input] if self.stage_input is not None else [])
            grads = gradients(out, xs, grad_ys=None if self.is_last else self.grad_out)
        self.param_grads = list(grads[: len(self.params)])
        self.input_grad = grads[-1] if self.stage_input is not None else None
        for p, gr in zip(self.params, self.param_grads):
            if gr is None:
                raise PipelineError(f"pipeline: parameter {p.name} of stage {self.stage} gets no gradient")
        # A table's sparse gradient stays rows (indices, values) over the micro-batches, so a lazy
        # optimizer touches the rows one whole batch would (a dense sum would touch every row).
        self._sparse = [isinstance(gr, IndexedSlices) for gr in self.param_grads]
        self._grad_fetch = [
            t for gr, sp in zip(self.param_grads, self._sparse) for t in ((gr.indices, gr.values) if sp else (gr,))
        ]
        strategy = states.default()
        if strategy is not None and any(p.ds and not p.ds[0].is_pure_duplicate() for p in self.params):
            # tensor parallel inside the stage: gradients stay this rank's blocks, activations go whole
            wanted = {
                id(gr): p.ds[0] for p, gr, sp in zip(self.params, self.param_grads, self._sparse) if p.ds and not sp
            }
            states.attach(g, dataclasses.replace(strategy, fetch_states=wanted))
        self._shared = self._shared_parameters(used)
        self._compiled = True

    def _shared_parameters(self, used: set) -> list[tuple[int, tuple]]:
        """(position in self.params, pp ranks using it) of parameters several stages use: each
        stage tells the others which parameters it uses (a collective over the pp group)."""
        if self.stages == 1 or not env.is_distributed():
            return []
        mine = np.zeros(len(self.optimizer.parameters()), np.int64)
        mine[self.param_index] = 1
        everyone = [torch.zeros(len(mine), dtype=torch.int64) for _ in range(self.stages)]
        torch_dist.all_gather(everyone, torch.from_numpy(mine), group=self.mesh.process_group("pp"))
        pp_ranks = self.mesh.group("pp").ranks
        shared = []
        for pos, i in enumerate(self.param_index):
            users = tuple(pp_ranks[s] for s in range(self.stages) if int(everyone[s][i]))
            if len(users) > 1:
                env.process_group(users)  # created in the same order on every user
                shared.append((pos, users))
        return shared

    # --- running ---------------------------------------------------------------------
    def _neighbour(self, delta: int) -> int:
        return self.mesh.group("pp").ranks[self.stage + delta]

    def step(self, inputs: list, labels: list) -> float | None:
        """Trains on one global batch (every rank passes the same arrays); returns the mean loss on
        the last stage (None elsewhere). One optimizer update after all micro-batches."""
        if not self._compiled:
            raise PipelineError("pipeline.step: call compile(...) first")
        rows = len(inputs[0]) if inputs else len(labels[0])
        share = self.mesh.batch_slice(rows)
        local = share.stop - share.start
        if local % self.micro_batches:
            raise PipelineError(
                f"pipeline: the batch share of {local} rows (global {rows}, dp={self.mesh.dp}) does "
                f"not divide into {self.micro_batches} micro-batches"
            )
        size = local // self.micro_batches

        def micro(arrays, m):
            return [np.asarray(a)[share][m * size : (m + 1) * size] for a in arrays]

        saved, pending, losses = {}, [], []
        accum = [None] * len(self.params)
        shape = None if self.is_first else (size,) + tuple(self.stage_input.shape[1:])
        out_shape = None if self.is_last else (size,) + tuple(self.out.shape[1:])
        dtype = torch.float64 if self.out.dtype == "float64" else torch.float32
        self.ledger = ActivationLedger()
        self.busy_s = 0.0  # time in this stage's plans (the rest of a step is waiting: the bubble)
        for kind, m in schedule(self.schedule_name, self.stage, self.stages, self.micro_batches):
            feed = {}
            if self.is_first:
                feed.update(zip(self.input_phs, micro(inputs, m)))
            if self.is_last:
                feed.update(zip(self.label_phs, micro(labels, m)))
            if kind == "F":
                if not self.is_first:
                    buf = torch.empty(shape, dtype=dtype)
                    torch_dist.recv(buf, self._neighbour(-1), tag=2 * m)
                    feed[self.stage_input] = buf.numpy()
                saved[m] = feed
                self.ledger.saved(m)
                start = time.perf_counter()
                value = self.graph.run(self.out, feed)
                self.busy_s += time.perf_counter() - start
                if self.is_last:
                    losses.append(float(value))
                else:
                    t = torch.from_numpy(np.ascontiguousarray(value))
                    pending.append((torch_dist.isend(t, self._neighbour(1), tag=2 * m), t))
            else:
                feed = saved.pop(m)
                if not self.is_last:
                    gbuf = torch.empty(out_shape, dtype=dtype)
                    torch_dist.recv(gbuf, self._neighbour(1), tag=2 * m + 1)
                    feed[self.grad_out] = gbuf.numpy()
                fetch = self._grad_fetch + ([self.input_grad] if self.input_grad is not None else [])
                start = time.perf_counter()
                values = self.graph.run(fetch, feed)
                self.busy_s += time.perf_counter() - start
                self.ledger.freed(m)
                pos = 0
                for k, sparse in enumerate(self._sparse):
                    if sparse:
                        rows = (
                            torch.from_numpy(np.asarray(values[pos])),
                            torch.from_numpy(np.asarray(values[pos + 1])),
                        )
                        accum[k] = [rows] if accum[k] is None else accum[k] + [rows]
                        pos += 2
                        continue
                    v = torch.from_numpy(np.asarray(values[pos]))
                    accum[k] = v.clone() if accum[k] is None else accum[k].add_(v)
                    pos += 1
                if self.input_grad is not None:
                    t = torch.from_numpy(np.ascontiguousarray(values[-1]))
                    pending.append((torch_dist.isend(t, self._neighbour(-1), tag=2 * m + 1), t))
        for work, _ in pending:
            work.wait()
        self._apply(accum)
        return float(np.mean(losses)) if losses else None

    def _apply(self, accum: list) -> None:
        m, dp = self.micro_batches, self.mesh.dp
        grads = []
        for k, acc in enumerate(accum):
            if not self._sparse[k]:
                grads.append(acc.div_(m))  # the mean over micro-batches: scaled once
                continue
            rows = torch.cat([i for i, _ in acc])
            values = torch.cat([v for _, v in acc]).div_(m)
            if dp > 1 and env.is_distributed():
                rows, values = self._gather_rows(rows, values)
                values.div_(dp)
            p = self.params[k]
            if p.ds and not p.ds[0].is_pure_duplicate():  # a row-split table keeps its own rows
                local = p._value.shape[0]
                start = states.default().index * local
                keep = (rows >= start) & (rows < start + local)
                rows, values = rows[keep] - start, values[keep]
            grads.append((rows, values))
        for pos, users in self._shared:
            if self._sparse[pos]:
                rows, values = grads[pos]
                grads[pos] = torch.zeros_like(self.params[pos]._value).index_add_(0, rows, values)
            torch_dist.all_reduce(grads[pos], group=env.process_group(users))
        if dp > 1 and env.is_distributed():
            pg = self.mesh.process_group("dp")
            for k, g in enumerate(grads):
                if not self._sparse[k] or isinstance(g, torch.Tensor):
                    torch_dist.all_reduce(g, group=pg)
                    g.div_(dp)
        self.optimizer.apply_gradients(list(zip(self.param_index, grads)))

    def _gather_rows(self, rows: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every DP peer's sparse rows (unequal counts), in DP order."""
        pg, dp = self.mesh.process_group("dp"), self.mesh.dp
        counts = [torch.zeros(1, dtype=torch.int64) for _ in range(dp)]
        torch_dist.all_gather(counts, torch.tensor([rows.numel()]), group=pg)
        longest = int(max(c.item() for c in counts))
        pad = longest - rows.numel()
        rows_p = torch.cat([rows, rows.new_zeros(pad)])
        values_p = torch.cat([values, values.new_zeros((pad,) + tuple(values.shape[1:]))])
        all_rows = [torch.empty_like(rows_p) for _ in range(dp)]
        all_values = [torch.empty_like(values_p) for _ in range(dp)]
        torch_dist.all_gather(all_rows, rows_p, group=pg)
        torch_dist.all_gather(all_values, values_p, group=pg)
        n = [int(c.item()) for c in counts]
        return (torch.cat([r[:c] for r, c in zip(all_rows, n)]), torch.cat([v[:c] for v, c in zip(all_values, n)]))


def pipeline(model: Module, mesh: DeviceMesh, stages=None, micro_batches: int = 1, schedule: str = "1f1b") -> Pipeline:
    """This rank's stage of `model` cut over `mesh.pp` stages (see the module docstring)."""
    return Pipeline(model, mesh, stages, micro_batches, schedule)


__all__ = ["Pipeline", "PipelineError", "pipeline"]
