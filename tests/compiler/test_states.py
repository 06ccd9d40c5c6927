"""The states pass and the ops' distributed-states rules, checked the way PyTorch validates DTensor's.

For each op and input layout over 4 simulated ranks (one process): the global inputs are
sharded by the layout (a partial input as uneven pieces 0.4/0.3/0.2/0.1 of its value, so a
wrong rule cannot match by coincidence), the rank's local graph runs on each shard in
lockstep, the global output is rebuilt from the states the pass *deduced* (partials
summed, splits concatenated, duplicates checked equal) and compared with the op on the
full tensors; gradients are ops, so the backward rules are checked the same way.
"""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import torch

import luoshu as ls
from luoshu.compiler import states as ST
from luoshu.core.dstates import DStates
from luoshu.core.op import topological_ops
from luoshu.core.tensor import IndexedSlices, make_constant
from luoshu.ops import _states as S

N = 4
WEIGHTS = [0.4, 0.3, 0.2, 0.1]
DUP, PART = "dup", "partial"


def layout(spec):
    if spec == DUP:
        return S.dup(N)
    if spec == PART:
        return S.partial(N)
    return S.split(N, spec)


def leaf(rng, shape, spec, dtype="float64"):
    value = rng.standard_normal(shape) if dtype == "float64" else rng.integers(0, 16, shape)
    t = make_constant(value, dtype=dtype)
    t.ds = [layout(spec)]
    return t


def check(build, specs, shapes, rng, dtypes=None, grads=True, n=N):
    """Builds `build(*inputs)` on leaves with the given layouts; compares every output (and the
    gradients of sum(output * r) w.r.t. the float inputs) with the global computation."""
    dtypes = dtypes or ["float64"] * len(shapes)
    with ls.Graph() as g:
        inputs = [leaf(rng, s, sp, dt) for s, sp, dt in zip(shapes, specs, dtypes)]
        for t, dt in zip(inputs, dtypes):
            t.requires_grad = dt == "float64"
        out = build(*inputs)
        outs = list(out) if isinstance(out, tuple) else [out]
        fetches = list(outs)
        if grads:
            probe = make_constant(rng.standard_normal(outs[0].shape))
            wrt = [t for t, dt in zip(inputs, dtypes) if dt == "float64"]
            fetches += [
                gr.to_dense() if isinstance(gr, IndexedSlices) else gr
                for gr in ls.gradients(ls.ops.sum(outs[0] * probe), wrt)
            ]
    expected = g.run(fetches)
    ops = topological_ops(fetches, g)
    values, ds, _ = ST.simulate(ops, fetches, n, partial_weights=WEIGHTS[:n] if n == N else None)
    for i in range(len(fetches)):
        got = ST.assemble([v[i] for v in values], [d[i] for d in ds]).numpy()
        np.testing.assert_allclose(
            got,
            expected[i],
            rtol=1e-10,
            atol=1e-10,
            err_msg=f"output {i} with input layouts {specs}, deduced {S._show(ds[0][i])}",
        )
    return [S._show(d) for d in ds[0]]


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_linear_every_layout(rng):
    specs = list(itertools.product([DUP, PART, 0, 1], [DUP, 0, 1], [DUP, 0]))
    native = {
        (DUP, 0, 0): "split(1)",
        (1, 1, DUP): "partial",
        (0, DUP, DUP): "split(0)",
        (DUP, DUP, DUP): "dup",
        (PART, DUP, DUP): "partial",
    }
    for x, w, b in specs:
        got = check(lambda x, w, b: ls.nn.functional.linear(x, w, b), (x, w, b), [(8, 12), (16, 12), (16,)], rng)
        if (x, w, b) in native:
            assert got[0] == native[(x, w, b)], (x, w, b)


def test_linear_3d_input(rng):
    for x, w in [(DUP, 0), (2, 1), (1, DUP), (0, DUP)]:
        check(lambda x, w: ls.nn.functional.linear(x, w), (x, w), [(4, 8, 12), (16, 12)], rng)


@pytest.mark.parametrize("ta,tb", [(False, False), pytest.param(True, False, marks=pytest.mark.slow),
                                   pytest.param(False, True, marks=pytest.mark.slow)])
