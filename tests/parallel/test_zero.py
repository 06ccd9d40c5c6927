"""ZeRO stages 1, 2 and 3 against plain data parallelism: the same losses, parameters and
(consolidated) optimizer state, with 1/dp of the dense optimizer state on each rank."""

from __future__ import annotations

import numpy as np
import pytest

import luoshu as ls
from tests.distributed.launcher import launch
from tests.parallel.zero_train import Net, train


def _check(tmp_path, workers: int) -> None:
    job = launch(workers, "tests/parallel/zero_train.py", str(tmp_path), timeout=280)
    assert job.returncode == 0, job.stderr[-3000:]
    for rank in range(workers):
        got = np.load(tmp_path / f"rank{rank}.npz")
        for mode in ("graph", "eager"):
            plain = {k[len(f"{mode}/0/"):]: got[k] for k in got.files if k.startswith(f"{mode}/0/")}
            assert any(k.startswith("state/") for k in plain)
            for zero in (1, 2, 3, "2b"):  # 2b: ZeRO-2, one reduce-scatter bucket per parameter
                for key, expected in plain.items():
                    value = got[f"{mode}/{zero}/{key}"]
                    if key == "state_bytes" and zero == "2b":  # four buckets, each padded by < dp elements
                        assert expected <= value * workers < expected + 4 * workers * 2 * 8, (mode, value, expected)
                    elif key == "state_bytes":  # the dense parameters' state, per rank
                        assert value * workers == expected, (mode, zero, value, expected)
                    else:
                        np.testing.assert_allclose(value, expected, rtol=1e-9, atol=1e-12,
                                                   err_msg=f"{mode} zero={zero} rank {rank}: {key}")
        # ZeRO-3, from the plan's accounting: 1/dp of the plain run's parameter, gradient (what the
        # update reads) and optimizer-state bytes; Adam's step counters (4 bytes each) are one per
        # tensor in the plain run (four) and one per unit (one) with ZeRO-3.
        plain, sharded = ({k: int(got[f"memory/{z}/{k}"]) for k in ("parameters", "optimizer_state", "update_gradients",
                                                                   "gathered")} for z in (0, 3))
        assert plain["parameters"] == 44 * 8 and sharded["parameters"] * workers == plain["parameters"]
        assert sharded["update_gradients"] * workers == plain["update_gradients"] == 44 * 8
        assert (sharded["optimizer_state"] - 4) * workers == plain["optimizer_state"] - 4 * 4 == 2 * 44 * 8
        assert sharded["gathered"] == 44 * 8 and plain["gathered"] == 0  # one unit whole at a time
        # ZeRO-2 (one bucket: the default 4 MB holds all 44): the update reads 1/dp of the gradients.
        zero2 = int(got["memory/2/update_gradients"])
        assert zero2 * workers == plain["update_gradients"], (zero2, plain["update_gradients"])
        _check_zero2_gradients(got, workers)


def _check_zero2_gradients(got, workers: int) -> None:
    """Eight 8x8 float64 weights (G = 8 * 512 bytes), one reduce-scatter bucket per weight.

    Plain data parallelism keeps every gradient whole: the persistent all-reduce buckets (G),
    counted at every step, are its floor. ZeRO-2's update reads this rank's shards, G/dp exactly
    (64 elements divide by 2 and 4: no padding). Its peak is reached at the last bucket's
    reduce-scatter (the first layer's weight): all eight shards (G/dp) plus that weight's whole
    gradient (512 bytes), which dies right there; every earlier step holds fewer shards and one
    whole gradient at most. So peak = G/dp + 512: 2560 bytes at dp=2, 1536 at dp=4, against >= G
    = 4096 for plain data parallelism (the bucket bound: G/dp plus one bucket). ZeRO-1 holds
    plain's all-reduce buckets and no other gradient buffer (its 1/dp shard lives only inside
    the update): the same gradient bytes as plain."""
    g_bytes, bucket = 8 * 64 * 8, 64 * 8
    plain, z1, z2 = ({k: int(got[f"layers/{z}/{k}"]) for k in ("update_gradients", "peak_gradients")}
                     for z in (0, 1, 2))
    assert plain["update_gradients"] == g_bytes and plain["peak_gradients"] >= g_bytes, plain
    assert z2["update_gradients"] == g_bytes // workers, z2
    assert z2["peak_gradients"] == g_bytes // workers + bucket, z2
    assert z1 == plain, (z1, plain)


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_zero_matches_plain_data_parallelism_on_two_processes(tmp_path):
    _check(tmp_path, 2)


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.timeout(300)
def test_zero_matches_plain_data_parallelism_on_four_processes(tmp_path):
    _check(tmp_path, 4)


