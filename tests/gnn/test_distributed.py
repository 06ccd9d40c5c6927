"""Data-parallel mini-batch GraphSAGE over `luoshu launch -n 2` matches one process at the
doubled batch: DataParallel with all-reduced mean gradients, eager and on a sampled
define-and-run graph, and the HET path (a node
embedding table on a parameter server, mode "hybrid", read through the worker cache)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.distributed.launcher import launch
from tests.gnn.dp_graphsage import train


@pytest.mark.dist
@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["eager", "define-and-run"])
def test_two_workers_match_one_process_at_twice_the_batch(tmp_path, mode):
    # the reference is always one eager process: the define-and-run workers (one recorded
    # graph on BlockPlaceholders, fed a sampled batch per step) must follow it too
    prefix = tmp_path / "params"
    flags = ("--graph",) if mode == "define-and-run" else ()
    result = launch(2, "tests/gnn/dp_graphsage.py", "--batch", "60", "--out", str(prefix), *flags, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    reference = train(120, rank=0, world_size=1, data_parallel=False)
    for rank in range(2):
        got = np.load(f"{prefix}.rank{rank}.npz")
        assert sorted(got.files) == sorted(reference)
        for name, value in reference.items():
            np.testing.assert_allclose(got[name], value, rtol=1e-4, atol=1e-5, err_msg=f"rank {rank} {name}")
    # the run trained: the parameters moved away from worker 0's initial ones
    assert not np.allclose(reference["convs.0.lin_l.weight"], train(120, 0, 1, False, epochs=0)["convs.0.lin_l.weight"])


@pytest.mark.dist
@pytest.mark.slow  # about 35 s on two busy cores: a server process and two workers
@pytest.mark.timeout(300)
def test_het_node_embeddings_on_the_servers_match_one_process(tmp_path):
    from luoshu import ps
    from tests.gnn.het_dp_graphsage import DIM, NODES, PREFIX
    from tests.gnn.het_dp_graphsage import train as het_train

    prefix = tmp_path / "het"
    result = launch(
        2, "tests/gnn/het_dp_graphsage.py", "--batch", "40", "--out", str(prefix), timeout=240, extra=("--servers", "1")
    )
    assert result.returncode == 0, result.stderr[-3000:]
    reference = het_train(80, 0, 1, data_parallel=False)
    for rank in range(2):
        got = np.load(f"{prefix}.rank{rank}.npz")
        for name, value in reference.items():
            np.testing.assert_allclose(got[name], value, rtol=1e-4, atol=1e-5, err_msg=f"rank {rank} {name}")
    initial = ps.initial_rows(PREFIX + "node_embedding", np.arange(NODES), DIM, ("normal", 0.0, 1.0))
    assert not np.allclose(reference["table"], initial)  # the rows trained
