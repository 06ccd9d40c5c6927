"""Mixed precision in sharded jobs: fp16 loss scaling whose overflow check agrees across the ranks."""

from __future__ import annotations

import numpy as np
import pytest

import luoshu as ls
from tests.distributed.launcher import launch
from tests.parallel.fp16_tp_skip import Net


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


@pytest.mark.dist
def test_fp16_overflow_on_one_tp_rank_skips_the_step_on_every_rank(tmp_path):
    """Without the agreement rank 0 (finite gradients) would step and keep its scale while rank 1 skips."""
    out = tmp_path / "fp16"
    proc = launch(2, "tests/parallel/fp16_tp_skip.py", "--out", str(out), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = _one_process_weights()
    for name in ("tp-group", "every-worker"):
        runs = [np.load(f"{out}.{name}.rank{r}.npz") for r in range(2)]
        for run in runs:
            assert run["moved"].tolist() == [True, False, True], name
            assert run["scales"].tolist() == [2.0**10, 2.0**9, 2.0**9], name
        full = np.concatenate([run["weights"][-1] for run in runs], axis=0)  # column-split: rows of the weight
        np.testing.assert_allclose(full, expected, rtol=0, atol=1e-3, err_msg=name)
