"""Define-and-run graphs: plans, caching, feeds, fetches and the errors of DESIGN.md §7."""

import numpy as np
import pytest

import luoshu as ls


def _mlp_graph():
    w = ls.tensor(np.arange(12, dtype=np.float32).reshape(4, 3) / 10)
    with ls.Graph("g") as g:
        x = ls.placeholder("x", (None, 4))
        y = (x @ w).relu()
    return g, x, y, w


def test_run_returns_numpy_and_matches_eager():
    g, x, y, w = _mlp_graph()
    xv = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    out = g.run(y, {x: xv})
    assert isinstance(out, np.ndarray) and out.shape == (5, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out, (ls.tensor(xv) @ w).relu().numpy())


def test_feed_by_name_and_plan_cache():
    g, x, y, _ = _mlp_graph()
    xv = np.ones((2, 4), np.float32)
    g.run(y, {"x": xv})
    g.run(y, {x: np.ones((7, 4), np.float32)})  # another batch size reuses the plan
    assert len(g._plans) == 1
    g.run([y, x], {x: xv})
    assert len(g._plans) == 2


def test_plan_is_flat_and_frees_buffers_after_last_use():
    g, x, y, _ = _mlp_graph()
    g.run(y, {x: np.ones((2, 4), np.float32)})
    plan = next(iter(g._plans.values()))
    assert [s.op.opdef.name for s in plan.steps] == ["matmul", "relu"]
    assert plan.steps[0].frees  # the matmul result dies after relu reads it... and x after matmul
    freed = {s for step in plan.steps for s in step.frees}
    assert plan.fetch_slots[0] not in freed


def test_wrong_feed_shape_names_placeholder_expected_and_found():
    g, x, y, _ = _mlp_graph()
    with pytest.raises(ls.FeedError, match=r"'x'.*\(None, 4\).*\(2, 5\)"):
        g.run(y, {x: np.ones((2, 5), np.float32)})
    with pytest.raises(ls.FeedError, match="'x'"):
        g.run(y, {x: np.ones((4,), np.float32)})


def test_wrong_feed_dtype_names_placeholder():
    with ls.Graph() as g:
        ids = ls.placeholder("ids", (None,), "int64")
        z = ids + 1
    with pytest.raises(ls.FeedError, match=r"'ids'.*int64.*float"):
        g.run(z, {ids: np.array([0.5, 1.5])})
    np.testing.assert_array_equal(g.run(z, {ids: np.array([1, 2], np.int32)}), [2, 3])


def test_unfed_placeholder_is_named():
    with ls.Graph() as g:
        a = ls.placeholder("a", (2,))
        b = ls.placeholder("b", (2,))
        c = a * b
    with pytest.raises(ls.FeedError, match="'b'"):
        g.run(c, {a: np.ones(2, np.float32)})


def test_feeding_something_else_is_refused():
    g, x, y, w = _mlp_graph()
    with pytest.raises(ls.FeedError, match="placeholders"):
        g.run(y, {w: np.ones((4, 3), np.float32)})
    with pytest.raises(ls.FeedError, match="placeholders"):
        g.run(y, {"nope": np.ones((4, 3), np.float32)})


def test_incompatible_shapes_at_build_name_the_op_and_shapes():
    with ls.Graph():
        a = ls.placeholder("a", (None, 3))
        b = ls.placeholder("b", (4, 5))
        with pytest.raises(ls.ShapeError, match=r"matmul.*\(None, 3\).*\(4, 5\)"):
            a @ b
        with pytest.raises(ls.ShapeError, match=r"add.*\(None, 3\).*\(4, 5\)"):
            a + b


def test_unknown_op_and_attribute():
    with pytest.raises(ls.OpError, match="unknown op 'no_such_op'"):
        ls.core.apply("no_such_op", ls.tensor([1.0]))
    with pytest.raises(ls.OpError, match="'sum' has no attribute 'axes'"):
        ls.core.apply("sum", ls.tensor([1.0]), axes=0)
    with pytest.raises(AttributeError):
        ls.ops.no_such_op  # noqa: B018


def test_runtime_shape_mismatch_names_the_op():
    with ls.Graph() as g:
        a = ls.placeholder("a", (None,))
        b = ls.placeholder("b", (None,))
        c = a * b
    with pytest.raises(ls.ExecutionError, match="mul"):
        g.run(c, {a: np.ones(3, np.float32), b: np.ones(4, np.float32)})


def test_graph_tensors_cannot_leak_into_eager_or_other_graphs():
    g, x, y, _ = _mlp_graph()
    with pytest.raises(ls.GraphError, match="graph"):
        y + 1
    with ls.Graph("other") as h:
        with pytest.raises(ls.GraphError, match="'g'"):
            y * 2
    with pytest.raises(ls.GraphError, match="'g'"):
        h.run(y)
    with pytest.raises(ls.GraphError):
        ls.placeholder("outside", (1,))


def test_fetched_leaf_is_a_copy():
    w = ls.tensor(np.zeros(3, np.float32))
    with ls.Graph() as g:
        x = ls.placeholder("x", (3,))
        y = x + w
    before = g.run(w)
    w.value.add_(1.0)
    assert before.sum() == 0
    np.testing.assert_array_equal(g.run(y, {x: np.zeros(3, np.float32)}), np.ones(3))


def test_scalars_are_weakly_typed():
    x = ls.tensor(np.ones(2, np.float32))
    assert (x * 2.5).dtype == "float32"
    assert (x + 1).dtype == "float32"
    i = ls.tensor(np.ones(2, np.int32))
    assert (i + 1).dtype == "int32"
    assert (i * 0.5).dtype == "float32"
    assert (x > 0).dtype == "bool"


def test_tensor_from_zero_d_array_keeps_rank_zero():
    # np.ascontiguousarray would make these shape (1,), breaking scalar targets (cross_entropy on (C,) logits).
    assert ls.tensor(np.array(2)).shape == ()
    assert ls.tensor(np.array(2.5)).shape == ()
    assert ls.tensor(np.zeros((2, 3)).T).shape == (3, 2)


@pytest.mark.parametrize("shape", [(-3,), (4, -2), (2.5,), ("a",), (True, 3), 5])
def test_placeholder_refuses_a_shape_that_is_no_shape(shape):
    with ls.Graph():
        with pytest.raises(ls.ShapeError, match="placeholder 'x'"):
            ls.placeholder("x", shape)
    with ls.Graph():  # None and -1 both mean "known at run time"; 0 is a size
        assert ls.placeholder("x", (None, -1, 0, np.int64(3))).shape == (None, None, 0, 3)
