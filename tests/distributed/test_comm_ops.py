"""Comm ops on 2 (and, slow, 4) launched workers, forward and gradient, eager and define-and-run, vs NumPy."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from tests.distributed.comm_script import cases, cotangent, splits_in, splits_out, subgroup, x_of
from tests.distributed.launcher import launch


def _blocks(a: np.ndarray, sizes) -> list[np.ndarray]:
    return np.split(a, np.cumsum(sizes)[:-1])


def _expected(name: str, rank: int, n: int):
    """(output, input gradient) of worker `rank`, from every worker's input and cotangent."""
    shapes = {c[0]: (c[1], c[3]) for c in cases(rank, n)}
    if name == "all_to_all_unequal":
        xs = [x_of(r, (sum(splits_in(r, n)), 2)) for r in range(n)]
        gs = [cotangent(r, (sum(splits_out(r, n)), 2)) for r in range(n)]
        y = np.concatenate([_blocks(xs[s], splits_in(s, n))[rank] for s in range(n)])
        dx = np.concatenate([_blocks(gs[s], splits_out(s, n))[rank] for s in range(n)])
        return y, dx
    shape, out_shape = shapes[name]
    members = list(subgroup(rank)) if name.startswith("subgroup") else list(range(n))
    xs = {r: x_of(r, shape) for r in members}
    gs = {r: cotangent(r, out_shape) for r in members}
    m, me = len(members), members.index(rank)
    if name in ("all_reduce_max", "all_reduce_min"):  # the output gradients all go to the extreme's holder
        pick = np.maximum if name.endswith("max") else np.minimum
        y = functools.reduce(pick, xs.values())
        return y, np.where(xs[rank] == y, sum(gs.values()), 0.0)
    if name.endswith("all_reduce") or name.startswith("all_reduce"):
        div = m if name == "all_reduce_mean" else 1
        return sum(xs.values()) / div, sum(gs.values()) / div
    if name.endswith("all_gather") or name.startswith("all_gather"):
        return np.concatenate([xs[r] for r in members]), sum(np.split(gs[r], m)[me] for r in members)
    if name.startswith("reduce_scatter"):
        div = m if name.endswith("mean") else 1
        return np.split(sum(xs.values()), m)[me] / div, np.concatenate([gs[r] for r in members]) / div
    if name == "broadcast":  # src = 1
        return xs[1], (sum(gs.values()) if rank == 1 else np.zeros(shape))
    if name == "reduce":  # dst = 1
        return (sum(xs.values()) if rank == 1 else np.zeros(shape)), gs[1]
    if name == "all_to_all":
        return (np.concatenate([np.split(xs[r], m)[me] for r in members]),
                np.concatenate([np.split(gs[r], m)[me] for r in members]))
    raise AssertionError(name)


def _run_job(tmp_path_factory, n: int):
    out = tmp_path_factory.mktemp(f"comm{n}")
    job = launch(n, "tests/distributed/comm_script.py", str(out), timeout=240)
    assert job.returncode == 0, job.stderr[-3000:]
    return [dict(np.load(out / f"rank{r}.npz")) for r in range(n)]


