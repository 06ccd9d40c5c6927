"""Whole-step compilation (luoshu.compiler.inductor): a compiled training step equals the plan's
step, runs as one graph, and falls back to the plan naming the op it cannot lower.

The references are the uncompiled plans of the same graphs (which the optimizer and op tests check
against torch). Compiling with TorchInductor on 2 cores is slow, so the default cases are tiny;
the GPT-2 under Inductor (and `luoshu train --compile`) are `slow`; the default GPT-2 case uses
TorchDynamo's "eager" backend: the same single captured graph, run without code generation."""

import numpy as np
import pytest
import torch

import luoshu as ls
from luoshu import models
from luoshu.compiler import LoweringWarning
from luoshu.core.autodiff import gradients
from luoshu.core.op import OpDef, apply, register
from luoshu.core.tensor import TensorMeta


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _mlp_job(make_opt, hidden=16):
    ls.manual_seed(0)
    model = ls.nn.Sequential(ls.nn.Linear(12, hidden), ls.nn.Tanh(), ls.nn.Linear(hidden, 5))
    with ls.Graph() as g:
        x = ls.placeholder("x", (8, 12))
        y = ls.placeholder("y", (8,), "int64")
        loss = ls.nn.functional.cross_entropy(model(x), y)
        opt = make_opt(model.parameters())
        train = opt.minimize(loss)
    rng = np.random.default_rng(1)
    data = [{x: rng.standard_normal((8, 12)).astype(np.float32), y: rng.integers(0, 5, 8)} for _ in range(4)]
    return g, [loss, train], model, opt, data


def _gpt2_job(layers=1):
    # No biases: the key projection's bias has an exactly zero gradient (softmax ignores a shift),
    # so Adam would scale rounding noise up to a full step there in both runs, differently.
    config = models.GPTConfig(vocab_size=48, block_size=8, n_layer=layers, n_head=2, n_embd=16, bias=False)
    ls.manual_seed(0)
    model = models.GPT2(config)
    with ls.Graph() as g:
        ids = ls.placeholder("ids", (2, 8), "int64")
        target = ls.placeholder("target", (2, 8), "int64")
        logits = model(ids).reshape((-1, config.vocab_size))
        loss = ls.nn.functional.cross_entropy(logits, target.reshape((-1,)))
        opt = ls.optim.AdamW(model.parameters(), lr=1e-2, max_grad_norm=1.0)
        train = opt.minimize(loss)
    rng = np.random.default_rng(2)
    data = [{ids: rng.integers(0, 48, (2, 8)), target: rng.integers(0, 48, (2, 8))} for _ in range(4)]
    return g, [loss, train], model, opt, data


def _compare(make_job, backend, steps=20, on_step=None, tol=1e-5):
    """Runs the same job as a plan and compiled for `steps` steps; asserts losses and parameters
    agree to `tol` at every step, and the optimizer state at the end; returns the compiled plan."""
    plain, compiled = make_job(), make_job()
    compiled[0].compile(compiled[1], backend=backend)
    for i in range(steps):
        for job in (plain, compiled):
            g, fetches, _, opt, data = job
            loss, token = g.run(fetches, data[i % len(data)])
            assert token is None
            job_loss = loss
            if on_step is not None:
                on_step(i, opt)
            if job is plain:
                plain_loss = job_loss
        np.testing.assert_allclose(job_loss, plain_loss, rtol=tol, atol=tol, err_msg=f"loss at step {i}")
        for p, q in zip(plain[2].parameters(), compiled[2].parameters()):
            np.testing.assert_allclose(q.numpy(), p.numpy(), rtol=tol, atol=tol, err_msg=f"{p.name} at step {i}")
    for p, q in zip(plain[2].parameters(), compiled[2].parameters()):  # and the optimizer state
        for name, value in plain[3].state[p].items():
            np.testing.assert_allclose(compiled[3].state[q][name].numpy(), value.numpy(), rtol=tol, atol=tol,
                                       err_msg=f"{p.name} state {name}")
    g, fetches, _, _, data = compiled
    return g.plan(fetches, data[0])


