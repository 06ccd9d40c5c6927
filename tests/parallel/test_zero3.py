"""ZeRO-3 in one process (the multi-process equality with plain data parallelism is in
test_zero.py): GPT-2 steps equal to a plain run in both modes (recompute and autocast too), the
plan holds one or two units' parameters whole at a time, checkpoints interchange with plain
runs, offload on a CPU run changes nothing, bad options are refused."""

from __future__ import annotations

import numpy as np
import pytest

import luoshu as ls
from luoshu.models import build

VOCAB, LENGTH, BATCH, LAYERS = 32, 8, 4, 3


def _gpt2(recompute=False):
    ls.manual_seed(0)
    return build("gpt2", vocab_size=VOCAB, n_layer=LAYERS, n_head=2, n_embd=16, block_size=LENGTH, dropout=0.0,
                 recompute=recompute).to(dtype="float64")


def _batches(steps: int = 3):
    rng = np.random.default_rng(0)
    return [(rng.integers(0, VOCAB, (BATCH, LENGTH)), rng.integers(0, VOCAB, (BATCH, LENGTH))) for _ in range(steps)]


def _loss(model, ids, targets):
    return ls.nn.functional.cross_entropy(model(ids).reshape((-1, VOCAB)), targets.reshape((-1,)))


def _train_graph(zero: int, recompute=False, autocast=False, **options):
    model = _gpt2(recompute)
    opt = ls.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1, max_grad_norm=1.0)
    with ls.Graph() as g:
        ids = ls.placeholder("ids", (None, LENGTH), "int64")
        targets = ls.placeholder("targets", (None, LENGTH), "int64")
        if autocast:
            with ls.autocast("bfloat16"):
                loss = _loss(model, ids, targets)
        else:
            loss = _loss(model, ids, targets)
        step = opt.minimize(loss)
    dp = ls.parallel.DataParallel(g, zero=zero, **options) if zero else None
    losses = [g.run([loss, step], {ids: i, targets: t})[0] for i, t in _batches()]
    return model, dp, losses, (g, loss, step, ids, targets)


def _weights(model, dp):
    with dp.sync.gathered_parameters() if dp is not None else _null():
        return {k: v.numpy().copy() for k, v in model.state_dict().items()}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _assert_same(a: dict, b: dict, rtol=1e-10, atol=1e-12):
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_allclose(b[key], a[key], rtol=rtol, atol=atol, err_msg=key)


@pytest.mark.parametrize("recompute", [False, True])
def test_graph_steps_equal_plain(recompute):
    plain_model, _, plain_losses, _ = _train_graph(0, recompute)
    model, dp, losses, _ = _train_graph(3, recompute, unit_size_mb=0.01)
    assert len(dp.sync.groups) > LAYERS  # about one unit per layer at this unit size
    np.testing.assert_allclose(losses, plain_losses, rtol=1e-10)
    _assert_same(_weights(plain_model, None), _weights(model, dp))


def test_autocast_keeps_float32_master_shards():
    def run(zero):
        ls.manual_seed(0)
        model = build("gpt2", vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=16, block_size=LENGTH, dropout=0.0)
        opt = ls.optim.AdamW(model.parameters(), lr=0.01)
        with ls.Graph() as g:
            ids = ls.placeholder("ids", (None, LENGTH), "int64")
            targets = ls.placeholder("targets", (None, LENGTH), "int64")
            with ls.autocast("bfloat16"):
                loss = _loss(model, ids, targets)
            step = opt.minimize(loss)
        dp = ls.parallel.DataParallel(g, zero=3, unit_size_mb=0.01) if zero else None
        losses = [g.run([loss, step], {ids: i, targets: t})[0] for i, t in _batches()]
        if dp is not None:
            assert all(u.shard.dtype.is_floating_point and u.shard.dtype.itemsize == 4 for u in dp.sync.groups)
        return losses, _weights(model, dp)

    (plain_losses, plain), (losses, weights) = run(0), run(3)
    np.testing.assert_allclose(losses, plain_losses, rtol=1e-6)
    _assert_same(plain, weights, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("how", ["minimize", "backward_step"])
def test_eager_steps_equal_plain(how):
    def run(zero):
        model = _gpt2()
        opt = ls.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1, max_grad_norm=1.0)
        dp = ls.parallel.DataParallel(model, opt, zero=zero) if zero else None
        losses = []
        for i, t in _batches():
            loss = _loss(dp or model, ls.tensor(i), ls.tensor(t))
            losses.append(float(loss.numpy()))
            if how == "minimize":
                (dp or opt).minimize(loss)
            else:
                loss.backward()
                (dp or opt).step()
                (dp or opt).zero_grad()
        return losses, _weights(model, dp), dp

    (plain_losses, plain, _), (losses, weights, dp) = run(0), run(3)
    # every block's linear layers and norms are units; the tied token table stays whole
    assert len(dp.sync.groups) >= 4 * LAYERS
    assert all(p._value.device.type == "meta" for u in dp.sync.groups for p in u.params)  # freed after use
    assert len(dp.sync._forward_order) == len(dp.sync.groups)  # the order prefetching follows
    np.testing.assert_allclose(losses, plain_losses, rtol=1e-10)
    _assert_same(plain, weights)


