"""ZeRO over the DP axis of a dp x tp mesh (`luoshu.parallel.zero` in the ranks' local graphs)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import luoshu as ls
from luoshu.compiler import states
from tests.distributed.launcher import launch
from tests.parallel import tp_train, zero_tp_train
from tests.parallel.tp_checkpoint import full_state

DP, TP = 2, 2


def _one_process_state(steps_from=None):
    """One process trained like zero_tp_train.train (optionally from a checkpoint): its full state."""
    ls.manual_seed(5)  # other initial values where a checkpoint is loaded: everything must come from it
    model = tp_train.build("gpt2").to(dtype="float64")
    opt = ls.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, max_grad_norm=zero_tp_train.CLIP)
    ls.load(steps_from, model, opt)
    return full_state(model, opt)


def _local_numel(names_split: set) -> int:
    """Elements of one TP rank's parameters: a split parameter 1/TP of its size (independent of the
    code under test: from the one-process model and the Megatron plan's names)."""
    ls.manual_seed(11)
    model = tp_train.build("gpt2")
    return sum(p.value.numel() // (TP if n in names_split else 1) for n, p in model.named_parameters())


@pytest.mark.dist
@pytest.mark.slow
def test_zero_1_2_3_over_dp_of_dp2_tp2_match_one_process_and_checkpoints_cross_layouts(tmp_path):
    """dp2 x tp2 with zero=0, 1, 2, 3 (AdamW, clipping below the gradients' norm) equals one process
    (and an evaluation plan compiled after the steps too); each rank keeps 1/DP of its TP shard's
    optimizer state (ZeRO-3: and of its parameters); a ZeRO-3 x TP checkpoint loads into one
    process, and a one-process checkpoint into ZeRO-2 and ZeRO-3 x TP, which train on like one process."""
    ref_losses, ref_params, ref_memory = zero_tp_train.train()
    unclipped, _ = tp_train.train("gpt2")
    assert np.abs(ref_losses - unclipped).max() > 1e-5  # the clipping takes effect
    plain_ckpt = tmp_path / "plain"
    _, _, _ = zero_tp_train.train(save=plain_ckpt)  # one process, saved after its steps
    ref_load_losses, ref_load_params, _ = zero_tp_train.train(load=plain_ckpt)

    out, ckpt = tmp_path / "run", tmp_path / "zero_tp"
    args = ["--dp", str(DP), "--tp", str(TP), "--zero", "0,1,2,3", "--out", str(out), "--save-zero", "3",
            "--save", str(ckpt), "--load-zero", "2,3", "--load", str(plain_ckpt)]
    proc = launch(DP * TP, "tests/parallel/zero_tp_train.py", *args, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]

    tp = ls.parallel.parallelize(tp_train.build("gpt2"), ls.distributed.DeviceMesh(tp=TP, world_size=TP),
                                 broadcast=False)
    states.set_default(None)
    local = _local_numel(set(tp.split))
    for zero in (0, 1, 2, 3):
        runs = [np.load(f"{out}.zero{zero}.rank{r}.npz") for r in range(DP * TP)]
        mesh_losses = np.mean([runs[r * TP]["losses"] for r in range(DP)], axis=0)  # each DP rank: its half
        np.testing.assert_allclose(mesh_losses, ref_losses, rtol=0, atol=1e-6, err_msg=f"zero={zero}")
        mesh_eval = np.mean([float(runs[r * TP]["eval_loss"]) for r in range(DP)])
        np.testing.assert_allclose(mesh_eval, ref_memory["eval_loss"], rtol=0, atol=1e-6, err_msg=f"zero={zero}")
        for run in runs:
            for name, value in ref_params.items():
                np.testing.assert_allclose(run[name], value, rtol=0, atol=1e-6, err_msg=f"zero={zero} {name}")
        # AdamW: two float64 moments per element (+ float32 step counters); ZeRO: of 1/DP of the TP shard
        moments = [int(run["state_bytes"]) for run in runs]
        expected = 2 * 8 * (local if zero == 0 else -(-local // DP))
        for got in moments:
            assert expected <= got <= expected + 4 * 64, (zero, got, expected)
        for run in runs:  # the float64 parameters the step reads from storage kept between steps
            got = int(run["parameter_bytes"])
            assert (8 * local / DP <= got <= 8 * local / DP + 8 * 64) if zero == 3 else got <= 8 * local, (zero, got)

    saved = _one_process_state(ckpt)  # the ZeRO-3 x TP checkpoint, in one process
    expected_state = _reference_state()
    assert set(saved) == set(expected_state)
    for k, v in expected_state.items():
        np.testing.assert_allclose(saved[k], v, rtol=0, atol=1e-8, err_msg=k)

    for zero, r in itertools.product((2, 3), range(DP * TP)):  # the one-process checkpoint trained on
        run = np.load(f"{out}.load{zero}.rank{r}.npz")
        for name, value in ref_load_params.items():
            np.testing.assert_allclose(run[name], value, rtol=0, atol=1e-6, err_msg=f"loaded into zero={zero} {name}")
    assert np.abs(ref_load_losses - ref_losses).max() > 1e-3  # it trained on from the checkpoint


ELEMENTWISE = ["sgd", "momentum", "nesterov", "adam", "adagrad", "rmsprop"]


@pytest.mark.dist
@pytest.mark.slow
def test_every_elementwise_optimizer_under_zero2_over_dp2_tp2_matches_one_process(tmp_path):
    out = tmp_path / "opt"
    args = ["--dp", str(DP), "--tp", str(TP), "--zero", "2", "--optimizers", ",".join(ELEMENTWISE), "--out", str(out)]
    proc = launch(DP * TP, "tests/parallel/zero_tp_train.py", *args, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ELEMENTWISE:
        ref_losses, ref_params, _ = zero_tp_train.train(optimizer=name)
        runs = [np.load(f"{out}.{name}.zero2.rank{r}.npz") for r in range(DP * TP)]
        mesh_losses = np.mean([runs[r * TP]["losses"] for r in range(DP)], axis=0)
        np.testing.assert_allclose(mesh_losses, ref_losses, rtol=0, atol=1e-6, err_msg=name)
        for run in runs:
            for k, v in ref_params.items():
                np.testing.assert_allclose(run[k], v, rtol=0, atol=1e-6, err_msg=f"{name} {k}")


def _reference_state() -> dict:
    """One process after zero_tp_train's steps: full parameters and AdamW state."""
    ls.manual_seed(11)
    model = tp_train.build("gpt2").to(dtype="float64")
    opt = ls.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, max_grad_norm=zero_tp_train.CLIP)
    with ls.Graph() as g:
        ids = ls.placeholder("ids", (None, tp_train.LENGTH), "int64")
        y = ls.placeholder("y", (None, tp_train.LENGTH), "int64")
        loss = ls.nn.functional.cross_entropy(model(ids).reshape((-1, tp_train.VOCAB)), y.reshape((-1,)))
        step = opt.minimize(loss)
    for ids_v, y_v in tp_train.batches():
        g.run([loss, step], {ids: ids_v, y: y_v})
    return full_state(model, opt)
