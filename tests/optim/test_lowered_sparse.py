"""luoshu.optim.lowered_sparse: the static-shape coalescing against torch.unique, and the lowered
row-wise update (run eagerly, no compiler) against torch.optim.SparseAdam and the optimizers'
own sparse update (the plan's), rows and optimizer state."""

import numpy as np
import pytest
import torch

import luoshu as ls
from luoshu.optim.lowered_sparse import coalesce_rows


@pytest.mark.parametrize("num_rows", [40, 100_000], ids=["table-long-mask", "sort"])
def test_coalesce_rows_gives_torch_uniques_rows_and_sums_then_a_harmless_tail(num_rows):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, min(num_rows, 60), (200,), generator=gen)
    values = torch.randn(200, 3, generator=gen)
    rows, summed, exact = coalesce_rows(ids, values, (num_rows, 3))
    unique, inverse = torch.unique(ids, return_inverse=True)
    expected = torch.zeros(len(unique), 3).index_add_(0, inverse, values)
    u = len(unique)
    assert rows.shape == (200,) and summed.shape == exact.shape == (200, 3)  # static: one entry per id
    torch.testing.assert_close(rows[:u], unique)
    torch.testing.assert_close(exact[:u], expected)
    torch.testing.assert_close(summed[:u], expected)
    assert not exact[u:].any()
    assert (rows[u:] == unique[0]).all() and (summed[u:] == expected[0]).all()  # entry 0 again


def _batches(steps, rows, dim, n, seed):
    rng = np.random.default_rng(seed)
    return [(torch.from_numpy(rng.integers(0, rows, n)),
             torch.from_numpy(rng.standard_normal((n, dim)).astype(np.float32))) for _ in range(steps)]


def test_lowered_sparse_adam_equals_torch_sparse_adam():
    rows, dim = 30, 4
    start = np.random.default_rng(1).standard_normal((rows, dim)).astype(np.float32)
    table = ls.tensor(start.copy())
    opt = ls.optim.Adam([table], lr=1e-2)
    lowered = opt.lowered_update([0], "s")
    reference = torch.nn.Parameter(torch.from_numpy(start.copy()))
    torch_opt = torch.optim.SparseAdam([reference], lr=1e-2)
    for step, (ids, values) in enumerate(_batches(12, rows, dim, 10, seed=2)):
        reference.grad = torch.sparse_coo_tensor(ids[None], values, (rows, dim), check_invariants=True)
        torch_opt.step()
        inputs = lowered.inputs()
        if step == 0:
            assert inputs is None  # no state yet: the plan's first step creates it
            opt.apply_gradients([(0, (ids, values))])
        else:
            with torch.no_grad():
                lowered.compute(inputs, ids, values)
        np.testing.assert_allclose(table.numpy(), reference.detach().numpy(), rtol=1e-5, atol=1e-6,
                                   err_msg=f"step {step}")
    state = torch_opt.state[reference]
    for name in ("exp_avg", "exp_avg_sq"):
        np.testing.assert_allclose(opt.state[table][name].numpy(), state[name].numpy(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: ls.optim.Adam(ps, lr=1e-2, amsgrad=True, weight_decay=1e-2),
        lambda ps: ls.optim.AdamW(ps, lr=1e-2, max_grad_norm=0.5),
        lambda ps: ls.optim.AdaGrad(ps, lr=0.1, lr_decay=0.01),
        lambda ps: ls.optim.RMSProp(ps, lr=1e-2, momentum=0.9, centered=True),
        lambda ps: ls.optim.SGD(ps, lr=0.1, momentum=0.9, l1=1e-3),
    ],
    ids=["adam-amsgrad-l2", "adamw-clipped", "adagrad", "rmsprop-centered", "sgd-momentum-l1"],
)
@pytest.mark.parametrize("kind", ["s", "g"], ids=["local", "global"])
def test_each_lowered_sparse_rule_equals_the_optimizers_sparse_update(make_opt, kind):
    """A table (sparse gradient) and a dense parameter in one group, as a CTR model's optimizer."""
    rng = np.random.default_rng(3)
    start = [rng.standard_normal((25, 4)).astype(np.float32), rng.standard_normal((6,)).astype(np.float32)]
    params, twins = [ls.tensor(a.copy()) for a in start], [ls.tensor(a.copy()) for a in start]
    opt, twin = make_opt(params), make_opt(twins)
    lowered = twin.lowered_update([0, 1], kind + "d")
    mark = (ls.ops.update.GLOBAL,) if kind == "g" else ()
    dense = [torch.from_numpy(rng.standard_normal(6).astype(np.float32)) for _ in range(8)]
    for step, ((ids, values), g) in enumerate(zip(_batches(8, 25, 4, 12, seed=4), dense)):
        pairs = [(0, (ids, values, *mark)), (1, g)]
        opt.apply_gradients(pairs)
        inputs = lowered.inputs()
        if step == 0:
            twin.apply_gradients(pairs)
        else:
            with torch.no_grad():
                lowered.compute(inputs, ids, values, g)
        for p, q in zip(params, twins):
            np.testing.assert_allclose(q.numpy(), p.numpy(), rtol=1e-5, atol=1e-6, err_msg=f"step {step}")
    for p, q in zip(params, twins):
        for name, value in opt.state[p].items():
            np.testing.assert_allclose(twin.state[q][name].numpy(), value.numpy(), rtol=1e-5, atol=1e-6, err_msg=name)
    if kind == "g":
        assert not twin._grad_buffers[0].any()  # the scratch gradient is all zero again
