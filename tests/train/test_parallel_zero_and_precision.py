"""`luoshu train --dp/--tp/--pp` with ZeRO over the DP axis and with mixed precision, under `luoshu launch`,
against a one-process run of the same global batch (the harness of test_parallel_run.py).

bf16 rounds every matmul input to 8 significant bits, in another order on a split run (split
matmuls, all-reduces of bf16 partial sums): the losses of two bf16 runs agree to about 1e-4
relative after four steps (measured: 1.2e-4 tp2, 4e-5 pp2), hence rtol 2e-3 there; fp32 runs keep
test_parallel_run's 1e-5.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from luoshu.train import TrainConfig, TrainConfigError
from tests.train.test_parallel_run import JOB, _check_rows, _check_weights, _final_weights, _launched, _one_process


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "job"
    return _one_process(out), _final_weights(out)


def _close_rows(got: list[dict], expected: list[dict], rtol: float) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    for key in ("train_loss", "perplexity"):
        np.testing.assert_allclose([float(r[key]) for r in got], [float(r[key]) for r in expected], rtol=rtol,
                                   err_msg=key)


@pytest.mark.dist
@pytest.mark.slow
def test_zero3_dp2_tp2_from_yaml_resumes_under_zero1_and_equals_one_process(tmp_path, reference):
    """The ZeRO-3 x TP job's checkpoint (consolidated over DP, gathered over TP) resumes under ZeRO-1 x TP."""
    rows, weights = reference
    job = tmp_path / "job"
    config = tmp_path / "zero.yaml"
    config.write_text(yaml.safe_dump({"dp": 2, "tp": 2, "zero": 3}))
    _launched(4, job, "--config", str(config), steps=2)
    resumed = _launched(4, job, "--dp", "2", "--tp", "2", "--zero", "1", extra=("--resume",))
    _check_rows(resumed, rows)
    _check_weights(_final_weights(job), weights)


@pytest.mark.dist
@pytest.mark.slow
def test_zero2_dp2_pp2_resumes_in_a_plain_pipeline_and_equals_one_process(tmp_path, reference):
    """`luoshu train --dp 2 --pp 2 --zero 2`: each stage sharded over its DP group; its checkpoint (the
    shards consolidated, the stages gathered) resumes in a plain dp2 x pp2 job, which equals one process."""
    rows, weights = reference
    job = tmp_path / "job"
    _launched(4, job, "--dp", "2", "--pp", "2", "--micro-batches", "2", "--zero", "2", steps=2)
    resumed = _launched(4, job, "--dp", "2", "--pp", "2", "--micro-batches", "2", extra=("--resume",))
    _check_rows(resumed, rows)
    _check_weights(_final_weights(job), weights)


@pytest.mark.dist
@pytest.mark.slow
def test_zero3_dp2_pp2_trains_evaluates_and_resumes_like_one_process(tmp_path, reference):
    """`luoshu train --dp 2 --pp 2 --zero 3`: each stage's parameters sharded over its DP group (gathered
    for every evaluation, one per step here); two steps, its checkpoint (the shards consolidated, the
    stages gathered), then resumed under zero 3 (the checkpoint re-sharded): the losses, metrics and
    final weights of one process. `--profile-memory` (the first step through the stage plans' accounting)
    reports each rank's bytes: parameters and optimizer state 1/dp of the plain pipeline's."""
    rows, weights = reference
    job = tmp_path / "job"
    layout = ("--dp", "2", "--pp", "2", "--micro-batches", "2")
    _launched(4, job, *layout, "--zero", "3", "--profile-memory", steps=2)
    resumed = _launched(4, job, *layout, "--zero", "3", extra=("--resume",))
    _check_rows(resumed, rows)
    _check_weights(_final_weights(job), weights)
    _launched(4, tmp_path / "plain", *layout, "--profile-memory", steps=1)
    zero = json.loads((job / "memory.json").read_text())
    plain = json.loads((tmp_path / "plain" / "memory.json").read_text())
    assert (zero["zero"], plain["zero"]) == (3, 0) and len(zero["ranks"]) == len(plain["ranks"]) == 4
    for z, p in zip(zero["ranks"], plain["ranks"]):
        assert (z["rank"], z["stage"]) == (p["rank"], p["stage"])
        for key in ("parameters", "optimizer_state"):  # 1/dp, up to each unit's padding and the step counters
            assert p[key] / 2 - 64 <= z[key] <= p[key] / 2 + 1024, (key, z, p)
        assert z["peak_gathered_parameters"] > 0 == p["peak_gathered_parameters"]


