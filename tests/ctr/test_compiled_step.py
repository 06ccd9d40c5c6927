"""luoshu.ctr with whole-step compilation (`CreateSolver(compile_step=True)`): the DCN quick start's
compiled step equals its plan step over 20 steps (loss, embedding rows, dense weights and every
optimizer's state) under the Local and Global updates, without a LoweringWarning.

The default cases capture the step with TorchDynamo's "eager" backend (the same single fx graph,
no code generation: Inductor compiles slowly on 2 cores); the Inductor run is `slow`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from luoshu import ctr as hugectr
from luoshu.compiler import LoweringWarning
from tests.ctr.conftest import dcn_model


def _states(model):
    out = {}
    for k, opt in enumerate([model.dense_optimizer, *model.sparse_optimizers]):
        for i, p in enumerate(opt.parameters()):
            for name, value in opt.state[p].items():
                out[f"optimizer {k} param {i} {name}"] = value.numpy().copy()
    return out


def _assert_compiled_equals_plan(data, update, backend, steps=20):
    plain = dcn_model(*data, update=update)
    plain.compile()
    if backend == "inductor":
        compiled = dcn_model(*data, update=update, compile_step=True)
        compiled.compile()
    else:
        compiled = dcn_model(*data, update=update)
        compiled.compile()
        compiled.graph.compile([compiled._loss, *compiled._updates], backend=backend)
    for step in range(steps):
        plain.train()
        compiled.train()
        np.testing.assert_allclose(compiled.get_current_loss(), plain.get_current_loss(), rtol=1e-5, atol=1e-5,
                                   err_msg=f"loss at step {step}")
    np.testing.assert_allclose(compiled.embedding_table(), plain.embedding_table(), rtol=1e-5, atol=1e-5)
    for p, q in zip(plain.network.parameters(), compiled.network.parameters()):
        np.testing.assert_allclose(q.numpy(), p.numpy(), rtol=1e-5, atol=1e-5)
    mine, theirs = _states(compiled), _states(plain)
    assert mine.keys() == theirs.keys()
    for key, value in theirs.items():
        np.testing.assert_allclose(mine[key], value, rtol=1e-5, atol=1e-5, err_msg=key)
    plan = compiled.graph.plan([compiled._loss, *compiled._updates], compiled._last_feeds)
    assert plan.compiled.reason is None and plan.compiled.compiled_runs == steps - 1  # step 1 creates the state


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("update", [hugectr.Update_t.Local, hugectr.Update_t.Global], ids=["local", "global"])
def test_compiled_dcn_step_equals_the_plan_over_20_steps(parquet_data, update, recwarn):
    _assert_compiled_equals_plan(parquet_data, update, "eager")
    assert not [w for w in recwarn if issubclass(w.category, LoweringWarning)]


@pytest.mark.slow
@pytest.mark.parametrize("update", [hugectr.Update_t.Local, hugectr.Update_t.Global], ids=["local", "global"])
def test_compile_step_under_inductor_equals_the_plan_over_20_steps(parquet_data, update, recwarn):
    _assert_compiled_equals_plan(parquet_data, update, "inductor")
    assert not [w for w in recwarn if issubclass(w.category, LoweringWarning)]


def test_create_solver_refuses_a_non_bool_compile_step():
    with pytest.raises(hugectr.CTRError, match="compile_step: expected True or False, found 'yes'"):
        hugectr.CreateSolver(compile_step="yes")
