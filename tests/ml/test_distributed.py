"""Data-parallel luoshu.ml training on 2 local processes (Gloo) against one process on all the data."""

import numpy as np
import pytest

from luoshu import ml
from tests.dist.launcher import launch
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