def test_compiled_mlp_step_equals_the_plan_over_20_steps_as_one_inductor_graph():
    # The learning rate moves every 5 steps: a 0-d tensor input, so it must not recompile.
    def schedule(i, opt):
        if i % 5 == 4:
            for group in opt.param_groups:
                group["lr"] *= 0.5

    torch._dynamo.reset()
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    plan = _compare(
        lambda: _mlp_job(lambda ps: ls.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3)),
        "inductor",
        on_step=schedule,
    )
    assert plan.compiled.reason is None
    assert plan.compiled.compiled_runs == 19  # the first step creates the optimizer state through the plan
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - before == 1  # one graph, no break


def test_compiled_plain_sgd_adds_weight_gradients_into_the_parameters():
    # Plain SGD: each weight gradient stays a matmul that one in-place addmm adds to its weight.
    # Two interleaved parameter groups (weights, biases), each with its own scheduled lr.
    def schedule(i, opt):
        if i % 5 == 4:
            opt.param_groups[i % 2]["lr"] *= 0.5

    def make_opt(ps):
        return ls.optim.SGD([{"params": ps[0::2]}, {"params": ps[1::2], "lr": 0.05}], lr=0.1)

    plan = _compare(lambda: _mlp_job(make_opt), "inductor", on_step=schedule)
    assert plan.compiled.reason is None and plan.compiled.compiled_runs == 19
    assert plan.compiled.deferred_matmuls == 2  # both weights; the first layer's input needs no gradient


def test_deferred_weight_gradients_equal_torch_sgd():
    """The update of weight gradients left as matmuls, run eagerly, against torch.optim.SGD; with
    clipping or L1 they are computed first."""
    from luoshu.compiler.inductor import DeferredMatmul
    from luoshu.core.op import get_opdef

    def kernel(a, b):
        return get_opdef("matmul").compute(a, b, trans_a=True, trans_b=False)

    rng = np.random.default_rng(6)
    for hyper in ({}, {"max_grad_norm": 0.5}, {"l1": 1e-3}):
        weights = [rng.standard_normal((6, 4)).astype(np.float32) for _ in range(2)]
        params = [ls.tensor(w.copy()) for w in weights]
        opt = ls.optim.SGD(params, lr=0.1, **hyper)
        ref = [torch.tensor(w.copy(), requires_grad=True) for w in weights]
        ref_opt = torch.optim.SGD(ref, lr=0.1)
        lowered = opt.lowered_update([0, 1], "dd")
        for step in range(4):
            factors = [(torch.from_numpy(rng.standard_normal((3, 6)).astype(np.float32)),
                        torch.from_numpy(rng.standard_normal((3, 4)).astype(np.float32))) for _ in range(2)]
            grads = [a.T @ b for a, b in factors]
            for r, g in zip(ref, grads):
                r.grad = g.clone()
                if "l1" in hyper:
                    r.grad += hyper["l1"] * torch.sign(r.detach())
            if "max_grad_norm" in hyper:
                torch.nn.utils.clip_grad_norm_(ref, hyper["max_grad_norm"])
            ref_opt.step()
            if step == 0:
                opt.apply_gradients(list(enumerate(grads)))  # the first step creates the state
                continue
            with torch.no_grad():
                lowered.compute(lowered.inputs(), *(DeferredMatmul(kernel, a, b) for a, b in factors))
            for p, r in zip(params, ref):
                np.testing.assert_allclose(p.numpy(), r.detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=f"{hyper}")