def test_matmul_batched(rng, ta, tb):
    a_shape = (4, 12, 8) if ta else (4, 8, 12)
    b_shape = (4, 16, 12) if tb else (4, 12, 16)
    for a, b in itertools.product([DUP, PART, 0, 1, 2], [DUP, 0, 1, 2]):
        check(lambda a, b: ls.core.op.apply("matmul", a, b, trans_a=ta, trans_b=tb), (a, b), [a_shape, b_shape], rng)
    assert check(lambda a, b: ls.core.op.apply("matmul", a, b), (2, 1), [(4, 8, 12), (4, 12, 16)], rng)[0] == "partial"


def test_embedding_row_split_table_is_partial(rng):
    for w, ids in itertools.product([DUP, 0, 1], [DUP, 0]):
        got = check(
            lambda w, ids: ls.nn.functional.embedding(ids, w),
            (w, ids),
            [(16, 8), (4, 5)],
            rng,
            dtypes=["float64", "int64"],
        )
        if (w, ids) == (0, DUP):
            assert got[0] == "partial"


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_softmax_over_split_and_kept_dims(rng, name):
    fn = getattr(ls.nn.functional, name)
    for x in [DUP, PART, 0, 1]:
        got = check(lambda x: fn(x, dim=-1), (x,), [(8, 12)], rng)
        if x == 0:
            assert got[0] == "split(0)"


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_vocab_parallel(rng, reduction):
    target = rng.integers(0, 16, (8,))
    target[[1, 5]] = -100  # ignored positions

    def build(x):
        t = make_constant(target)
        return ls.nn.functional.cross_entropy(x, t, reduction=reduction)

    for x in [DUP, PART, 0, 1]:
        got = check(build, (x,), [(8, 16)], rng)
        assert got[0] == "dup" or reduction == "none"
    # split logits: the loss comes out without gathering anything: the rows' maxima are a max
    # all-reduce, the sums of exponentials and the targets' log-probabilities sum all-reduces
    with ls.Graph() as g:
        x = leaf(rng, (8, 16), 1)
        loss = build(x)
    _, _, locs = ST.simulate(topological_ops([loss], g), [loss], N)
    comm = [(op.opdef.name, op.attrs.get("reduce"), tuple(op.inputs[0].shape)) for op in locs[0].graph.ops
            if op.opdef.name in ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")]
    assert comm == [("all_reduce", "max", (8, 1)), ("all_reduce", "sum", (8, 1)), ("all_reduce", "sum", (8,))]


def test_layer_norm_and_rms_norm(rng):
    for x in [DUP, PART, 0, 1, 2]:
        got = check(
            lambda x, w, b: ls.nn.functional.layer_norm(x, (12,), w, b), (x, DUP, DUP), [(4, 8, 12), (12,), (12,)], rng
        )
        if x == 1:
            assert got[:4] == ["split(1)", "split(1)", "partial", "partial"]  # weight grads partial
        check(lambda x, w: ls.nn.functional.rms_norm(x, (12,), w, 1e-6), (x, DUP), [(4, 8, 12), (12,)], rng)


@pytest.mark.parametrize("op", ["sum", "mean", "max"])
@pytest.mark.parametrize("axis", [0, 1, None, (0, 1)])
def test_reductions(rng, op, axis):
    fn = getattr(ls.ops, op)
    for x in [DUP, PART, 0, 1]:
        got = check(lambda x: fn(x, axis=axis), (x,), [(8, 12)], rng, grads=op != "max")
        if op == "sum" and x == 0 and axis in (0, None):
            assert got[0] == "partial"


def test_reshape_transpose_permute_move_the_split(rng):
    for x in [DUP, PART, 0, 1, 2]:
        got = check(lambda x: x.reshape((4, 8, 4, 3)), (x,), [(4, 8, 12)], rng)
        if x == 2:
            assert got[0] == "split(2)"
        got = check(lambda x: ls.ops.permute(x, 0, 2, 1), (x,), [(4, 8, 12)], rng)
        if x == 1:
            assert got[0] == "split(2)"
        check(lambda x: ls.ops.transpose(x, 0, 1), (x,), [(4, 8, 12)], rng)
    assert check(lambda x: x.reshape((4, 96)), (1,), [(4, 8, 12)], rng)[0] == "split(1)"


def test_attention_with_split_heads(rng):
    shape = (4, 4, 8, 8)
    for spec in [DUP, 0, 1]:
        got = check(
            lambda q, k, v: ls.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True),
            (spec, spec, spec),
            [shape] * 3,
            rng,
        )
        if spec == 1:
            assert set(got) == {"split(1)"}
    check(lambda q, k, v: ls.nn.functional.scaled_dot_product_attention(q, k, v), (1, DUP, 2), [shape] * 3, rng)


