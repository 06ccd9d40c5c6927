"""`ls.save` / `ls.load` through luoshu.parallel's layout hook: ZeRO's sharded optimizer state
(the tensor-parallel cases run on 4 processes in test_tensor_parallel.py)."""

from __future__ import annotations

import numpy as np

import luoshu as ls
from tests.parallel.test_zero import _steps
from tests.parallel.zero_train import Net, batches


def _plain(seed=7):
    ls.manual_seed(seed)
    model = Net().to(dtype="float64")
    return model, ls.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.01)


def test_a_zero_checkpoint_loads_into_a_plain_run_and_back(tmp_path):
    """Plain 2 steps -> ls.save; ZeRO job ls.load, 2 steps -> ls.save; plain job ls.load, 1 step:
    the same parameters and optimizer state as 5 plain steps (the reference)."""
    data = list(batches(1, 4, steps=5))
    ref_model, ref_opt = _plain()
    _steps(ref_model, ref_opt, data)

    model, opt = _plain()
    _steps(model, opt, data[:2])
    ls.save(tmp_path / "plain", model, opt)

    zmodel, zopt = _plain(seed=1)  # other initial values: everything must come from the checkpoint
    dp = ls.parallel.DataParallel(zmodel, zopt, zero=1)
    ls.load(tmp_path / "plain", zmodel, zopt)  # into the shards (through dp.sync.load_state_dict)
    _steps(zmodel, zopt, data[2:4], dp)
    assert dp.sync.groups, "ZeRO laid out its shards"
    ls.save(tmp_path / "zero", zmodel, zopt)  # dp.sync.consolidated_state_dict()

    back, back_opt = _plain(seed=2)
    ls.load(tmp_path / "zero", back, back_opt)
    _steps(back, back_opt, data[4:])
    for (name, a), b in zip(ref_model.named_parameters(), back.parameters()):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-12, atol=1e-14, err_msg=name)
    got, expected = back_opt.state_dict(), ref_opt.state_dict()
    assert sorted(got["tensors"]) == sorted(expected["tensors"])
    for key, value in expected["tensors"].items():
        np.testing.assert_allclose(got["tensors"][key].numpy(), value.numpy(), rtol=1e-12, atol=1e-14, err_msg=key)
    assert got["meta"]["state"] == expected["meta"]["state"]
