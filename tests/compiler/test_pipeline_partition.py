"""The pipeline partition pass on a traced GPT-2 (one process: graphs only, nothing sent): stage
boundaries are send/recv ops derived where the device group changes, each comm op's gradient its
dual, a backward graph that reads the forward's saved activations instead of recomputing them.
The `send` / `recv` kernels run across processes in tests/parallel/test_pipeline.py."""

from __future__ import annotations

import pytest

import luoshu as ls
from luoshu.compiler.passes import prune
from luoshu.compiler.pipeline import PartitionError, partition
from tests.parallel import pp_train


def _trace(layers=2, pp=2):
    ls.manual_seed(11)
    model = pp_train.GPT2(pp_train.config(layers)).to(dtype="float64")
    g = ls.Graph()
    marks = {}
    per = layers // pp
    originals = {}
    for s in range(pp):
        layer = model.h[s * per]
        originals[s] = layer.forward

        def first(*a, _s=s, **k):
            marks.setdefault(_s, len(g.ops))
            return originals[_s](*a, **k)

        object.__setattr__(layer, "forward", first)
    with g:
        ids = ls.placeholder("ids", (None, 16), "int64")
        y = ls.placeholder("y", (None, 16), "int64")
        loss = pp_train.loss_fn(model(ids), y)
    for s in range(pp):
        object.__delattr__(model.h[s * per], "forward")
    return model, g, loss, [0] + [marks[s] for s in range(1, pp)]


def _names(graph, name, fetches=None):
    ops = graph.ops if fetches is None else prune(graph, fetches)
    return [op for op in ops if op.opdef.name == name]


def test_stage_boundaries_are_send_recv_pairs_with_dual_gradients():
    model, g, loss, starts = _trace()
    params = list(model.parameters())
    first = partition(g, loss, starts, 0, [(0,), (1,)], 0, params)
    last = partition(g, loss, starts, 1, [(0,), (1,)], 1, params)
    assert len(first.boundaries) == 1 and first.boundaries[0].source == 0 and first.boundaries[0].dest == 1
    (send,) = _names(first.forward, "send", first.forward_fetches)
    (recv,) = _names(last.forward, "recv", last.forward_fetches)
    # the activation: stage 0 sends it to rank 1, stage 1 receives it from rank 0, with one tag
    assert send.attrs["peer"] == 1 and recv.attrs["peer"] == 0 and send.attrs["tag"] == recv.attrs["tag"]
    assert recv.outputs[0].shape == (None, 16, 64) and send.attrs["header"]  # the batch is known at run time
    # the duals: stage 1 sends the activation's gradient back, stage 0 receives it, on the gradient's tag
    (grad_send,) = _names(last.backward, "send")
    (grad_recv,) = _names(first.backward, "recv")
    assert grad_send.attrs["peer"] == 0 and grad_recv.attrs["peer"] == 1
    assert grad_send.attrs["tag"] == grad_recv.attrs["tag"] == send.attrs["tag"] + ls.ops.comm.GRAD_TAG
    assert not _names(first.forward, "recv", first.forward_fetches)
    assert not _names(last.forward, "send", last.forward_fetches)
    assert not _names(first.backward, "send") and not _names(last.backward, "recv")
    # a rank outside a stage's group reads nothing that stage needs: inputs on the first, labels on the last
    assert first.feed_names == {"ids"} and last.feed_names == {"y"}
    names = {id(p): n for n, p in model.named_parameters()}
    got = {names[id(p)] for p in first.params} | {names[id(p)] for p in last.params}
    assert got == set(names.values())
    assert {names[id(p)] for p in first.params} & {names[id(p)] for p in last.params} == {"wte.weight"}  # tied


def test_backward_reads_saved_activations_and_does_not_recompute_the_forward():
    model, g, loss, starts = _trace()
    params = list(model.parameters())
    for stage, rank in ((0, 0), (1, 1)):
        prog = partition(g, loss, starts, stage, [(0,), (1,)], rank, params)
        forward_kinds = {op.opdef.name for op in prune(prog.forward, prog.forward_fetches)}
        assert prog.saved and len(prog.saved) == len(prog.saved_inputs)
        # the forward's layers run once, in the forward plan: the backward holds only gradient ops
        for name in ("linear", "scaled_dot_product_attention", "layer_norm", "gelu", "embedding"):
            assert (name in forward_kinds) == (name != "embedding" or stage == 0), (stage, name)
            assert not _names(prog.backward, name), (stage, name)
        for ph, t in zip(prog.saved_inputs, prog.saved):
            assert ph.shape == t.shape and ph.dtype == t.dtype


def test_a_loss_off_the_last_stage_or_mismatched_groups_are_refused():
    model, g, loss, starts = _trace()
    params = list(model.parameters())
    with pytest.raises(PartitionError, match="stage 2 of 2"):
        partition(g, loss, starts, 2, [(0,), (1,)], 0, params)
    with pytest.raises(ls.Error, match="groups of one size"):
        partition(g, loss, starts, 0, [(0,), (1, 2)], 0, params)
