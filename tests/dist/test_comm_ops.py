"""Comm ops on 2 launched workers, forward and gradient, eager and define-and-run, against NumPy."""

from __future__ import annotations

import numpy as np
import pytest

from tests.dist.comm_script import SPLITS_IN, SPLITS_OUT, cases, cotangent, x_of
from tests.dist.launcher import launch

N = 2


def _blocks(a: np.ndarray, sizes) -> list[np.ndarray]:
    return np.split(a, np.cumsum(sizes)[:-1])


def _expected(name: str, rank: int):
    """(output, input gradient) of worker `rank`, from every worker's input and cotangent."""
    shape = {c[0]: c[1] for c in cases(0)}[name]
    out_shape = {c[0]: c[3] for c in cases(0)}[name]
    if name == "all_to_all_unequal":
        xs = [x_of(r, (sum(SPLITS_IN[r]), 2)) for r in range(N)]
        gs = [cotangent(r, (sum(SPLITS_OUT[r]), 2)) for r in range(N)]
        y = np.concatenate([_blocks(xs[s], SPLITS_IN[s])[rank] for s in range(N)])
        dx = np.concatenate([_blocks(gs[s], SPLITS_OUT[s])[rank] for s in range(N)])
        return y, dx
    xs = [x_of(r, shape) for r in range(N)]
    gs = [cotangent(r, out_shape) for r in range(N)]
    if name.startswith("all_reduce"):
        div = N if name == "all_reduce_mean" else 1
        return sum(xs) / div, sum(gs) / div
    if name.startswith("all_gather"):
        return np.concatenate(xs), sum(np.split(g, N)[rank] for g in gs)
    if name.startswith("reduce_scatter"):
        div = N if name.endswith("mean") else 1
        return np.split(sum(xs), N)[rank] / div, np.concatenate(gs) / div
    if name == "broadcast":  # src = 1
        return xs[1], (sum(gs) if rank == 1 else np.zeros(shape))
    if name == "reduce":  # dst = 1
        return (sum(xs) if rank == 1 else np.zeros(shape)), gs[1]
    if name == "all_to_all":
        return (np.concatenate([np.split(x, N)[rank] for x in xs]),
                np.concatenate([np.split(g, N)[rank] for g in gs]))
    raise AssertionError(name)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("comm")
    job = launch(N, "tests/dist/comm_script.py", str(out))
    assert job.returncode == 0, job.stderr[-3000:]
    return [dict(np.load(out / f"rank{r}.npz")) for r in range(N)]


@pytest.mark.dist
@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", ["eager", "graph"])
@pytest.mark.parametrize("name", [c[0] for c in cases(0)])
def test_collective_and_its_gradient(results, name, mode):
    for rank in range(N):
        y, dx = _expected(name, rank)
        np.testing.assert_allclose(results[rank][f"{name}/{mode}/y"], y, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(results[rank][f"{name}/{mode}/dx"], dx, rtol=1e-12, atol=1e-12)


@pytest.mark.dist
@pytest.mark.timeout(180)
def test_bucket_all_reduce_is_the_mean_of_each_piece(results):
    for rank in range(N):
        np.testing.assert_allclose(results[rank]["bucket/a"], sum(x_of(r, (2, 3)) for r in range(N)) / N, rtol=1e-12)
        np.testing.assert_allclose(results[rank]["bucket/b"], sum(x_of(r + 5, (4,)) for r in range(N)) / N,
                                   rtol=1e-12)


@pytest.mark.dist
@pytest.mark.timeout(180)
def test_sparse_all_gather_keeps_rows_of_unequal_counts(results):
    indices = np.concatenate([np.arange(2 + r) + 10 * r for r in range(N)])
    values = np.concatenate([x_of(r, (2 + r, 2)) for r in range(N)]) / N
    for rank in range(N):
        np.testing.assert_array_equal(results[rank]["sparse/indices"], indices)
        np.testing.assert_allclose(results[rank]["sparse/values"], values, rtol=1e-12)