@pytest.mark.parametrize("mode", ["eager", "graph"])
def test_a_read_between_uses_is_refused_naming_the_parameter_and_the_way_to_read_it(mode):
    if mode == "eager":
        model = _gpt2()
        opt = ls.optim.AdamW(model.parameters(), lr=0.01)
        dp = ls.parallel.DataParallel(model, opt, zero=3)
        for i, t in _batches(2):  # the first step lays the units out
            dp.minimize(_loss(dp, ls.tensor(i), ls.tensor(t)))
    else:
        model, dp, _, _ = _train_graph(3, unit_size_mb=0.01)
    p = model.h[1].mlp.c_fc.weight
    assert p._value.device.type == "meta"  # between uses: this rank keeps only its shard
    name = "'h.1.mlp.c_fc.weight'" if mode == "eager" else "'weight'"
    for read in (p.numpy, lambda: p.value, lambda: p * 2.0, lambda: model.state_dict()["h.1.mlp.c_fc.weight"].numpy()):
        with pytest.raises(ls.Error, match=rf"zero=3\): parameter {name}.*{tuple(p.shape)}.*"
                                           r"holds no data outside its module's forward.*gathered_parameters\(\)"):
            read()
    with dp.sync.gathered_parameters():
        assert p.numpy().shape == tuple(p.shape)


def test_the_plan_holds_few_units_whole_at_a_time():
    model, dp, _, (g, loss, step, ids, targets) = _train_graph(3, unit_size_mb=0.01)
    i, t = _batches(1)[0]
    report = g.memory([loss, step], {ids: i, targets: t})
    units = dp.sync.groups
    total = sum(u.padded for u in units) * 8
    largest_two = sum(sorted(u.padded for u in units)[-2:]) * 8
    sharded = {id(p) for u in units for p in u.params}
    whole = sum(int(np.prod(p.shape)) * 8 for p in model.parameters() if id(p) not in sharded)
    # one process: a shard is its whole unit
    assert report.parameters == total + whole
    assert 0 < report.peak_gathered_parameters <= 2 * largest_two
    assert report.peak_gathered_parameters < total / 2


def test_a_plain_checkpoint_loads_into_zero3_and_back():
    """Plain for 2 steps, then a ZeRO-3 run loads its weights and optimizer state and takes
    the third: the same parameters as the plain run's third step, and its consolidated state
    loads into a plain optimizer equal to the plain run's."""
    batches = _batches()
    plain = _gpt2()
    plain_opt = ls.optim.AdamW(plain.parameters(), lr=0.01, weight_decay=0.1)
    for i, t in batches[:2]:
        plain_opt.minimize(_loss(plain, ls.tensor(i), ls.tensor(t)))
    saved_weights = {k: v.numpy().copy() for k, v in plain.state_dict().items()}
    saved_state = plain_opt.state_dict()
    plain_opt.minimize(_loss(plain, ls.tensor(batches[2][0]), ls.tensor(batches[2][1])))

    for mode in ("eager", "graph"):
        model = _gpt2()
        opt = ls.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
        model.load_state_dict(saved_weights)
        if mode == "eager":
            dp = ls.parallel.DataParallel(model, opt, zero=3)
            dp.sync.load_state_dict(saved_state)
            dp.minimize(_loss(dp, ls.tensor(batches[2][0]), ls.tensor(batches[2][1])))
        else:
            with ls.Graph() as g:
                ids = ls.placeholder("ids", (None, LENGTH), "int64")
                targets = ls.placeholder("targets", (None, LENGTH), "int64")
                step = opt.minimize(_loss(model, ids, targets))
            dp = ls.parallel.DataParallel(g, zero=3, unit_size_mb=0.01)
            dp.sync.load_state_dict(saved_state)
            g.run([step], {ids: batches[2][0], targets: batches[2][1]})
        _assert_same(_weights(plain, None), _weights(model, dp))
        back = ls.optim.AdamW(_gpt2().parameters(), lr=0.01, weight_decay=0.1)
        back.load_state_dict(dp.sync.consolidated_state_dict())
        expected = plain_opt.state_dict()
        _assert_same({k: v.numpy() for k, v in expected["tensors"].items()},
                     {k: v.numpy() for k, v in back.state_dict()["tensors"].items()})


