"""Mixed precision in sharded jobs: fp16 loss scaling whose overflow check agrees across the ranks."""

from __future__ import annotations

import numpy as np
import pytest

import luoshu as ls
from tests.distributed.launcher import launch
from tests.parallel.fp16_skip_train import Net


def _one_process_weights() -> np.ndarray:
    """One process, the same fp16 autocast: the finite batches of steps 0 and 2 (step 1 skipped)."""
    ls.manual_seed(3)
    model = Net()
    opt = ls.optim.SGD(model.parameters(), lr=0.1)
    scaler = ls.optim.LossScaler(init_scale=2.0**10)
    with ls.Graph() as g:
        x = ls.placeholder("x", (None, 4))
        with ls.autocast("float16"):
            loss = ls.ops.sum(model(x).astype("float32") ** 2)
        step = opt.minimize(loss, loss_scaler=scaler)
    rng = np.random.default_rng(0)
    for i in range(3):
        batch = rng.standard_normal((3, 4)).astype(np.float32)
        if i != 1:
            g.run([step], {x: batch})
    return model.fc.weight.value.numpy()


@pytest.fixture(scope="module")
def fp16_job(tmp_path_factory):
    """One 2-process job runs every case of fp16_skip_train.py; the prefix of its result files."""
    out = tmp_path_factory.mktemp("fp16") / "fp16"
    proc = launch(2, "tests/parallel/fp16_skip_train.py", "--out", str(out), timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.dist
def test_fp16_overflow_on_one_tp_rank_skips_the_step_on_every_rank(fp16_job):
    """Without the agreement rank 0 (finite gradients) would step and keep its scale while rank 1 skips."""
    out = fp16_job
    expected = _one_process_weights()
    for name in ("tp-group", "every-worker"):
        runs = [np.load(f"{out}.{name}.rank{r}.npz") for r in range(2)]
        for run in runs:
            assert run["moved"].tolist() == [True, False, True], name
            assert run["scales"].tolist() == [2.0**10, 2.0**9, 2.0**9], name
        full = np.concatenate([run["weights"][-1] for run in runs], axis=0)  # column-split: rows of the weight
        np.testing.assert_allclose(full, expected, rtol=0, atol=1e-3, err_msg=name)


@pytest.mark.dist
def test_fp16_zero_skips_a_step_whose_overflow_one_shard_holds_on_every_rank(fp16_job):
    """ZeRO-1/2 with a loss scaler (refused before): after the reduce-scatter only rank 1's shard holds
    the inf; both ranks skip (without the agreement the ranks part ways and the job hangs) and then
    train on like plain data parallelism, whose all-reduce spreads the inf."""
    out = fp16_job
    plain = [np.load(f"{out}.zero0.rank{r}.npz") for r in range(2)]
    assert plain[0]["moved"].tolist() == [True, False, True]
    for zero in (1, 2):
        for r in range(2):
            run = np.load(f"{out}.zero{zero}.rank{r}.npz")
            assert run["moved"].tolist() == [True, False, True], (zero, r)
            assert run["scales"].tolist() == [2.0**10, 2.0**9, 2.0**9], (zero, r)
            np.testing.assert_allclose(run["weights"], plain[r]["weights"], rtol=0, atol=1e-6, err_msg=str(zero))