def _check(results, n: int, name: str, mode: str):
    for rank in range(n):
        y, dx = _expected(name, rank, n)
        np.testing.assert_allclose(results[rank][f"{name}/{mode}/y"], y, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(results[rank][f"{name}/{mode}/dx"], dx, rtol=1e-12, atol=1e-12)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return _run_job(tmp_path_factory, 2)


@pytest.mark.dist
@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode", ["eager", "graph"])
@pytest.mark.parametrize("name", [c[0] for c in cases(0, 2)])
def test_collective_and_its_gradient(results, name, mode):
    _check(results, 2, name, mode)


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_collectives_on_four_workers_and_subgroups(tmp_path_factory):
    results = _run_job(tmp_path_factory, 4)
    for name in [c[0] for c in cases(0, 4)]:
        for mode in ("eager", "graph"):
            _check(results, 4, name, mode)
    for rank in range(4):
        np.testing.assert_allclose(results[rank]["bucket/a"], sum(x_of(r, (2, 3)) for r in range(4)) / 4, rtol=1e-12)


@pytest.mark.dist
@pytest.mark.timeout(180)
def test_bucket_all_reduce_is_the_mean_of_each_piece(results):
    for rank in range(2):
        np.testing.assert_allclose(results[rank]["bucket/a"], sum(x_of(r, (2, 3)) for r in range(2)) / 2, rtol=1e-12)
        np.testing.assert_allclose(results[rank]["bucket/b"], sum(x_of(r + 5, (4,)) for r in range(2)) / 2,
                                   rtol=1e-12)


@pytest.mark.dist
@pytest.mark.timeout(180)
def test_a_persistent_bucket_is_refilled_each_step_and_never_overwrites_its_input(results):
    mean_a = sum(x_of(r, (2, 3)) for r in range(2)) / 2
    mean_b = sum(x_of(r + 5, (4,)) for r in range(2)) / 2
    expected_a = [mean_a, 2 * mean_a, 2 * mean_a]  # step 2 reduces step 1's (equal) result again
    for rank in range(2):
        for step in range(3):
            np.testing.assert_allclose(results[rank][f"held/{step}/a"], expected_a[step], rtol=1e-12)
            np.testing.assert_allclose(results[rank][f"held/{step}/b"], mean_b, rtol=1e-12)


@pytest.mark.dist
@pytest.mark.timeout(180)
def test_sparse_all_gather_keeps_rows_of_unequal_counts(results):
    indices = np.concatenate([np.arange(2 + r) + 10 * r for r in range(2)])
    values = np.concatenate([x_of(r, (2 + r, 2)) for r in range(2)]) / 2
    for rank in range(2):
        np.testing.assert_array_equal(results[rank]["sparse/indices"], indices)
        np.testing.assert_allclose(results[rank]["sparse/values"], values, rtol=1e-12)


def test_states_rules_resolve_partial_and_split_parts():
    import luoshu as ls
    from luoshu.core.dstates import DUPLICATE, PARTIAL

    rule = lambda name, ds: ls.core.get_opdef(name).deduce_states([ds])[0]  # noqa: E731
    assert rule("all_reduce", ls.DStates(4, {PARTIAL: 4})) == ls.DStates.duplicate(4)
    assert rule("all_reduce", ls.DStates(4, {PARTIAL: 2, 1: 2})) == ls.DStates(4, {DUPLICATE: 2, 1: 2})
    assert rule("reduce_scatter", ls.DStates(2, {PARTIAL: 2})) == ls.DStates(2, {0: 2})
    assert rule("all_gather", ls.DStates(4, {0: 2, DUPLICATE: 2}, order=(0, DUPLICATE))) == ls.DStates.duplicate(4)
    assert rule("all_reduce", None) is None
    with pytest.raises(ls.Error, match="no partial part"):
        rule("all_reduce", ls.DStates.duplicate(2))
    with pytest.raises(ls.Error, match=r"no split\(0\) part"):
        rule("all_gather", ls.DStates(2, {1: 2}))


@pytest.mark.parametrize("reduce", ["max", "min"])
def test_an_extremum_all_reduce_shares_its_gradient_among_tied_members(reduce):
    """Three simulated members in lockstep (one process): where two members hold the extreme, each
    gets half of the summed output gradients, as torch.amax shares them among tied elements."""
    import torch

    import luoshu as ls
    from luoshu.compiler import states as ST

    xs = [torch.tensor([1.0, 5.0, -2.0], dtype=torch.float64), torch.tensor([3.0, 5.0, -2.0], dtype=torch.float64),
          torch.tensor([3.0, 0.0, 4.0], dtype=torch.float64)]
    gs = [torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64) * (r + 1) for r in range(3)]
    graphs, values, fetched = [], [], []
    for r in range(3):
        with ls.Graph() as g:
            x = ls.placeholder("x", (3,), "float64")
            cot = ls.placeholder("g", (3,), "float64")
            y = ls.ops.all_reduce(x, reduce=reduce, group=(0, 1, 2))
            (dx,) = ls.gradients(y, [x], [cot])
        graphs.append(g)
        values.append({id(x): xs[r], id(cot): gs[r]})
        fetched.append((y, dx))
    ST.run_lockstep(graphs, values)
    stacked = torch.stack(xs).requires_grad_(True)
    want = stacked.amax(0) if reduce == "max" else stacked.amin(0)
    (want_dx,) = torch.autograd.grad(want, stacked, sum(gs))  # every member's cotangent reaches the output
    for r, (y, dx) in enumerate(fetched):
        torch.testing.assert_close(values[r][id(y)], want.detach(), rtol=0, atol=0)
        torch.testing.assert_close(values[r][id(dx)], want_dx[r], rtol=1e-12, atol=1e-12)


def test_an_unknown_reduction_is_refused():
    import luoshu as ls

    with pytest.raises(ls.Error, match=r"all_reduce: reduce must be one of \('sum', 'mean', 'max', 'min'\), "
                                       r"found 'prod'"):
        ls.ops.all_reduce(ls.tensor([1.0]), reduce="prod")