def test_elementwise_broadcasting_and_partials(rng):
    cases = [
        (lambda a, b: a + b, (PART, PART)),
        (lambda a, b: a + b, (PART, DUP)),
        (lambda a, b: a * b, (PART, DUP)),
        (lambda a, b: a * b, (PART, PART)),
        (lambda a, b: a / b, (0, DUP)),
        (lambda a, b: a - b, (1, 0)),
        (lambda a, b: ls.nn.functional.gelu(a) + b, (PART, 0)),
    ]
    for fn, specs in cases:
        check(fn, specs, [(8, 12), (12,)] if specs[1] != 0 else [(8, 12), (12,)], rng)
    assert check(lambda a, b: a + b, (PART, PART), [(8, 12), (8, 12)], rng)[0] == "partial"
    assert check(lambda a, b: a * b, (1, DUP), [(8, 12), (12,)], rng)[0] == "split(1)"


def test_dropout_keeps_the_split(rng):
    assert check(lambda x: ls.nn.functional.dropout(x, 0.0, True), (1,), [(8, 12)], rng)[0] == "split(1)"


def test_uneven_shape_is_gathered_not_wrong(rng):
    # 10 rows do not split over 4: the split input of a row-wise op is converted, never mis-sliced
    check(lambda x: ls.nn.functional.softmax(x, dim=1), (1,), [(10, 12)], rng)


def test_op_without_rule_gathers_once_with_a_warning(rng):
    ST._WARNED.discard("cumsum")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check(lambda x: ls.ops.cumsum(x, 1), (1,), [(8, 12)], rng, grads=False)
        check(lambda x: ls.ops.cumsum(x, 0), (PART,), [(8, 12)], rng, grads=False)
    msgs = [str(w.message) for w in caught if "cumsum" in str(w.message)]
    assert len(msgs) == 1 and "gathered to duplicate" in msgs[0]


SPECS = [DUP, PART, 0, 1, 2]


@pytest.mark.parametrize("src,dst", list(itertools.product(SPECS, SPECS)))
def test_comm_for_every_state_pair(rng, src, dst):
    """The ops `convert` inserts for (src -> dst) on 4 simulated ranks give the destination exactly."""
    full = torch.as_tensor(rng.standard_normal((8, 4, 12)))
    s, d = layout(src), layout(dst)
    graphs, values, outs = [], [], []
    for r in range(N):
        piece = full * WEIGHTS[r] if src == PART else ST.shard_value(full, s, r)
        with ls.Graph() as g:
            x = ls.Tensor(tuple(piece.shape), "float64", kind="placeholder")
            outs.append(ST.convert(x, s, d, full.shape, ST.Shard(r, N, (0, 1, 2, 3))))
        graphs.append(g)
        values.append({id(x): piece})
    ST.run_lockstep(graphs, values)
    got = [values[r].get(id(outs[r]), None) if outs[r] is not None else None for r in range(N)]
    got = [
        v if v is not None else (full * WEIGHTS[r] if src == PART else ST.shard_value(full, s, r))
        for r, v in enumerate(got)
    ]
    if dst != PART:
        for r in range(N):
            torch.testing.assert_close(got[r], ST.shard_value(full, d, r), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ST.assemble(got, [d] * N), full, rtol=1e-12, atol=1e-12)
    names = {op.opdef.name for op in graphs[0].ops}
    expected = {
        (PART, DUP): "all_reduce",
        (0, DUP): "all_gather",
        (2, DUP): "all_gather",
        (PART, 0): "reduce_scatter",
        (PART, 1): "reduce_scatter",
        (0, 2): "all_to_all",
        (1, 0): "all_to_all",
    }.get((src, dst))
    if expected:
        assert expected in names
    if src == DUP:  # a local slice: no communication
        assert not names & {"all_reduce", "all_gather", "reduce_scatter", "all_to_all"}