def test_one_process_equals_plain():
    plain, zero = train("graph", 0, 1, 0), train("graph", 2, 1, 0)
    for key, value in plain.items():
        if key != "state_bytes":
            np.testing.assert_allclose(zero[key], value, rtol=1e-12, atol=1e-14, err_msg=key)


def test_plan_accounts_for_the_shard_state():
    model = Net().to(dtype="float64")
    opt = ls.optim.Adam(model.parameters(), lr=0.01)
    with ls.Graph() as g:
        ids = ls.placeholder("ids", (None, 2), "int64")
        dense = ls.placeholder("dense", (None, 5), "float64")
        loss = model(ids, dense).sum()
        step = opt.minimize(loss)
    ls.parallel.DataParallel(g, zero=1)
    feed = {ids: np.zeros((3, 2), np.int64), dense: np.ones((3, 5))}
    report = g.memory([loss, step], feed)
    dense_params = sum(p.numpy().size for n, p in model.named_parameters() if not n.startswith("embedding"))
    table = model.embedding.weight.numpy().size
    # one process: the shard is everything; the table's Adam state is the model optimizer's
    assert report.optimizer_state == 2 * 8 * (dense_params + table) + 4 * 2  # + the two step counters


def test_bad_arguments():
    model = Net()
    with pytest.raises(ls.distributed.DistError, match="zero must be one of"):
        ls.parallel.DataParallel(model, ls.optim.Adam(model.parameters()), zero=4)
    with pytest.raises(ls.distributed.DistError, match="LAMB cannot be sharded"):
        ls.parallel.DataParallel(model, ls.optim.LAMB(model.parameters()), zero=1)
    with pytest.raises(ls.distributed.DistError, match="shards an optimizer"):
        ls.parallel.DataParallel(model, zero=1)
    with pytest.raises(ls.distributed.DistError, match="mode='allreduce', not 'hybrid'"):
        ls.parallel.DataParallel(model, ls.optim.Adam(model.parameters()), mode="hybrid", zero=1)


def _steps(model, opt, data, dp=None):
    for ids, dense, y in data:
        loss = ls.nn.functional.mse_loss(model(ls.tensor(ids), ls.tensor(dense)), ls.tensor(y))
        (dp or opt).minimize(loss)


def test_a_plain_checkpoint_loads_into_zero_and_back():
    """Plain for 3 steps, then 2 more either plain or ZeRO after loading the plain state:
    the same parameters, and the ZeRO run's consolidated state equals the plain run's."""
    from tests.parallel.zero_train import batches

    data = list(batches(1, 4, steps=5))
    ls.manual_seed(7)
    plain_model = Net().to(dtype="float64")
    plain_opt = ls.optim.AdamW(plain_model.parameters(), lr=0.05, weight_decay=0.01)
    sched = ls.optim.StepLR(plain_opt, step_size=1, gamma=0.5)
    _steps(plain_model, plain_opt, data[:3])
    saved = plain_opt.state_dict()
    weights = {k: v.numpy().copy() for k, v in plain_model.state_dict().items()}
    sched.step()
    _steps(plain_model, plain_opt, data[3:])

    ls.manual_seed(7)
    model = Net().to(dtype="float64")
    model.load_state_dict(weights)
    opt = ls.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.01)
    dp = ls.parallel.DataParallel(model, opt, zero=1)
    dp.sync.load_state_dict(saved)
    opt.param_groups[0]["lr"] = plain_opt.param_groups[0]["lr"]  # what the scheduler set
    _steps(model, opt, data[3:], dp)
    for (name, a), b in zip(plain_model.named_parameters(), model.parameters()):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-12, atol=1e-14, err_msg=name)
    back, expected = dp.sync.consolidated_state_dict(), plain_opt.state_dict()
    assert sorted(back["tensors"]) == sorted(expected["tensors"])
    for key, value in expected["tensors"].items():
        np.testing.assert_allclose(back["tensors"][key].numpy(), value.numpy(), rtol=1e-12, atol=1e-14, err_msg=key)
