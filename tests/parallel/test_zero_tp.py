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


def _local_numel(names_split: set, without: set = frozenset()) -> int:
    """Elements of one TP rank's parameters: a split parameter 1/TP of its size, the names of
    `without` left out (independent of the code under test: from the one-process model and the
    Megatron plan's names)."""
    ls.manual_seed(11)
    model = tp_train.build("gpt2")
    return sum(p.value.numel() // (TP if n in names_split else 1) for n, p in model.named_parameters()
               if n not in without)


def _row_parallel_biases() -> set:
    """The biases of the layers the Megatron plan splits row-wise: added once, on TP member 0."""
    rowwise = {k for k, v in ls.parallel.MEGATRON_PLAN.items() if v == "rowwise"}
    return {n for n, _ in tp_train.build("gpt2").named_parameters()
            if n.endswith(".bias") and n.rsplit(".", 2)[-2] in rowwise}


@pytest.mark.dist
@pytest.mark.slow
def test_zero_1_2_3_over_dp_of_dp2_tp2_match_one_process_and_checkpoints_cross_layouts(tmp_path):
    """dp2 x tp2 with zero=0, 1, 2, 3 (AdamW, clipping below the gradients' norm) equals one process
    (and an evaluation plan compiled after the steps too); each rank keeps 1/DP of its TP shard's
    optimizer state (ZeRO-3: and of its parameters), where TP members other than 0 hold nothing of
    the row-parallel biases (added on member 0 only; a read of one there says so); a ZeRO-3 x TP
    checkpoint loads into one process, and a one-process checkpoint into ZeRO-2 and ZeRO-3 x TP,
    which train on like one process."""
    ref_losses, ref_params, ref_memory = zero_tp_train.train()
    unclipped, _ = tp_train.train("gpt2")
    assert len(ref_losses) == 5
    assert np.abs(ref_losses[:len(unclipped)] - unclipped).max() > 1e-5  # the clipping takes effect
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
    biases = _row_parallel_biases()
    bias_index = [n for n, _ in tp_train.build("gpt2").named_parameters()].index("h.0.mlp.c_proj.bias")
    assert len(biases) == 4  # o_proj and c_proj of each of the two blocks
    local = _local_numel(set(tp.split))
    # ZeRO: a TP member other than 0 holds no row-parallel bias (no value, state or shard)
    zero_local = [local if r % TP == 0 else _local_numel(set(tp.split), biases) for r in range(DP * TP)]
    for zero in (0, 1, 2, 3):
        runs = [np.load(f"{out}.zero{zero}.rank{r}.npz") for r in range(DP * TP)]
        mesh_losses = np.mean([runs[r * TP]["losses"] for r in range(DP)], axis=0)  # each DP rank: its half
        np.testing.assert_allclose(mesh_losses, ref_losses, rtol=0, atol=1e-6, err_msg=f"zero={zero}")
        mesh_eval = np.mean([float(runs[r * TP]["eval_loss"]) for r in range(DP)])
        np.testing.assert_allclose(mesh_eval, ref_memory["eval_loss"], rtol=0, atol=1e-6, err_msg=f"zero={zero}")
        for run in runs:
            for name, value in ref_params.items():
                np.testing.assert_allclose(run[name], value, rtol=0, atol=1e-6, err_msg=f"zero={zero} {name}")
        # AdamW: two float64 moments per element and a float32 step counter per parameter; ZeRO: of
        # 1/DP of the rank's TP shard, in one shard (the model is below one unit, `unit_size_mb`), so
        # one step counter
        for r, run in enumerate(runs):
            got = int(run["state_bytes"])
            expected = 2 * 8 * local + 4 * len(ref_params) if zero == 0 else 2 * 8 * -(-zero_local[r] // DP) + 4
            assert got == expected, (zero, r, got, expected)
        for r, run in enumerate(runs):  # the float64 parameters the step reads from storage kept between steps
            got = int(run["parameter_bytes"])
            if zero == 3:  # the rank's shard of its unit
                assert got == 8 * -(-zero_local[r] // DP), (zero, r, got)
            elif zero == 2:  # the flat buffer the parameters view (padded to a multiple of DP)
                assert got == 8 * DP * -(-zero_local[r] // DP), (zero, r, got)
            else:
                assert got <= 8 * local, (zero, got)
            read = str(run["left_read"])  # of a row-parallel bias, outside gathered_parameters()
            if zero and r % TP:
                assert "kept on tensor-parallel member 0 only" in read and "gathered_parameters()" in read, read
            elif zero == 3:  # member 0 keeps its shard of it
                assert "sharded over the data-parallel ranks" in read, read
            else:
                assert read == "", (zero, r, read)
            # a graph reading a row-parallel bias: refused on every member, naming the members that left it
            refused = str(run["bias_graph"])
            if zero:
                assert "left to member 0" in refused, refused
                assert f"member 1: [\"'bias' (index {bias_index} in" in refused, refused
                assert f"this is member {r % TP}" in refused, refused
            else:
                assert refused == "", (r, refused)

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
    for ids_v, y_v in tp_train.batches(steps=zero_tp_train.STEPS):
        g.run([loss, step], {ids: ids_v, y: y_v})
    return full_state(model, opt)
