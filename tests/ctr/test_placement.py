"""Embedding placements over 2 processes (rows sharded by key, whole slots per rank, or on a parameter
server through the HET cache with staleness 0) give the parameters one process gets at the same global batch."""

from __future__ import annotations

import numpy as np
import pytest

from tests.ctr.conftest import generate
from tests.ctr.placement_train import run
from tests.distributed.launcher import launch

RUNS = ["distributed:Local", "localized:Local", "distributed:Global", "parameter_server:Local"]


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_three_placements_match_one_process(tmp_path):
    source, eval_source = generate(tmp_path, files=1, per_file=1024)
    job = launch(2, "tests/ctr/placement_train.py", str(tmp_path / "out.npz"), str(source), str(eval_source),
                 ",".join(RUNS), timeout=240, extra=("--servers", "1"))
    assert job.returncode == 0, job.stderr[-3000:]
    got = np.load(tmp_path / "out.npz")
    for spec in RUNS:
        update = spec.split(":")[1]
        expected = run(source, eval_source, "auto", update)  # this process alone: one whole table
        for name, value in expected.items():
            np.testing.assert_allclose(got[f"{spec}/{name}"], value, rtol=1e-4, atol=1e-5, err_msg=f"{spec} {name}")
        assert got[f"{spec}/auc"] == pytest.approx(float(expected["auc"]), abs=1e-3)