@pytest.mark.dist
@pytest.mark.slow
def test_zero3_dp2_tp2_pp2_equals_one_process(tmp_path, reference):
    """Eight processes: each rank's TP blocks of its stage sharded over the stage's DP group."""
    rows, weights = reference
    job = tmp_path / "job"
    _check_rows(_launched(8, job, "--dp", "2", "--tp", "2", "--pp", "2", "--micro-batches", "2", "--zero", "3"), rows)
    _check_weights(_final_weights(job), weights)


@pytest.mark.dist
@pytest.mark.slow
def test_zero1_dp2_pp2_equals_one_process(tmp_path, reference):
    rows, weights = reference
    job = tmp_path / "job"
    _check_rows(_launched(4, job, "--dp", "2", "--pp", "2", "--micro-batches", "2", "--zero", "1"), rows)
    _check_weights(_final_weights(job), weights)


@pytest.fixture(scope="module")
def bf16_reference(tmp_path_factory):
    return _one_process(tmp_path_factory.mktemp("bf16") / "job", precision="bf16")


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("layout", [("--tp", "2"), ("--pp", "2", "--micro-batches", "2")])
def test_bf16_two_process_layouts_equal_one_process_under_the_same_autocast(tmp_path, reference, bf16_reference,
                                                                             layout):
    got = _launched(2, tmp_path / "job", *layout, "--precision", "bf16")
    _close_rows(got, bf16_reference, rtol=2e-3)
    fp32 = [float(r["train_loss"]) for r in reference[0]]
    assert [float(r["train_loss"]) for r in got] != fp32  # it did not train in fp32


@pytest.mark.dist
@pytest.mark.slow
def test_fp16_dp2_tp2_equals_one_process_with_loss_scaling(tmp_path):
    expected = _one_process(tmp_path / "one", precision="fp16")
    _close_rows(_launched(4, tmp_path / "job", "--dp", "2", "--tp", "2", "--precision", "fp16"), expected, rtol=2e-3)


@pytest.mark.parametrize(
    "changes,world,message",
    [
        ({"pp": 2, "precision": "fp16"}, 2, r"precision 'fp16' with pp = 2: the pipeline's update has no loss scaling"),
        ({"dp": 2, "tp": 2, "zero": 1}, 2, r"= 4 must equal the world size of the launch, found 2"),
    ],
)
def test_check_config_refuses_zero_and_precision_layouts_not_built(monkeypatch, tmp_path, changes, world, message):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises(TrainConfigError, match=message):
        TrainConfig.from_dict({**JOB, "out": str(tmp_path / "job"), **changes})


@pytest.mark.parametrize("changes,world", [({"dp": 2, "tp": 2, "zero": 2}, 4), ({"dp": 2, "tp": 2, "zero": 3}, 4),
                                           ({"tp": 2, "precision": "bf16"}, 2),
                                           ({"dp": 2, "precision": "fp16"}, 2),
                                           ({"pp": 2, "precision": "bf16"}, 2),
                                           ({"dp": 2, "pp": 2, "zero": 1}, 4), ({"dp": 2, "pp": 2, "zero": 2}, 4),
                                           ({"dp": 2, "pp": 2, "zero": 3}, 4),
                                           ({"dp": 2, "tp": 2, "pp": 2, "zero": 3}, 8)])
def test_check_config_allows_zero_over_dp_tp_and_mixed_precision(monkeypatch, tmp_path, changes, world):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    config = TrainConfig.from_dict({**JOB, "out": str(tmp_path / "job"), **changes})
    assert all(getattr(config, k) == v for k, v in changes.items())