def test_shard_rows_keeps_and_renumbers_the_local_rows():
    idx = ls.tensor(np.array([5, 0, 9, 6, 7]))
    val = ls.tensor(np.arange(10.0).reshape(5, 2))
    i, v = ls.core.op.apply("shard_rows", idx, val, start=4, rows=4)
    np.testing.assert_array_equal(i.numpy(), [1, 2, 3])
    np.testing.assert_array_equal(v.numpy(), [[0, 1], [6, 7], [8, 9]])


def test_bad_annotation_names_tensor_and_sizes(rng):
    with ls.Graph() as g:
        x = leaf(rng, (6, 12), DUP)
        x.ds = [DStates(N, {0: N})]  # 6 rows do not split over 4
        x.name = "weird"
        y = x * 2.0
    with pytest.raises(ST.StatesError, match="weird.*dimension 0 of size 6.*4"):
        ST.simulate(topological_ops([y], g), [y], N)


@pytest.mark.parametrize("model", ["DLRM", "DCN"])
def test_ctr_model_with_row_wise_table_on_four_simulated_ranks(rng, model):
    """parallelize's row-wise slot table: the partial lookups and the table's gradient rows."""
    from luoshu.models.recommendation import DCN, DLRM, CTRConfig

    cfg = CTRConfig(dense_dim=3, slot_sizes=[5, 7, 4], embedding_dim=4, mlp_dims=(8,), num_cross_layers=2,
                    bottom_mlp_dims=(8,))
    ls.manual_seed(0)
    net = (DLRM if model == "DLRM" else DCN)(cfg).to(dtype="float64")
    whole = {id(p): p.value.clone() for p in net.parameters()}
    tpar = ls.parallel.parallelize(net, ls.distributed.DeviceMesh(tp=N, world_size=N), broadcast=False)
    ST.set_default(None)
    assert tpar.split == {"embedding.weight": "split(0)"}
    for p in net.parameters():
        p._value = whole[id(p)]
    dense_v, sparse_v = rng.standard_normal((6, 3)), np.stack([rng.integers(0, s, 6) for s in (5, 7, 4)], 1)
    with ls.Graph() as g:
        dense = ls.placeholder("dense", (None, 3), "float64")
        sparse = ls.placeholder("sparse", (None, 3), "int64")
        out = net(dense, sparse)
        grads = ls.gradients(ls.ops.sum(out * out), [net.embedding.weight])
        fetches = [out, grads[0].to_dense()]
    expected = g.run(fetches, {dense: dense_v, sparse: sparse_v})
    values, ds, _ = ST.simulate(topological_ops(fetches, g), fetches, N, {id(dense): dense_v, id(sparse): sparse_v})
    for i in range(len(fetches)):
        got = ST.assemble([v[i] for v in values], [d[i] for d in ds]).numpy()
        np.testing.assert_allclose(got, expected[i], rtol=1e-10, atol=1e-10)


def test_a_sum_of_several_layouts_converts_each_layout_once(rng):
    """`add_n` (autodiff's sum of a gradient's contributions) adds the inputs of each layout locally
    and converts each layout's sum once: a whole input and three partial ones make one all-reduce,
    where a chain of adds all-reduced each partial as it joined the whole one (3)."""
    for specs in [(DUP, PART, PART, PART), (PART, DUP, PART), (0, PART, 0, DUP), (1, 0, PART, 1)]:
        check(lambda *xs: ls.ops.add_n(*xs), specs, [(8, 12)] * len(specs), rng)
    with ls.Graph() as g:
        xs = [leaf(rng, (8, 12), sp) for sp in (DUP, PART, PART, PART)]
        out = ls.ops.add_n(*xs)
    _, ds, locs = ST.simulate(topological_ops([out], g), [out], N, partial_weights=WEIGHTS)
    assert [op.opdef.name for op in locs[0].graph.ops].count("all_reduce") == 1
    assert S._show(ds[0][0]) == "dup"
