"""DataParallel(mode="ps" | "hybrid") on N workers and parameter servers started by `luoshu launch`.

With staleness 0, N workers at batch b follow one process at batch N*b (a plain local
luoshu run, its table starting from the rows the servers start from), in eager and graph
mode, with SGD+momentum and Adam. With staleness > 0 and a cache, the synthetic power-law
CTR task still trains to a good AUC. Workers start from different random weights on
purpose: worker 0's dense values must reach everyone.
"""

from __future__ import annotations

import numpy as np
import pytest

import luoshu as ls
from tests.distributed.launcher import launch
from tests.parallel.ps_modes_train import Net, train

PARITY_RUNS = ["ps:eager:sgd", "ps:graph:adam", "hybrid:eager:adam", "hybrid:graph:sgd"]
# the HET cache at staleness 0 must be exact too: N workers through their caches == one process
CACHED_RUNS = ["ps:eager:adam:cache-lru", "hybrid:graph:sgd:cache-lfu"]


def _run_job(tmp_path, workers: int, runs: list[str], batch: int, ctr_steps: int = 80, timeout: float = 240):
    job = launch(workers, "tests/parallel/ps_modes_train.py", "--runs", ",".join(runs), "--batch", str(batch),
                 "--ctr-steps", str(ctr_steps), "--out", str(tmp_path / "res"), timeout=timeout,
                 extra=("--servers", "1"))
    assert job.returncode == 0, job.stderr[-3000:]
    return [np.load(tmp_path / f"res.rank{r}.npz") for r in range(workers)]


def _check_parity(per_rank, runs, workers, batch):
    for run in runs:
        reference = train(run, workers * batch, 1, 0, data_parallel=False)
        for name, expected in reference.items():
            for rank, got in enumerate(per_rank):
                np.testing.assert_allclose(got[f"{run}/{name}"], expected, rtol=1e-5, atol=1e-5,
                                           err_msg=f"{run}: {name} on worker {rank}")


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_two_workers_match_one_process_and_stale_ctr_training_converges(tmp_path):
    ctr = "ctr:hybrid:wdl:2"
    per_rank = _run_job(tmp_path, 2, PARITY_RUNS + CACHED_RUNS + [ctr], batch=4)
    _check_parity(per_rank, PARITY_RUNS + CACHED_RUNS, 2, 4)
    for run in CACHED_RUNS:  # (at staleness 0 every touched row is pushed, so hits are rare: count lookups)
        for got in per_rank:
            assert got[f"{run}/cache_lookups"].min() > 0 and got[f"{run}/cache_evictions"].min() > 0, run
    assert per_rank[0][f"{ctr}/auc"] > 0.7
    for got in per_rank:
        assert got[f"{ctr}/stats/{ctr}/embedding"] > 0.2  # the power-law head stays cached across steps
        assert 0 <= got[f"{ctr}/max_lag"] <= 2  # never served more than staleness versions behind


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_four_workers_and_dcn_in_ps_mode(tmp_path):
    ctr = ["ctr:ps:dcn:3", "ctr:hybrid:dcn:1"]
    per_rank = _run_job(tmp_path, 4, PARITY_RUNS + ctr, batch=3, ctr_steps=100, timeout=560)
    _check_parity(per_rank, PARITY_RUNS, 4, 3)
    for run in ctr:
        assert per_rank[0][f"{run}/auc"] > 0.7
        assert all(got[f"{run}/max_lag"] <= int(run.split(":")[-1]) for got in per_rank)


def test_ps_modes_need_servers_and_a_model():
    model = Net()
    opt = ls.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ls.distributed.DistError, match="--servers"):
        ls.parallel.DataParallel(model, opt, mode="ps")
    with pytest.raises(ls.distributed.DistError, match="cache_capacity"):
        ls.parallel.DataParallel(model, opt, mode="hybrid", cache_size=10)
    assert isinstance(model.embedding, ls.nn.Embedding)  # refused before anything changed
    with ls.Graph() as g:
        ids = ls.placeholder("ids", (None, 3), "int64")
        dense = ls.placeholder("dense", (None, 5), "float32")
        opt.minimize(model(ids, dense).sum())
    with pytest.raises(ls.distributed.DistError, match="model and its optimizer"):
        ls.parallel.DataParallel(g, mode="hybrid")