def test_weights_set_inside_gathered_parameters_reach_the_shards():
    model, dp, _, _ = _train_graph(3, unit_size_mb=0.01)
    fresh = _gpt2()
    with dp.sync.gathered_parameters():
        model.load_state_dict(fresh.state_dict())
    _assert_same(_weights(fresh, None), _weights(model, dp), rtol=0, atol=0)
    # between uses a parameter holds no storage
    assert all(p._value.device.type == "meta" for u in dp.sync.groups for p in u.params)


@pytest.mark.parametrize("zero, offload", [(1, "optimizer"), (3, "optimizer"), (3, "parameters")])
def test_offload_on_a_cpu_run_is_accepted_and_changes_nothing(zero, offload):
    _, _, plain_losses, _ = _train_graph(zero)
    model, dp, losses, _ = _train_graph(zero, offload=offload)
    assert dp.sync.offload.kind == offload and not dp.sync.offload.enabled  # parameters on the CPU
    np.testing.assert_array_equal(losses, plain_losses)


def test_bad_options():
    model = _gpt2()
    opt = ls.optim.AdamW(model.parameters())
    with pytest.raises(ls.distributed.DistError, match="unit_size_mb must be a positive number"):
        ls.parallel.DataParallel(model, opt, zero=3, unit_size_mb=0)
    with pytest.raises(ls.distributed.DistError, match="offload must be one of"):
        ls.parallel.DataParallel(model, opt, zero=3, offload="disk")
    with pytest.raises(ls.distributed.DistError, match="offload='parameters' needs zero=3"):
        ls.parallel.DataParallel(model, opt, zero=2, offload="parameters")
    with pytest.raises(ls.distributed.DistError, match="offload needs zero"):
        ls.parallel.DataParallel(model, opt, offload="optimizer")


def test_luoshu_train_zero_key_trains_checkpoints_and_resumes_like_a_plain_job(tmp_path, monkeypatch):
    """`zero: 3` in a `luoshu train` job: the same checkpoints (weights and Adam state) as the
    plain job, and a run interrupted and resumed reaches them too."""
    from luoshu.train import TrainConfig, Trainer, latest_checkpoint, train
    from tests.train.harness import checkpoint_arrays, interrupt_after

    base = dict(model="mlp", dataset="digits", model_args={"hidden": [16]}, optimizer="adamw", lr=0.01,
                batch_size=64, max_steps=10, eval_interval=5, progress=False)
    train(TrainConfig(**base, out=str(tmp_path / "plain")))
    train(TrainConfig(**base, zero=3, out=str(tmp_path / "zero")))
    interrupt_after(monkeypatch, 7)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(**base, zero=3, out=str(tmp_path / "cut")))
    monkeypatch.undo()
    Trainer(TrainConfig(**base, zero=3, out=str(tmp_path / "cut"), resume=True)).fit()
    plain = checkpoint_arrays(latest_checkpoint(tmp_path / "plain" / "checkpoints"))
    for job in ("zero", "cut"):
        got = checkpoint_arrays(latest_checkpoint(tmp_path / job / "checkpoints"))
        _assert_same(plain, got, rtol=1e-6, atol=1e-7)


def test_ls_save_and_load_go_through_zero3_shards(tmp_path):
    """`ls.save` of a ZeRO-3 model writes whole parameters and the consolidated optimizer state
    (a plain run loads it and takes the same next step); `ls.load` of a plain checkpoint into a
    ZeRO-3 run lands in its shards."""
    batches = _batches()
    plain = _gpt2()
    plain_opt = ls.optim.AdamW(plain.parameters(), lr=0.01, weight_decay=0.1)
    for i, t in batches[:2]:
        plain_opt.minimize(_loss(plain, ls.tensor(i), ls.tensor(t)))
    ls.save(tmp_path / "plain", plain, plain_opt)
    plain_opt.minimize(_loss(plain, ls.tensor(batches[2][0]), ls.tensor(batches[2][1])))

    model = _gpt2()
    opt = ls.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    dp = ls.parallel.DataParallel(model, opt, zero=3)
    dp.minimize(_loss(dp, ls.tensor(batches[0][0]), ls.tensor(batches[0][1])))  # lays out the units
    ls.load(tmp_path / "plain", model, opt)  # into the shards
    dp.minimize(_loss(dp, ls.tensor(batches[2][0]), ls.tensor(batches[2][1])))
    _assert_same(_weights(plain, None), _weights(model, dp))

    ls.save(tmp_path / "zero3", model, opt)
    back = _gpt2()
    back_opt = ls.optim.AdamW(back.parameters(), lr=0.01, weight_decay=0.1)
    ls.load(tmp_path / "zero3", back, back_opt)
    _assert_same(_weights(plain, None), _weights(back, None))
    _assert_same({k: v.numpy() for k, v in plain_opt.state_dict()["tensors"].items()},
                 {k: v.numpy() for k, v in back_opt.state_dict()["tensors"].items()})
