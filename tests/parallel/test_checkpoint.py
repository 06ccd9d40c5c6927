"""`ls.save` / `ls.load` through luoshu.parallel's layout hook: ZeRO's sharded optimizer state
(the tensor-parallel cases run on 4 processes in test_tensor_parallel.py)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

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


def _one_process(seed: int, data: list, resume=None):
    """GPT-2 (float64) trained in one process on the whole batches of `data` (from checkpoint `resume`)."""
    from tests.parallel import pp_train

    ls.manual_seed(seed)
    model = pp_train.build("gpt2", 2)
    opt = ls.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    if resume is not None:
        ls.load(resume, model, opt)
    with ls.Graph() as g:
        ids = ls.placeholder("ids", (None, pp_train.LENGTH), "int64")
        y = ls.placeholder("y", (None, pp_train.LENGTH), "int64")
        loss = pp_train.loss_fn(model(ids), y)
        step = opt.minimize(loss)
    for i, t in data:
        g.run([loss, step], {ids: i, y: t})
    return model, opt


def _assert_same(model, opt, ref_model, ref_opt, atol):
    from tests.parallel.tp_checkpoint import full_state

    got, expected = full_state(model, opt), full_state(ref_model, ref_opt)
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, rtol=0, atol=atol, err_msg=key)


@pytest.mark.dist
@pytest.mark.parametrize(
    "pp, tp, dp, zero",
    [
        (2, 1, 1, 0),
        pytest.param(2, 2, 1, 0, marks=pytest.mark.slow),
        pytest.param(2, 1, 2, 1, marks=pytest.mark.slow),
        pytest.param(2, 1, 2, 2, marks=pytest.mark.slow),
        pytest.param(2, 1, 2, 3, marks=pytest.mark.slow),
        pytest.param(2, 2, 2, 1, marks=pytest.mark.slow),
        pytest.param(2, 2, 2, 3, marks=pytest.mark.slow),
    ],
)
def test_a_pipeline_checkpoint_loads_into_one_process_and_back(tmp_path, pp, tp, dp, zero):
    """`ls.save` called directly on every rank of a pipeline job writes the whole model and optimizer
    state (the stages gathered; under ZeRO each stage's shards consolidated over its DP group first):
    loaded into one process it holds exactly the stages' trained values and matches one process
    trained on the same batches; a one-process checkpoint loaded into the pipeline (its ZeRO shards)
    resumes training as one process does. A save whose write fails on rank 0 raises on every rank and
    keeps the checkpoint saved there before (which then loads as above); a corrupt checkpoint loaded
    into the trained pipeline is refused on every rank and changes nothing it holds (its shards, its
    optimizer state), nor the good checkpoint it was copied from."""
    from tests.distributed.launcher import launch
    from tests.parallel import pp_train

    data = list(pp_train.batches())
    ref_model, ref_opt = _one_process(11, data[:2])
    ls.save(tmp_path / "reference", ref_model, ref_opt)
    good = {f.name: f.read_bytes() for f in (tmp_path / "reference").iterdir()}
    shutil.copytree(tmp_path / "reference", tmp_path / "corrupt")
    weights = tmp_path / "corrupt" / "weights.safetensors"
    corrupted = bytearray(weights.read_bytes())
    corrupted[-5] ^= 0xFF
    weights.write_bytes(bytes(corrupted))
    proc = launch(pp * tp * dp, "tests/parallel/pp_checkpoint.py", "--pp", str(pp), "--tp", str(tp), "--dp", str(dp),
                  "--zero", str(zero), "--resume", str(tmp_path / "reference"), "--out", str(tmp_path),
                  "--bad", str(tmp_path / "corrupt"), timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for r in range(pp * tp * dp):
        raised = json.loads((tmp_path / f"failed_save.rank{r}.json").read_text())["raised"]
        if r == 0:
            assert raised == "OSError: disk full", raised
        else:
            assert raised is not None and "CheckpointError" in raised and "rank 0" in raised, (r, raised)
        bad = json.loads((tmp_path / f"bad.rank{r}.json").read_text())
        assert bad["refused"] is not None and "corrupt" in bad["refused"], (r, bad)
        assert bad["unchanged"] and bad["held"] > 0, (r, bad)
    assert {f.name: f.read_bytes() for f in (tmp_path / "reference").iterdir()} == good

    model, opt = _one_process(5, [])  # other initial values: everything comes from the checkpoint
    ls.load(tmp_path / "trained", model, opt)
    values = dict(model.named_parameters())
    seen = set()
    for r in range(pp * tp * dp):
        stage = np.load(tmp_path / f"stage.rank{r}.npz")
        for name in stage.files:  # the values the stage trained, bit for bit
            np.testing.assert_array_equal(values[name].numpy(), stage[name], err_msg=name)
            seen.add(name)
    assert seen == set(values)
    _assert_same(model, opt, ref_model, ref_opt, atol=1e-6)  # micro-batches: sums in another order

    ref_model, ref_opt = _one_process(5, data[2:], resume=tmp_path / "reference")
    model, opt = _one_process(7, [])
    ls.load(tmp_path / "resumed", model, opt)
    _assert_same(model, opt, ref_model, ref_opt, atol=1e-6)
    for r in range(pp * tp * dp):  # a rank keeps its own stage's state only, as a fresh run holds
        held = json.loads((tmp_path / f"state_bytes.rank{r}.json").read_text())
        assert held["loaded"] == held["fresh"] > 0, (r, held)
