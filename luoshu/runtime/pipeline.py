"""Pipeline schedules, their activation accounting, and the runner of one stage's plans.

A schedule is a list of `("F", m)` / `("B", m)` steps for one stage. `gpipe` runs every
forward, then every backward; `one_f_one_b` (PipeDream-flush / Megatron's 1F1B) runs
`pp - stage - 1` warm-up forwards, then alternates one forward with one backward, then
drains the backwards, so a stage holds at most `pp - stage` micro-batches of activations
(at most `pp`). Fewer micro-batches than stages is fine: the warm-up shrinks to fit.
`ActivationLedger` holds the activations a stage keeps between a micro-batch's forward
and its backward: the count it reports is the runtime's own storage, so that bound can
be checked. `StageRunner` compiles a `StageProgram` (the pipeline partition pass) into a
forward plan and a backward plan and runs a micro-batch through either; the backward
plan consumes the forward's saved activations (the stage forward runs once).
"""

from __future__ import annotations

import time

import torch

from luoshu.compiler.pipeline import StageProgram
from luoshu.core.errors import Error
from luoshu.core.op import get_opdef
from luoshu.ops.comm import posted_recvs, recv_wait_seconds
from luoshu.runtime.plan import build_plan

SCHEDULES = ("gpipe", "1f1b")


def gpipe(stage: int, stages: int, micro_batches: int) -> list[tuple[str, int]]:
    return [("F", m) for m in range(micro_batches)] + [("B", m) for m in range(micro_batches)]


def one_f_one_b(stage: int, stages: int, micro_batches: int) -> list[tuple[str, int]]:
    warmup = min(stages - stage - 1, micro_batches)
    steps = [("F", m) for m in range(warmup)]
    forward, backward = warmup, 0
    while forward < micro_batches:
        steps.append(("F", forward))
        forward += 1
        steps.append(("B", backward))
        backward += 1
    steps += [("B", m) for m in range(backward, micro_batches)]
    return steps


def schedule(name: str, stage: int, stages: int, micro_batches: int) -> list[tuple[str, int]]:
    if name not in SCHEDULES:
        raise Error(f"pipeline: unknown schedule {name!r}; the schedules are {SCHEDULES}")
    if not 0 <= stage < stages or micro_batches < 1:
        raise Error(f"pipeline: stage {stage} of {stages} with {micro_batches} micro-batches is not a schedule")
    return (gpipe if name == "gpipe" else one_f_one_b)(stage, stages, micro_batches)


class ActivationLedger:
    """The saved activations of a stage, per micro-batch: `saved(m, values)` keeps them until
    `freed(m)` hands them to the backward; `peak` is the most micro-batches held at once and
    `peak_bytes` the most bytes."""

    def __init__(self):
        self._held: dict[int, tuple] = {}
        self._bytes: dict[int, int] = {}
        self.peak = 0
        self.peak_bytes = 0

    @property
    def alive(self) -> set[int]:
        return set(self._held)

    def saved(self, micro_batch: int, values=()) -> None:
        values = tuple(values)
        self._held[micro_batch] = values
        self._bytes[micro_batch] = sum(v.numel() * v.element_size() for v in values if isinstance(v, torch.Tensor))
        self.peak = max(self.peak, len(self._held))
        self.peak_bytes = max(self.peak_bytes, sum(self._bytes.values()))

    def freed(self, micro_batch: int) -> tuple:
        self._bytes.pop(micro_batch, None)
        return self._held.pop(micro_batch, ())


