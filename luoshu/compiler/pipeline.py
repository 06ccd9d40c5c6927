"""The pipeline partition pass: one traced model graph cut into one rank's stage program.

Every rank traces the whole model (forward and loss) once into one logical graph; the
caller says where each stage's ops begin in the recorded order (`starts`: the first op
of each stage's first layer). `partition` then builds this rank's stage:

1. Each op belongs to the stage its position falls in. An op that reads only parameters
   and constants (no data, nothing random) is copied into every stage that needs it
   instead of being sent: it costs less to recompute than to transfer.
2. Where a tensor made on one stage is read on another the device group changes, and the
   states pass's `transfer` derives the point-to-point pair: `send` on the producer's
   stage, `recv` on the consumer's (one message tag per boundary, the same on every rank,
   since all of them traced the same graph).
3. The stage's backward is the gradient of (its loss, if last) plus (each sent tensor
   times the gradient received for it): that seed is the send's own gradient (a `recv`
   from the consumer), and each received tensor's gradient goes back by the recv's dual
   (a `send`) — the comm ops' gradients are their duals.
4. Recompute regions (`luoshu.nn.recompute`) carry over to the stage graph and the
   recompute pass rewrites them there, before the cut: the backward recomputes a region's
   insides from its inputs, so only those are saved per micro-batch.
5. With tensor parallelism inside the stage, the states pass localizes the stage graph
   (activations cross stages whole; gradients are fetched in their parameters' states).
6. The stage graph is cut into a forward graph and a backward graph: the backward reads
   the forward's intermediate values it needs (`saved`) as placeholders, so the runtime
   keeps them per micro-batch and the stage forward runs once. The backward is recorded
   input gradients first: what the sends to the previous stage need runs (and is sent)
   before this stage's weight gradients.

Co-located stages (`colocated=True`, HotSPa's per-layer tensor parallelism: every rank runs
every stage, each under its own TP group) cross no device group by point-to-point pairs: a
received tensor is a placeholder `boundary<tag>`, a sent one an output of the forward
(`StageProgram.outputs`), the gradient coming back for it a placeholder `boundary<tag>.grad`,
and a received tensor's gradient a fetch after the parameters' (`input_grads`); the caller
moves them between the stages' row layouts. Ops that read only the model's feeds, parameters
and constants (the attention mask of packed rows) are copied into every stage that reads them,
as parameter-only ops are: each stage is fed its own rows.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from luoshu.compiler import states
from luoshu.compiler.passes import prune
from luoshu.compiler.recompute import apply_recompute
from luoshu.core.autodiff import gradients
from luoshu.core.errors import Error
from luoshu.core.graph import Graph, RecomputeRegion
from luoshu.core.op import Op, apply
from luoshu.core.tensor import IndexedSlices, Tensor
from luoshu.ops.comm import recv_dual

TAGS_PER_BOUNDARY = 4  # data, shape header, the gradient's data and header (ops.comm.GRAD_TAG)


class PartitionError(Error):
    """A pipeline partition that cannot be built (names the stage, tensor or parameter)."""


@dataclass
class Boundary:
    """A logical tensor made on stage `source` and read on stage `dest`, sent with message `tag`."""

    tensor: Tensor
    source: int
    dest: int
    tag: int


@dataclass
class StageProgram:
    """One rank's stage: the forward and backward graphs and what the runtime feeds and fetches.

    forward: fetch `forward_fetches` = send tokens, then the loss (last stage), then the
    `saved` values; feeds the placeholders named in `forward_feeds`. backward: feed the
    saved values to `saved_inputs` (same order) and the placeholders in `backward_feeds`;
    fetch `grad_fetches` (each parameter's gradient: one tensor, or indices and values of
    a sparse one), `backward_tokens` (the sends of the received tensors' gradients) and
    `drained` (the gradients received for sent tensors, so each is received even where it
    reaches nothing differentiable).
    """

    stage: int
    params: list  # the logical parameters the stage reads, in optimizer order
    sparse: list  # per parameter: its gradient is rows (indices, values)
    forward: Graph
    forward_fetches: list
    send_tokens: int
    loss: Tensor | None
    saved: list
    backward: Graph
    saved_inputs: list
    grad_fetches: list
    backward_tokens: list
    drained: list
    boundaries: list
    forward_feeds: dict = field(default_factory=dict)  # id(placeholder of forward) -> name
    backward_feeds: dict = field(default_factory=dict)  # id(placeholder of backward) -> name
    # co-located stages: the sent tensors, fetched after the loss, as (boundary, local tensor);
    # the received tensors' gradients, fetched after the parameters', as (boundary, gradient)
    outputs: list = field(default_factory=list)
    input_grads: list = field(default_factory=list)

    @property
    def feed_names(self) -> set:
        """The model placeholders this stage's plans read (inputs on the first, labels on the last)."""
        return set(self.forward_feeds.values()) | set(self.backward_feeds.values())


def stage_of_ops(ops: list[Op], graph: Graph, starts: list[int]) -> dict[int, int]:
    """id(op) -> stage, by its position in `graph.ops` (stage s runs from starts[s] on)."""
    position = {id(op): i for i, op in enumerate(graph.ops)}
    out = {}
    for op in ops:
        p = position.get(id(op), 0)
        out[id(op)] = sum(1 for s in starts[1:] if s <= p)
    return out


def _replicable(ops: list[Op], feeds: bool = False) -> set[int]:
    """ids of ops that read only parameters and constants (and other such ops), nothing random;
    with `feeds`, also those that read only placeholders and constants, no parameter (and other
    such ops: each co-located stage computes them from its own rows)."""
    rep: set[int] = set()
    fed: set[int] = set()  # reads no parameter, directly or through another op of rep | fed
    for op in ops:
        if not op.inputs or op.opdef.random:
            continue
        if all(
            (t.producer is None and t.kind != "placeholder") or (t.producer is not None and id(t.producer[0]) in rep)
            for t in op.inputs
        ):
            rep.add(id(op))
        if feeds and all(
            (t.producer is None and (t.kind == "placeholder" or not t.requires_grad))
            or (t.producer is not None and id(t.producer[0]) in fed)
            for t in op.inputs
        ):
            fed.add(id(op))
    return rep | fed


def boundaries(ops: list[Op], stage: dict[int, int], rep: set[int]) -> list[Boundary]:
    """Every (tensor, consumer stage) where the device group changes, in recorded order."""
    found: list[Boundary] = []
    seen: set = set()
    for op in ops:
        if id(op) in rep:
            continue
        for t in op.inputs:
            if t.producer is None or id(t.producer[0]) in rep:
                continue
            a, b = stage[id(t.producer[0])], stage[id(op)]
            if a != b and (id(t), b) not in seen:
                if a > b:
                    raise PartitionError(
                        f"pipeline partition: stage {b} reads {t.name or t.producer[0].opdef.name!r} made "
                        f"on the later stage {a}; stages must follow the model's order"
                    )
                seen.add((id(t), b))
                found.append(Boundary(t, a, b, TAGS_PER_BOUNDARY * len(found)))
    return found


def _stage_regions(graph: Graph, g: Graph, stage_op: dict, local: dict, crossing: list) -> None:
    """The recompute regions (`luoshu.nn.recompute`) of the traced graph, as far as they lie in
    the stage graph `g`: the part of each region on this stage, keeping what it returned and what
    leaves the stage's forward (sent tensors, the loss), so the recompute pass drops the rest."""
    leaving = {id(t) for t in crossing}
    for region in graph.recompute_regions:
        ops = [stage_op[id(op)] for op in region.ops if id(op) in stage_op]
        if not ops:
            continue
        made = [t for op in ops for t in op.outputs]
        kept = [local[id(t)] for t in region.outputs if id(t) in local]
        kept += [t for t in made if id(t) in leaving]
        g.recompute_regions.append(RecomputeRegion(ops, kept))


def _input_gradients_first(ops: list[Op], tokens: list[Tensor]) -> list[Op]:
    """`ops` (topological) with the ops that the sends of the received tensors' gradients need
    first: the previous stage's backward waits for those, not for this stage's weight gradients,
    which run after the sends (the split of the backward into input and weight gradients of
    zero-bubble pipelines: the drain of the pipeline shortens by the weight-gradient time)."""
    made = {id(t): op for op in ops for t in op.outputs}
    urgent: set[int] = set()
    stack = [made[id(t)] for t in tokens if id(t) in made]
    while stack:
        op = stack.pop()
        if id(op) not in urgent:
            urgent.add(id(op))
            stack += [made[id(t)] for t in op.inputs if id(t) in made]
    return [op for op in ops if id(op) in urgent] + [op for op in ops if id(op) not in urgent]


def partition(
    graph: Graph,
    loss: Tensor,
    starts: list[int],
    stage: int,
    groups: list[tuple],
    rank: int,
    params: list[Tensor],
    strategy: states.Strategy | None = None,
    colocated: bool = False,
) -> StageProgram:
    """This rank's stage program of the traced `graph` (see the module docstring).

    `starts[s]`: the position in `graph.ops` where stage s begins; `groups[s]`: the
    ranks of stage s (its tensor-parallel group, in mesh order: member i of one stage
    talks to member i of another); `params`: the optimizer's parameters (the stage keeps
    those it reads); `strategy`: the tensor-parallel strategy inside the stage, if any;
    `colocated`: every rank runs every stage (the module docstring; `groups` is then unused).
    """
    n_stages = len(starts)
    if not 0 <= stage < n_stages or (not colocated and len(groups) != n_stages):
        raise PartitionError(f"pipeline partition: stage {stage} of {n_stages} with {len(groups)} device groups")
    ops = prune(graph, [loss])
    where = stage_of_ops(ops, graph, starts)
    if loss.producer is not None and where[id(loss.producer[0])] != n_stages - 1:
        raise PartitionError(
            f"pipeline partition: the loss is made on stage {where[id(loss.producer[0])]}, "
            f"not on the last stage {n_stages - 1}"
        )
    rep = _replicable(ops, feeds=colocated)
    cuts = boundaries(ops, where, rep)
    mine = [op for op in ops if where[id(op)] == stage and id(op) not in rep]
    # parameter-only ops this stage reads (transposed tied weights...), copied in
    needed: set[int] = set()
    wanted = {id(t.producer[0]) for op in mine for t in op.inputs if t.producer is not None}
    for op in reversed(ops):
        if id(op) in rep and id(op) in wanted:
            needed.add(id(op))
            wanted.update(id(t.producer[0]) for t in op.inputs if t.producer is not None)
    body = [op for op in ops if id(op) in needed or (where[id(op)] == stage and id(op) not in rep)]

    g = Graph(name=f"{graph.name}-stage{stage}")
    local: dict[int, Tensor] = {}
    placeholders: dict[int, Tensor] = {}
    received: list[tuple[Tensor, Op]] = []  # (received tensor, its recv op)
    sent: list[tuple[Tensor, Op]] = []  # (sent tensor, its send op)
    crossing_in: list[tuple[Boundary, Tensor]] = []  # colocated: (boundary, its placeholder)
    crossing_out: list[tuple[Boundary, Tensor]] = []  # colocated: (boundary, the local sent tensor)
    tokens: list[Tensor] = []
    outgoing: dict[int, list[Boundary]] = {}
    for c in cuts:
        if c.source == stage:
            outgoing.setdefault(id(c.tensor), []).append(c)
    with g:
        for c in cuts:
            if c.dest == stage and colocated:
                ph = g.placeholder(f"boundary{c.tag}", c.tensor.shape, c.tensor.dtype, c.tensor.device)
                local[id(c.tensor)] = ph
                crossing_in.append((c, ph))
            elif c.dest == stage:
                r = states.transfer(None, c.tensor, groups[c.source], groups[c.dest], rank, c.tag)
                local[id(c.tensor)] = r
                received.append((r, r.producer[0]))

        def mapped(t: Tensor) -> Tensor:
            found = local.get(id(t))
            if found is not None:
                return found
            if t.kind == "placeholder" and t.producer is None:
                ph = placeholders.get(id(t))
                if ph is None:
                    ph = placeholders[id(t)] = g.placeholder(t.name, t.shape, t.dtype, t.device)
                return ph
            return t  # a parameter or constant: read as it is

        stage_op: dict[int, Op] = {}  # id(logical op) -> its copy in the stage graph
        for op in body:
            outs = apply(op.opdef, *[mapped(t) for t in op.inputs], **op.attrs)
            outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
            if outs and isinstance(outs[0], Tensor) and outs[0].producer is not None:
                stage_op[id(op)] = outs[0].producer[0]
            for t, lt in zip(op.outputs, outs):
                local[id(t)] = lt
                for c in outgoing.get(id(t), ()):
                    if colocated:
                        crossing_out.append((c, lt))
                        continue
                    token = states.transfer(lt, t, groups[c.source], groups[c.dest], rank, c.tag)
                    tokens.append(token)
                    sent.append((lt, token.producer[0]))
        out_loss = local[id(loss)] if stage == n_stages - 1 else None

        used = {id(t) for op in body for t in op.inputs}
        stage_params = [p for p in params if id(p) in used]
        # the seed of the backward: d(loss) plus, per sent tensor, the gradient its consumer sends back
        ys, seeds, drained = [], [], []
        if out_loss is not None:
            ys.append(out_loss)
            seeds.append(None)
        for t, send_op in sent:
            (gy,) = send_op.opdef.gradient(send_op, [None])
            if gy is not None:
                ys.append(t)
                seeds.append(gy)
                drained.append(gy)  # received even where t reaches nothing differentiable
        for c, lt in crossing_out:
            ys.append(lt)
            seeds.append(g.placeholder(f"boundary{c.tag}.grad", c.tensor.shape, c.tensor.dtype, c.tensor.device))
        xs = [p for p in stage_params] + [r for r, _ in received] + [ph for _, ph in crossing_in]
        grads = gradients(ys, xs, seeds) if ys and xs else [None] * len(xs)
        param_grads = grads[: len(stage_params)]
        for p, gr in zip(stage_params, param_grads):
            if gr is None:
                raise PartitionError(f"pipeline: parameter {p.name} of stage {stage} gets no gradient")
        back_tokens = []
        for (_, recv_op), gr in zip(received, grads[len(stage_params) : len(stage_params) + len(received)]):
            token = recv_dual(recv_op, gr)
            if token is not None:
                back_tokens.append(token)
        input_grads = []
        for (c, _), gr in zip(crossing_in, grads[len(stage_params) + len(received) :]):
            if gr is None:
                raise PartitionError(
                    f"pipeline partition: stage {stage} reads {c.tensor.name or 'a tensor'} from stage {c.source} "
                    "but it reaches nothing differentiable (a co-located stage sends every input's gradient back)"
                )
            input_grads.append((c, gr))
    leaving = [lt for lt, _ in sent] + [lt for _, lt in crossing_out] + ([out_loss] if out_loss is not None else [])
    _stage_regions(graph, g, stage_op, local, leaving)
    apply_recompute(g)  # before the cut: the backward then reads the regions' inputs, not their insides
    sparse = [isinstance(gr, IndexedSlices) for gr in param_grads]
    grad_fetch = [
        t for gr in param_grads for t in ((gr.indices, gr.values) if isinstance(gr, IndexedSlices) else (gr,))
    ]
    forward_fetches = list(tokens) + ([out_loss] if out_loss is not None else []) + [lt for _, lt in crossing_out]
    # a co-located stage's input gradients are fetched with its parameters' (the runner returns both)
    grad_fetch += [gr for _, gr in input_grads]
    urgent = (len(grad_fetch), len(grad_fetch) + len(back_tokens)) if not colocated else \
        (len(grad_fetch) - len(input_grads), len(grad_fetch))
    backward_fetches = grad_fetch + back_tokens + drained

    if strategy is not None:
        # tensor parallel inside the stage: this rank's local graph; gradients stay its blocks
        wanted_states = {
            id(gr): p.ds[strategy.strategy]
            for p, gr, sp in zip(stage_params, param_grads, sparse)
            if not sp and len(p.ds) > strategy.strategy and p.ds[strategy.strategy] is not None
        }
        strat = dataclasses.replace(strategy, fetch_states=wanted_states)
        every = forward_fetches + backward_fetches
        loc = states.localize_graph(prune(g, every), every, strat)
        forward_fetches = [loc.tensors[id(t)] for t in forward_fetches]
        backward_fetches = [loc.tensors[id(t)] for t in backward_fetches]
        g = loc.graph
    forward_ops = prune(g, forward_fetches)
    made = {id(t) for op in forward_ops for t in op.outputs}
    backward_ops = _input_gradients_first(
        [op for op in prune(g, backward_fetches) if id(op) not in {id(o) for o in forward_ops}],
        backward_fetches[urgent[0] : urgent[1]],
    )
    saved, seen = [], set()
    for op in backward_ops:
        for t in op.inputs:
            if id(t) in made and id(t) not in seen:
                seen.add(id(t))
                saved.append(t)
    forward_feeds = {id(t): t.name for op in forward_ops for t in op.inputs if t.kind == "placeholder"}

    bg = Graph(name=f"{graph.name}-stage{stage}-backward")
    bmap: dict[int, Tensor] = {}
    backward_feeds: dict[int, str] = {}
    with bg:
        saved_inputs = [bg.placeholder(f"saved{i}", t.shape, t.dtype, t.device) for i, t in enumerate(saved)]
        bmap.update((id(t), ph) for t, ph in zip(saved, saved_inputs))
        for op in backward_ops:
            ins = []
            for t in op.inputs:
                m = bmap.get(id(t))
                if m is None and t.kind == "placeholder" and t.producer is None:
                    m = bmap[id(t)] = bg.placeholder(t.name, t.shape, t.dtype, t.device)
                    backward_feeds[id(m)] = t.name
                ins.append(t if m is None else m)
            outs = apply(op.opdef, *ins, **op.attrs)
            outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
            for t, bt in zip(op.outputs, outs):
                bmap[id(t)] = bt
    backward_fetches = [bmap.get(id(t), t) for t in backward_fetches]
    return StageProgram(
        stage=stage,
        params=stage_params,
        sparse=sparse,
        forward=g,
        forward_fetches=forward_fetches + saved,
        send_tokens=len(tokens),
        loss=forward_fetches[len(tokens)] if out_loss is not None else None,
        outputs=[(c, t) for (c, _), t in zip(crossing_out, forward_fetches[len(tokens) + (out_loss is not None) :])],
        input_grads=[(c, t) for (c, _), t in zip(input_grads, backward_fetches[len(grad_fetch) - len(input_grads) :
                                                                               len(grad_fetch)])],
        saved=saved,
        backward=bg,
        saved_inputs=saved_inputs,
        grad_fetches=backward_fetches[: len(grad_fetch)],
        backward_tokens=backward_fetches[len(grad_fetch) : len(grad_fetch) + len(back_tokens)],
        drained=backward_fetches[len(grad_fetch) + len(back_tokens) :],
        boundaries=cuts,
        forward_feeds=forward_feeds,
        backward_feeds=backward_feeds,
    )


__all__ = ["Boundary", "PartitionError", "StageProgram", "boundaries", "partition", "stage_of_ops"]
