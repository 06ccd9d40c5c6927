"""Data-parallel luoshu.ml training on 2 local processes (Gloo) against one process on all the data."""

import numpy as np
import pytest

from luoshu import ml
from tests.distributed.launcher import launch
from tests.ml import dist_gbdt_script as script


@pytest.mark.dist
@pytest.mark.timeout(240)
def test_two_workers_grow_the_trees_of_one_process(tmp_path):
    job = launch(2, "tests/ml/dist_gbdt_script.py", str(tmp_path / "out"), timeout=200)
    assert job.returncode == 0, job.stderr[-3000:]
    for kind in ("binary", "multiclass"):
        X, y = script.data(kind)
        single = script.tree_arrays(ml.GBDTClassifier(**script.PARAMS).fit(X, y))
        for rank in range(2):
            got = dict(np.load(tmp_path / f"out.{kind}.rank{rank}.npz"))
            assert set(got) == set(single)
            for key, want in single.items():
                if key.endswith(("split_feature", "split_bin", "left_child", "right_child", "default_left")):
                    np.testing.assert_array_equal(got[key], want, err_msg=key)  # the same structure
                else:
                    np.testing.assert_allclose(got[key], want, rtol=1e-9, atol=1e-12, err_msg=key)


@pytest.mark.dist
@pytest.mark.slow  # ~25 s on a busy machine; test_fm.py covers PS training with in-process servers by default
@pytest.mark.timeout(240)
def test_fm_on_two_workers_and_a_server_reaches_the_single_process_loss(tmp_path):
    from luoshu.ml.fm import FactorizationMachine
    from tests.ml import dist_fm_script
    from tests.ml.test_fm import fm_data

    job = launch(2, "tests/ml/dist_fm_script.py", str(tmp_path / "fm"), timeout=200, extra=("--servers", "1"))
    assert job.returncode == 0, job.stderr[-3000:]
    X, y, _ = fm_data(n=3000)
    params = dict(dist_fm_script.PARAMS, batch_size=2 * dist_fm_script.PARAMS["batch_size"])  # 2 workers x b
    single = FactorizationMachine(**params).fit(X, y)
    r0, r1 = (np.load(tmp_path / f"fm.rank{r}.npz") for r in range(2))
    np.testing.assert_array_equal(r0["ids"], r1["ids"])
    np.testing.assert_allclose(r0["V"], r1["V"])  # one model on the servers
    mean_loss = (r0["loss"][-1] + r1["loss"][-1]) / 2
    assert mean_loss == pytest.approx(single.loss_curve_[-1], rel=0.05)
