"""Autodiff beyond single ops: accumulation, backward(), higher order, graph == eager."""

import numpy as np
import pytest
import torch

import luoshu as ls


def test_backward_accumulates_and_zero_grad():
    w = ls.tensor(np.array([1.0, 2.0]), requires_grad=True)
    (w * w).sum().backward()
    (w * 3.0).sum().backward()
    np.testing.assert_allclose(w.grad.numpy(), 2 * np.array([1.0, 2.0]) + 3.0)


def test_backward_needs_scalar_or_gradient():
    w = ls.tensor(np.ones(3), requires_grad=True)
    with pytest.raises(ls.GradientError, match="scalar"):
        (w * 2.0).backward()
    (w * 2.0).backward(np.ones(3))
    np.testing.assert_allclose(w.grad.numpy(), 2.0)
    with pytest.raises(ls.GradientError):
        ls.tensor(np.ones(3)).sum().backward()


def test_intermediate_results_are_not_tracked_without_grad():
    a = ls.tensor(np.ones(3), requires_grad=True)
    with ls.no_grad():
        b = a * 2.0
    assert not b.requires_grad and b.producer is None


def test_gradient_of_unused_input_is_none():
    a = ls.tensor(np.ones(2), requires_grad=True)
    b = ls.tensor(np.ones(2), requires_grad=True)
    ga, gb = ls.gradients((a * a).sum(), [a, b])
    assert gb is None and ga is not None


def _torch_third_derivative(x):
    t = torch.tensor(x, requires_grad=True)
    y = (torch.sin(t) * t ** 2).sum()
    (g,) = torch.autograd.grad(y, t, create_graph=True)
    (g2,) = torch.autograd.grad(g.sum(), t, create_graph=True)
    (g3,) = torch.autograd.grad(g2.sum(), t)
    return g3.numpy()


def test_third_order_eager_and_graph():
    x = np.linspace(-1, 1, 5)
    expected = _torch_third_derivative(x)
    t = ls.tensor(x, requires_grad=True)
    y = (ls.ops.sin(t) * t ** 2).sum()
    (g,) = ls.gradients(y, [t], create_graph=True)
    (g2,) = ls.gradients(g.sum(), [t], create_graph=True)
    (g3,) = ls.gradients(g2.sum(), [t])
    np.testing.assert_allclose(g3.numpy(), expected, rtol=1e-10)
    with ls.Graph() as graph:
        p = ls.placeholder("p", (None,), "float64")
        y = (ls.ops.sin(p) * p ** 2).sum()
        (g,) = ls.gradients(y, [p])
        (g2,) = ls.gradients(g.sum(), [p])
        (g3,) = ls.gradients(g2.sum(), [p])
    np.testing.assert_allclose(graph.run(g3, {p: x}), expected, rtol=1e-10)


def test_shared_subexpression_gradients_accumulate():
    x = np.array([0.3, -0.7])
    t = torch.tensor(x, requires_grad=True)
    h = torch.tanh(t)
    (h * h + h).sum().backward()
    a = ls.tensor(x, requires_grad=True)
    h2 = ls.ops.tanh(a)
    (h2 * h2 + h2).sum().backward()
    np.testing.assert_allclose(a.grad.numpy(), t.grad.numpy(), rtol=1e-12)


def test_a_tensors_gradient_contributions_are_summed_by_one_add_n():
    """h read by three ops: its gradient is one n-ary sum of the three contributions (what lets the
    states pass all-reduce a gradient's partial contributions together), in arrival order, so a
    one-process graph has the bits of the chain ((a + b) + c); the values are torch autograd's."""
    x = np.array([[0.3, -0.7, 1.1], [0.2, 0.5, -1.3]])
    t = torch.tensor(x, requires_grad=True)
    ht = torch.tanh(t)
    (ht * ht + ht.exp() + ht.sin()).sum().backward()
    with ls.Graph() as g:
        p = ls.placeholder("p", (2, 3), "float64")
        h = ls.ops.tanh(p)
        (grad,) = ls.gradients((h * h + ls.ops.exp(h) + ls.ops.sin(h)).sum(), [p])
    sums = [op for op in g.ops if op.opdef.name == "add_n"]
    assert [len(op.inputs) for op in sums] == [4]  # h * h reads h twice: four contributions
    np.testing.assert_allclose(g.run(grad, {p: x}), t.grad.numpy(), rtol=1e-12)
    parts = [ls.tensor(np.random.default_rng(s).standard_normal(5)) for s in range(4)]
    chain = ((parts[0] + parts[1]) + parts[2]) + parts[3]
    assert torch.equal(ls.ops.add_n(*parts).value, chain.value)
