"""Memory accounting of a plan: every buffer's size and lifetime, the peak and where it falls.

`measure(plan, feeds)` runs the plan's steps one by one (the same kernels as `Plan.run`, in
the same order, freeing each slot after its last reader as the emitted function does) and
follows the storage behind every slot: a view shares its base's storage and is counted once;
a storage is live while any slot refers to it. Bytes are split as a training step's memory is
usually split:

- parameters: the plan's leaf variables (and parameter-server table handles), alive throughout;
- optimizer state: the state tensors of every optimizer the plan's update ops drive, after the
  step (state is created on the first update and kept);
- gradients: the buffers an update op reads, the communication buffers (buckets) that
  carry them there, and the gradient buffers kept between steps (persistent buckets, counted
  throughout the step; ZeRO-1/2's flat gradient and its shard);
- gathered parameters: ZeRO-3's whole parameters, gathered from the shards before their readers
  (the shards themselves are parameters);
- activations: everything else the plan allocates — forward activations, the backward's
  intermediate values, fed inputs and constants.

The peak is the largest total after any step, with the step and its op named.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from luoshu.core import live

# Ops that consume gradients and apply them (their inputs are gradients by definition).
UPDATE_OPS = frozenset({"optimizer_update", "ps_step", "ps_sparse_push", "sharded_update"})
# Collectives that carry gradients on the way to an update: their inputs are gradients too.
GRADIENT_CARRIERS = frozenset({"bucket_all_reduce", "bucket_unpack", "sparse_all_gather", "all_reduce",
                               "reduce_scatter", "all_gather", "comm_wait", "zero3_reduce_scatter"})
# Ops that write a persistent bucket buffer (their `buffer` attribute names its BucketBuffer).
BUCKET_OPS = frozenset({"bucket_all_reduce", "bucket_place"})
# Ops whose outputs are parameters gathered from shards (ZeRO-3), alive between use and free.
PARAMETER_GATHERS = frozenset({"zero3_gather", "zero3_unpack"})


@dataclass
class MemoryReport:
    """Peak live bytes of one run of a plan and its split (bytes at the peak)."""

    peak_bytes: int
    peak_step: int  # index of the step after which the peak is reached (-1: before the first step)
    peak_op: str
    parameters: int
    optimizer_state: int
    gradients: int  # at the peak
    activations: int  # at the peak
    timeline: list[int] = field(default_factory=list)  # plan-allocated live bytes after each step
    peak_gradients: int = 0  # the most gradient bytes alive at once (any step)
    peak_activations: int = 0  # the most activation bytes alive at once (any step)
    gathered_parameters: int = 0  # ZeRO-3 parameters gathered from the shards, at the peak
    peak_gathered_parameters: int = 0  # the most gathered-parameter bytes alive at once (any step)
    update_gradients: int = 0  # the gradient bytes the update ops read (ZeRO-2/3: this rank's shards)
    outputs: list = field(default_factory=list, repr=False)  # the fetched values of the run

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("timeline", "outputs")}

    def __str__(self) -> str:
        def mb(n: int) -> str:
            return f"{n / 2**20:10.3f} MiB"

        return "\n".join([
            f"peak {mb(self.peak_bytes)} after step {self.peak_step} ({self.peak_op})",
            f"  parameters      {mb(self.parameters)}",
            f"  optimizer state {mb(self.optimizer_state)}",
            f"  gradients       {mb(self.gradients)}   (largest at any step {mb(self.peak_gradients)})",
            f"  activations     {mb(self.activations)}   (largest at any step {mb(self.peak_activations)})",
            f"  gathered params {mb(self.gathered_parameters)}   (largest at any step "
            f"{mb(self.peak_gathered_parameters)})",
        ])


def _storage(value) -> tuple[int, int] | None:
    """(storage key, bytes) of a torch tensor; None for anything else (tokens, handles)."""
    if not isinstance(value, torch.Tensor):
        return None
    storage = value.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def _gradient_slots(plan, fetched: int = 0) -> set[int]:
    """Slots that hold gradients: inputs of update ops, the first `fetched` fetches (gradients an
    update outside the plan applies), and inputs of the collectives whose results flow only into
    those (bucket all-reduce and its unpacking, sparse gathers, ZeRO's reduce-scatter)."""
    producer_step = {}
    for i, step in enumerate(plan.steps):
        for s in step.outputs:
            producer_step[s] = i
    grads: set[int] = set(plan.fetch_slots[:fetched])
    frontier = [i for i, step in enumerate(plan.steps) if step.op.opdef.name in UPDATE_OPS]
    frontier += [j for s in grads if (j := producer_step.get(s)) is not None
                 and plan.steps[j].op.opdef.name in GRADIENT_CARRIERS]
    seen = set(frontier)
    while frontier:
        i = frontier.pop()
        for s in plan.steps[i].inputs:
            grads.add(s)
            j = producer_step.get(s)
            if j is not None and j not in seen and plan.steps[j].op.opdef.name in GRADIENT_CARRIERS:
                seen.add(j)
                frontier.append(j)
    return grads


def _optimizers(plan) -> list:
    """The optimizers the plan's update ops step on this rank (a ZeRO mode's shard optimizers)."""
    found = []
    for step in plan.steps:
        name = step.op.opdef.name
        if name == "optimizer_update" and step.op.attrs["optimizer"] >= 0:
            found.append(live.lookup(step.op.attrs["optimizer"], "optimizer", "memory accounting"))
        elif name == "sharded_update":
            found += live.lookup(step.op.attrs["strategy"], "sync mode", "memory accounting").optimizers()
    return found


def _optimizer_state_bytes(plan) -> int:
    return optimizer_state_bytes(_optimizers(plan))


def optimizer_state_bytes(optimizers: list) -> int:
    """The bytes of the state tensors `optimizers` hold (each storage once)."""
    storages = {}
    for opt in optimizers:
        for state in opt.state.values():
            for t in state.values():
                found = _storage(t)
                if found is not None:
                    storages[found[0]] = found[1]
    return sum(storages.values())


def measure(plan, feed_values: list, gradient_fetches: int = 0) -> MemoryReport:
    """Runs `plan` once on `feed_values` (as `Plan.run` takes them), step by step, and
    accounts for every buffer it holds. The step really runs: updates are applied.
    `gradient_fetches`: the first that many fetches are gradients an update outside the plan
    applies (a pipeline stage's backward: the stage accumulates them over its micro-batches); they
    count as gradients, and `update_gradients` is their bytes."""
    slots: dict[int, object] = {}
    leaf_slots = set()
    for t, v in zip(plan.feed_tensors, feed_values):
        slots[plan.slot_of[id(t)]] = v
    parameter_storages: dict[int, int] = {}
    for t in plan.leaf_tensors:
        s = plan.slot_of[id(t)]
        slots[s] = t._value
        if t.kind in ("variable", "ps_table") or t.requires_grad:
            leaf_slots.add(s)
            found = _storage(t._value)
            if found is not None:
                parameter_storages[found[0]] = found[1]
    gradient_slots = _gradient_slots(plan, gradient_fetches)
    # persistent gradient buckets (kept across steps by their BucketBuffer): alive throughout,
    # counted once whether or not this run has written them yet
    bucket_storages: dict[int, int] = {}
    for step in plan.steps:
        key = step.op.attrs.get("buffer", -1) if step.op.opdef.name in BUCKET_OPS else -1
        held = live.lookup(key, "bucket buffer", "memory accounting").tensor if key >= 0 else None
        found = _storage(held)
        if found is not None:
            bucket_storages[found[0]] = found[1]
    gathered_slots = {s for step in plan.steps if step.op.opdef.name in PARAMETER_GATHERS for s in step.outputs}

    # storage key -> [bytes, slots referring to it]; parameters' storages are counted apart
    owners: dict[int, list] = {}

    def hold(s: int, value) -> None:
        found = _storage(value)
        if found is None or found[0] in parameter_storages or found[0] in bucket_storages:
            return
        entry = owners.setdefault(found[0], [found[1], set()])
        entry[1].add(s)

    def release(s: int, value) -> None:
        found = _storage(value)
        if found is None or found[0] not in owners:
            return
        entry = owners[found[0]]
        entry[1].discard(s)
        if not entry[1]:
            del owners[found[0]]

    def split() -> tuple[int, int, int]:
        grads = acts = gathered = 0
        for nbytes, refs in owners.values():
            if refs & gradient_slots:
                grads += nbytes
            elif refs & gathered_slots:
                gathered += nbytes
            else:
                acts += nbytes
        return grads, acts, gathered

    for s, v in slots.items():
        if s not in leaf_slots:
            hold(s, v)
    parameters = sum(parameter_storages.values())
    best = (sum(split()), -1)
    timeline, peak_split, peak_grads, peak_acts, peak_gathered, update_grads = [], split(), 0, 0, 0, 0
    with torch.no_grad():
        for i, step in enumerate(plan.steps):
            if step.op.opdef.name in UPDATE_OPS:
                update_grads += sum(dict(filter(None, (_storage(slots[s]) for s in step.inputs))).values())
            out = step.kernel(*[slots[s] for s in step.inputs])
            values = (out,) if len(step.outputs) == 1 else tuple(out)
            for s, v in zip(step.outputs, values):
                slots[s] = v
                hold(s, v)
            grads, acts, gathered = split()
            timeline.append(grads + acts + gathered)
            peak_grads, peak_acts = max(peak_grads, grads), max(peak_acts, acts)
            peak_gathered = max(peak_gathered, gathered)
            if grads + acts + gathered > best[0]:
                best, peak_split = (grads + acts + gathered, i), (grads, acts, gathered)
            for s in step.frees:
                release(s, slots.pop(s))
    state = _optimizer_state_bytes(plan)
    # gradient buffers a sync mode keeps between steps outside the plan (ZeRO-1/2's flat gradients)
    kept = sum(live.lookup(step.op.attrs["strategy"], "sync mode", "memory accounting").persistent_gradient_bytes()
               for step in plan.steps if step.op.opdef.name == "sharded_update") + sum(bucket_storages.values())
    best = (best[0] + kept, best[1])
    peak_split = (peak_split[0] + kept, *peak_split[1:])
    peak_grads += kept
    step_index = best[1]
    fetched = [slots.get(s) for s in plan.fetch_slots]
    update_grads += sum(dict(filter(None, (_storage(v) for v in fetched[:gradient_fetches]))).values())
    return MemoryReport(
        peak_bytes=parameters + state + best[0], peak_step=step_index,
        peak_op=plan.steps[step_index].op.opdef.name if step_index >= 0 else "(inputs)",
        parameters=parameters, optimizer_state=state, gradients=peak_split[0], activations=peak_split[1],
        timeline=timeline, peak_gradients=peak_grads, peak_activations=peak_acts, gathered_parameters=peak_split[2],
        peak_gathered_parameters=peak_gathered, update_gradients=update_grads, outputs=fetched)