def test_a_new_feed_shape_or_hyperparameter_compiles_anew_and_equals_the_plan():
    # The compiled function is called without Dynamo's guards: the step's own signature (feed
    # shapes, hyperparameters baked in) must catch a new batch size and a changed momentum.
    def job():
        ls.manual_seed(0)
        model = ls.nn.Sequential(ls.nn.Linear(12, 16), ls.nn.Tanh(), ls.nn.Linear(16, 5))
        with ls.Graph() as g:
            x = ls.placeholder("x", (None, 12))
            y = ls.placeholder("y", (None,), "int64")
            loss = ls.nn.functional.cross_entropy(model(x), y)
            opt = ls.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
            train = opt.minimize(loss)
        rng = np.random.default_rng(7)
        data = [{x: rng.standard_normal((n, 12)).astype(np.float32), y: rng.integers(0, 5, n)} for n in (8, 3)]
        return g, [loss, train], model, opt, data

    def change_momentum(i, opt):
        if i == 5:
            opt.param_groups[0]["momentum"] = 0.9

    plan = _compare(job, "eager", steps=10, on_step=change_momentum)
    assert plan.compiled.reason is None and plan.compiled.compiled_runs == 9
    assert len(plan.compiled._compiled) == 4  # two batch sizes, before and after the change


def test_compiled_gpt2_step_equals_the_plan_over_20_steps():
    plan = _compare(_gpt2_job, "eager")
    assert plan.compiled.reason is None and plan.compiled.compiled_runs == 19


@pytest.mark.slow
def test_compiled_gpt2_step_equals_the_plan_over_20_steps_under_inductor():
    plan = _compare(lambda: _gpt2_job(layers=2), "inductor")
    assert plan.compiled.reason is None and plan.compiled.compiled_runs == 19


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: ls.optim.Adam(ps, lr=1e-2, amsgrad=True, weight_decay=1e-2),
        lambda ps: ls.optim.AdamW(ps, lr=1e-2, max_grad_norm=0.1),
        lambda ps: ls.optim.AdaGrad(ps, lr=0.1, lr_decay=0.01),
        lambda ps: ls.optim.RMSProp(ps, lr=1e-2, momentum=0.9, centered=True),
        lambda ps: ls.optim.Nesterov(ps, lr=0.1, l1=1e-3),
        lambda ps: ls.optim.SGD(ps, lr=0.1, momentum=0.9, dampening=0.5),
    ],
    ids=["adam-amsgrad-l2", "adamw-clipped", "adagrad", "rmsprop-centered", "nesterov-l1", "sgd-dampening"],
)
def test_each_lowered_rule_equals_the_optimizer(make_opt):
    """The lowered update math, run eagerly (no compiler), against the fused/foreach kernels."""
    params = [ls.tensor(np.random.default_rng(k).standard_normal((6, 4)).astype(np.float32)) for k in range(3)]
    twins = [ls.tensor(p.numpy()) for p in params]
    opt, twin = make_opt(params), make_opt(twins)
    lowered = twin.lowered_update([0, 1, 2], "ddd")
    rng = np.random.default_rng(5)
    for step in range(8):
        grads = [torch.from_numpy(rng.standard_normal((6, 4)).astype(np.float32)) for _ in range(3)]
        opt.apply_gradients(list(enumerate(grads)))
        inputs = lowered.inputs()
        if step == 0:
            assert inputs is None  # no state yet: the plan's first step creates it
            twin.apply_gradients(list(enumerate(grads)))
        else:
            with torch.no_grad():
                lowered.compute(inputs, *grads)
        for p, q in zip(params, twins):
            np.testing.assert_allclose(q.numpy(), p.numpy(), rtol=1e-5, atol=1e-6, err_msg=f"step {step}")
    for i in range(3):
        for name, value in opt.state[params[i]].items():
            np.testing.assert_allclose(twin.state[twins[i]][name].numpy(), value.numpy(), rtol=1e-5, atol=1e-6)