class StageRunner:
    """One stage's forward and backward plans and the micro-batch steps of a schedule.

    `forward(m, feeds)` runs the forward plan (feeds: placeholder name -> torch value), keeps
    its saved activations in the ledger and returns the loss (last stage) or None (a co-located
    stage's sent tensors are then in `outputs`);
    `backward(m, feeds)` runs the backward plan on them and returns the gradients fetched
    (per `program.grad_fetches`), each the caller's to accumulate into in place. Sends complete
    in the background; `wait_sends` waits for them. `busy_s` is the time in the plans minus the
    time recv waited for a peer.
    """

    def __init__(self, program: StageProgram):
        self.program = program
        p = program
        self.forward_plan = build_plan(p.forward, p.forward_fetches, _AnyFeed())
        # the received gradients of sent tensors that reach nothing differentiable are fetched too:
        # every send has its matching recv
        self.backward_plan = build_plan(p.backward, p.grad_fetches + p.backward_tokens + p.drained, _AnyFeed())
        saved_at = {id(t): i for i, t in enumerate(p.saved_inputs)}
        self._forward_names = [_name(t, p.forward_feeds) for t in self.forward_plan.feed_tensors]
        self._backward_slots = [
            ("saved", saved_at[id(t)]) if id(t) in saved_at else ("feed", _name(t, p.backward_feeds))
            for t in self.backward_plan.feed_tensors
        ]
        self._tokens = p.send_tokens
        self._has_loss = p.loss is not None
        self._outputs = len(p.outputs)  # co-located stages: the sent tensors, fetched after the loss
        self.outputs: list = []
        self._grads = len(p.grad_fetches)
        self._backward_tokens = len(p.backward_tokens)
        self.ledger = ActivationLedger()
        self.pending: list = []
        self.busy_s = 0.0
        self._leaves: set | None = None
        # when a list: the plans run step by step with their memory accounted (`Plan.memory`), one
        # ("F" | "B", MemoryReport) per run appended
        self.reports: list | None = None

    def receiving(self, steps: list[tuple[str, int]], depth: int = 2):
        """The scope in which the receives of `steps` (a schedule) are posted ahead of need: each
        recv of the forward plan gets one message per "F" step, each of the backward plan one per
        "B" step (`luoshu.ops.comm.posted_recvs`; inside `shapes_once`, so a run-time shape is
        known after a channel's first message)."""
        counts = {"F": 0, "B": 0}
        for kind, _ in steps:
            counts[kind] += 1
        channels = {}
        for kind, plan in (("F", self.forward_plan), ("B", self.backward_plan)):
            for step in plan.steps:
                if step.op.opdef.name == "recv" and counts[kind]:
                    a = step.op.attrs
                    channels[(a["peer"], a["tag"])] = (a["shape"], a["dtype"], a["device"], counts[kind])
        return posted_recvs(channels, depth)

    def reset(self) -> None:
        self.ledger = ActivationLedger()
        self.busy_s = 0.0
        self._leaves = None

    def _timed(self, plan, values):
        wait0, start = recv_wait_seconds(), time.perf_counter()
        if self.reports is not None:
            backward = plan is self.backward_plan
            report = plan.memory(values, self._grads if backward else 0)
            self.reports.append(("B" if backward else "F", report))
            out = report.outputs
        else:
            out = plan.run(values)
        self.busy_s += (time.perf_counter() - start) - (recv_wait_seconds() - wait0)
        return out

    def forward(self, m: int, feeds: dict):
        out = self._timed(self.forward_plan, [feeds[n] for n in self._forward_names])
        self.pending += out[: self._tokens]
        loss = out[self._tokens] if self._has_loss else None
        first = self._tokens + self._has_loss
        self.outputs = out[first : first + self._outputs]
        self.ledger.saved(m, out[first + self._outputs :])
        return loss

    def backward(self, m: int, feeds: dict) -> list:
        saved = self.ledger.freed(m)
        values = [saved[i] if kind == "saved" else feeds[i] for kind, i in self._backward_slots]
        del saved
        out = self._timed(self.backward_plan, values)
        self.pending += out[self._grads : self._grads + self._backward_tokens]
        if self._leaves is None:  # once a step: a load may have replaced a parameter's buffer
            self._leaves = {
                t._value.untyped_storage().data_ptr()
                for t in self.backward_plan.leaf_tensors
                if isinstance(t._value, torch.Tensor)
            }
        return _owned(out[: self._grads], values, self._leaves)

    def wait_sends(self) -> None:
        wait = get_opdef("comm_wait").compute
        for token in self.pending:
            wait(token)
        self.pending = []


def _owned(grads, fed: list, leaves: set) -> list:
    """The gradients, each one the caller may accumulate into in place: a fresh buffer of the plan
    is taken as it is (no copy); a view, a value the plan was fed (or its base), or one sharing
    storage with a parameter (`leaves`: their storages) or with another gradient is copied."""
    borrowed = {id(v) for v in fed} | {id(v._base) for v in fed if isinstance(v, torch.Tensor) and v._base is not None}
    seen: set = set()
    out = []
    for g in grads:
        if isinstance(g, torch.Tensor):
            storage = g.untyped_storage().data_ptr()
            if g._base is not None or id(g) in borrowed or storage in leaves or storage in seen:
                g = g.clone()
                storage = g.untyped_storage().data_ptr()
            seen.add(storage)
        out.append(g)
    return out


class _AnyFeed(dict):
    """build_plan's check that every placeholder is fed: the runner feeds all of them."""

    def __contains__(self, key) -> bool:
        return True


def _name(t, names: dict) -> str:
    if id(t) not in names:
        raise Error(f"pipeline: the stage plan reads placeholder {t.name!r}, which the partition did not list")
    return names[id(t)]


__all__ = ["SCHEDULES", "ActivationLedger", "StageRunner", "gpipe", "one_f_one_b", "schedule"]