def _assert_falls_back(make_job, op_name, words, backend="eager"):
    plain, compiled = make_job(), make_job()
    compiled[0].compile(compiled[1], backend=backend)
    with pytest.warns(LoweringWarning) as caught:
        for i in range(3):
            for g, fetches, _, _, data in (plain, compiled):
                g.run(fetches, data[i])
    message = str(caught[0].message)
    assert f"op '{op_name}'" in message and all(w in message for w in words), message
    for p, q in zip(plain[2].parameters(), compiled[2].parameters()):
        np.testing.assert_array_equal(q.numpy(), p.numpy())  # the plan ran every step
    plan = compiled[0].plan(compiled[1], compiled[4][0])
    assert plan.compiled.compiled_runs == 0 and op_name in plan.compiled.reason


def test_an_optimizer_without_a_lowered_rule_falls_back_to_the_plan_naming_the_update():
    _assert_falls_back(
        lambda: _mlp_job(lambda ps: ls.optim.LAMB(ps, lr=1e-2)), "optimizer_update", ["LAMB has no lowered update rule"]
    )


def _embedding_job(make_opt, global_rows=False):
    """A table looked up with repeated ids (its gradient an IndexedSlices) and a dense head, one optimizer;
    `global_rows`: the table's sparse gradient updates every row (kind "g", HugeCTR's Update_t.Global)."""
    ls.manual_seed(0)
    table = ls.nn.Embedding(20, 4)
    head = ls.nn.Linear(4, 3)
    with ls.Graph() as g:
        ids = ls.placeholder("ids", (6,), "int64")
        y = ls.placeholder("y", (6,), "int64")
        loss = ls.nn.functional.cross_entropy(head(table(ids)), y)
        params = table.parameters() + head.parameters()
        opt = make_opt(params)
        if global_rows:
            train = opt.update_op(g, [0, 1, 2], gradients(loss, params), global_rows={0})
        else:
            train = opt.minimize(loss)
    rng = np.random.default_rng(3)
    data = [{ids: rng.integers(0, 8, 6), y: rng.integers(0, 3, 6)} for _ in range(4)]
    model = ls.nn.Sequential(table, head)
    return g, [loss, train], model, opt, data


def _dcn_job():
    """The model zoo's DCN (one table for every slot, factored cross network) with one Adam, shrunk."""
    config = models.CTRConfig(dense_dim=3, slot_sizes=[7, 30, 5, 12], embedding_dim=4, mlp_dims=(16,),
                              num_cross_layers=2)
    ls.manual_seed(0)
    model = models.DCN(config)
    with ls.Graph() as g:
        dense = ls.placeholder("dense", (16, 3))
        sparse = ls.placeholder("sparse", (16, 4), "int64")
        label = ls.placeholder("label", (16,))
        loss = ls.nn.functional.binary_cross_entropy_with_logits(model(dense, sparse), label)
        opt = ls.optim.Adam(model.parameters(), lr=1e-2)
        train = opt.minimize(loss)
    rng = np.random.default_rng(6)
    data = [{dense: rng.standard_normal((16, 3)).astype(np.float32),
             sparse: np.stack([rng.integers(0, n, 16) for n in config.slot_sizes], 1),
             label: rng.integers(0, 2, 16).astype(np.float32)} for _ in range(4)]
    return g, [loss, train], model, opt, data


def test_compiled_dcn_step_equals_the_plan_over_20_steps(recwarn):
    plan = _compare(_dcn_job, "eager")
    assert not [w for w in recwarn if issubclass(w.category, LoweringWarning)]
    assert plan.compiled.reason is None and plan.compiled.compiled_runs == 19


@pytest.mark.slow
def test_compiled_dcn_step_equals_the_plan_over_20_steps_under_inductor():
    plan = _compare(_dcn_job, "inductor")
    assert plan.compiled.reason is None and plan.compiled.compiled_runs == 19


@pytest.mark.parametrize(
    "make_opt, global_rows",
    [
        (lambda ps: ls.optim.Adam(ps, lr=1e-2), False),
        (lambda ps: ls.optim.Adam(ps, lr=1e-2), True),
        (lambda ps: ls.optim.SGD(ps, lr=0.1, momentum=0.9, max_grad_norm=0.5), False),
    ],  # every rule, local and global, is checked without the compiler in tests/optim/test_lowered_sparse.py
    ids=["adam-local", "adam-global", "sgd-momentum-clipped-local"],
)
def test_a_sparse_embedding_update_compiles_and_equals_the_plan(make_opt, global_rows, recwarn):
    plan = _compare(lambda: _embedding_job(make_opt, global_rows), "eager", steps=20, tol=1e-5)
    assert not [w for w in recwarn if issubclass(w.category, LoweringWarning)]
    assert plan.compiled.reason is None and plan.compiled.compiled_runs == 19


@pytest.mark.slow
def test_a_sparse_embedding_update_equals_the_plan_under_inductor():
    plan = _compare(lambda: _embedding_job(lambda ps: ls.optim.Adam(ps, lr=1e-2)), "inductor", steps=20)
    assert plan.compiled.reason is None and plan.compiled.compiled_runs == 19


def test_a_sparse_update_without_a_lowered_rule_falls_back_naming_the_update():
    _assert_falls_back(lambda: _embedding_job(lambda ps: ls.optim.LAMB(ps, lr=1e-2)), "optimizer_update",
                       ["LAMB has no lowered update rule"])


@register
class _HostRoundTrip(OpDef):
    """Test-only: the identity (for inputs not all zero), through a Python branch on a value the
    kernel reads on the host, which TorchDynamo cannot capture in a graph."""

    name = "_test_host_round_trip"
    tested_by = "tests/compiler/test_inductor.py"  # the registry's coverage rule (tests/ops/test_registry.py)

    def infer(self, inputs):
        return TensorMeta(inputs[0].shape, inputs[0].dtype)

    def compute(self, x):
        return x if x.abs().max().item() > 0 else x * 0  # a branch on a value: no graph can hold it

    def gradient(self, op, grads):
        return [grads[0]]


def test_an_op_dynamo_cannot_capture_falls_back_naming_the_op():
    def job():
        ls.manual_seed(0)
        model = ls.nn.Sequential(ls.nn.Linear(12, 5))
        with ls.Graph() as g:
            x, y = ls.placeholder("x", (8, 12)), ls.placeholder("y", (8,), "int64")
            loss = ls.nn.functional.cross_entropy(apply("_test_host_round_trip", model(x)), y)
            opt = ls.optim.SGD(model.parameters(), lr=0.1)
            train = opt.minimize(loss)
        rng = np.random.default_rng(4)
        data = [{x: rng.standard_normal((8, 12)).astype(np.float32), y: rng.integers(0, 5, 8)} for _ in range(3)]
        return g, [loss, train], model, opt, data

    _assert_falls_back(job, "_test_host_round_trip", ["cannot be lowered"])


def test_compile_refuses_an_unknown_backend():
    g, fetches, *_ = _mlp_job(lambda ps: ls.optim.SGD(ps, lr=0.1))
    with pytest.raises(ls.Error, match="unknown compile backend 'tvm'.*inductor"):
        g.compile(fetches, backend="tvm")


def test_train_config_refuses_a_non_bool_compile():
    from luoshu.train import TrainConfig

    with pytest.raises(ls.Error, match="compile"):
        TrainConfig.from_dict({"model": "mlp", "dataset": "digits", "compile": "yes"})


@pytest.mark.slow
def test_luoshu_train_compile_gives_the_uncompiled_metrics(tmp_path, recwarn):
    from luoshu.train import TrainConfig, train

    def run(compile, out):
        return train(
            TrainConfig.from_dict(
                {
                    "model": "mlp",
                    "dataset": "digits",
                    "max_steps": 12,
                    "batch_size": 64,
                    "optimizer": "sgd",
                    "lr": 0.05,
                    "progress": False,
                    "compile": compile,
                    "out": str(tmp_path / out),
                }
            )
        )

    plain, compiled = run(False, "plain"), run(True, "compiled")
    assert not [w for w in recwarn if issubclass(w.category, LoweringWarning)]  # it ran compiled
    for key, value in plain.items():
        assert compiled[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
