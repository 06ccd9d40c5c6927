"""GCNConv, SAGEConv and GATConv against PyTorch Geometric's layers with copied weights
(float64, forward and gradients of the input and every parameter), and global pooling
against PyG's pooling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import luoshu as ls
from luoshu.gnn import (
    GATConv,
    GCNConv,
    SAGEConv,
    SparseGraph,
    batch_graphs,
    global_add_pool,
    global_max_pool,
    global_mean_pool,
)

pyg_nn = pytest.importorskip("torch_geometric.nn")

TOL = 1e-6


def _random_graph(rng, n=12, e=40):
    src, dst = rng.integers(0, n, e), rng.integers(0, n, e)
    src[:3], dst[:3] = [1, 4, 4], [1, 4, 7]  # self-loops and a duplicate (4 -> 7 below)
    src[3], dst[3] = 4, 7
    dst[dst == n - 1] = 0  # node n-1 has no incoming edge
    return np.stack([src, dst])


def _copy_weights(ours, theirs):
    ours_params = dict(ours.named_parameters())
    theirs_params = dict(theirs.named_parameters())
    assert set(ours_params) == set(theirs_params), (sorted(ours_params), sorted(theirs_params))
    for name, p in theirs_params.items():
        assert ours_params[name].shape == tuple(p.shape), name
        ours_params[name].value.copy_(p.detach())
    return [ours_params[k] for k in theirs_params], list(theirs_params.values())


def _compare(ours, theirs, x_np, edge_index, graph=None, bipartite_dst=None):
    """Forward and gradients (input, every parameter) for a random output cotangent."""
    rng = np.random.default_rng(7)
    ours_params, theirs_params = _copy_weights(ours, theirs)
    tx = torch.tensor(x_np, requires_grad=True)
    ei = torch.as_tensor(edge_index)
    if bipartite_dst is None:
        t_out = theirs(tx, ei)
    else:
        t_out = theirs((tx, tx[:bipartite_dst]), ei, size=(x_np.shape[0], bipartite_dst))
    cot = rng.standard_normal(tuple(t_out.shape))
    t_grads = torch.autograd.grad(t_out, [tx, *theirs_params], torch.tensor(cot))

    graph = graph or SparseGraph(edge_index, x_np.shape[0])
    lx = ls.tensor(x_np, requires_grad=True)
    l_out = ours(lx, graph)
    np.testing.assert_allclose(l_out.numpy(), t_out.detach().numpy(), rtol=TOL, atol=TOL)
    l_grads = ls.gradients((l_out * ls.tensor(cot)).sum(), [lx, *ours_params])
    for name, a, b in zip(["x"] + [p.name for p in ours_params], l_grads, t_grads):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=TOL, atol=TOL, err_msg=f"gradient of {name}")


@pytest.mark.parametrize("kwargs", [{}, {"add_self_loops": False}, {"bias": False}])
def test_gcn_conv_matches_pyg(kwargs):
    rng = np.random.default_rng(0)
    ei = _random_graph(rng)
    x = rng.standard_normal((12, 5))
    torch.manual_seed(0)
    theirs = pyg_nn.GCNConv(5, 4, **kwargs).double()
    _compare(GCNConv(5, 4, dtype="float64", **kwargs), theirs, x, ei)


# `improved` (A + 2I) is checked with edge weights: without them PyG's gcn_norm adds its
# loops before it materialises the weights, so they come out as 1 and `improved` is a no-op.
@pytest.mark.parametrize("improved", [False, True])
def test_gcn_conv_edge_weights_match_pyg(improved):
    rng = np.random.default_rng(1)
    ei = _random_graph(rng)
    w = rng.uniform(0.5, 2.0, ei.shape[1])
    x = rng.standard_normal((12, 3))
    theirs = pyg_nn.GCNConv(3, 2, improved=improved).double()
    ours = GCNConv(3, 2, improved=improved, dtype="float64")
    _copy_weights(ours, theirs)
    expected = theirs(torch.tensor(x), torch.as_tensor(ei), torch.tensor(w)).detach().numpy()
    got = ours(ls.tensor(x), SparseGraph(ei, 12, edge_weight=w)).numpy()
    np.testing.assert_allclose(got, expected, rtol=TOL, atol=TOL)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"aggr": "mean"},
        {"aggr": "max"},
        {"aggr": "max", "project": True},
        {"aggr": "sum", "normalize": True},
        {"aggr": "mean", "root_weight": False},
    ],
)
@pytest.mark.parametrize("channels", [(6, 3), (3, 6)], ids=["narrowing", "widening"])
def test_sage_conv_matches_pyg(kwargs, channels):
    # narrowing mean/sum layers apply lin_l before aggregating, widening ones after (PyG: after)
    rng = np.random.default_rng(2)
    ei = _random_graph(rng)
    x = rng.standard_normal((12, channels[0]))
    torch.manual_seed(1)
    theirs = pyg_nn.SAGEConv(*channels, **kwargs).double()
    _compare(SAGEConv(*channels, dtype="float64", **kwargs), theirs, x, ei)


def test_sage_conv_on_a_bipartite_block_matches_pyg():
    rng = np.random.default_rng(3)
    n_src, n_dst = 10, 4
    ei = np.stack([rng.integers(0, n_src, 25), rng.integers(0, n_dst, 25)])
    x = rng.standard_normal((n_src, 5))
    theirs = pyg_nn.SAGEConv(5, 3).double()
    block = SparseGraph(ei, n_dst, num_src_nodes=n_src)
    _compare(SAGEConv(5, 3, dtype="float64"), theirs, x, ei, graph=block, bipartite_dst=n_dst)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"heads": 1},
        {"heads": 3},
        {"heads": 2, "concat": False},
        {"heads": 2, "add_self_loops": False, "negative_slope": 0.1},
    ],
)
def test_gat_conv_matches_pyg(kwargs):
    rng = np.random.default_rng(4)
    ei = _random_graph(rng)
    x = rng.standard_normal((12, 5))
    torch.manual_seed(2)
    theirs = pyg_nn.GATConv(5, 4, **kwargs).double()
    _compare(GATConv(5, 4, dtype="float64", **kwargs), theirs, x, ei)


def test_gat_conv_on_a_bipartite_block_matches_pyg():
    rng = np.random.default_rng(5)
    n_src, n_dst = 9, 4
    ei = np.stack([rng.integers(0, n_src, 20), rng.integers(0, n_dst, 20)])
    x = rng.standard_normal((n_src, 3))
    theirs = pyg_nn.GATConv(3, 2, heads=2).double()
    block = SparseGraph(ei, n_dst, num_src_nodes=n_src)
    _compare(GATConv(3, 2, heads=2, dtype="float64"), theirs, x, ei, graph=block, bipartite_dst=n_dst)


def test_gat_attention_dropout_is_seeded_and_off_in_eval():
    rng = np.random.default_rng(6)
    graph = SparseGraph(_random_graph(rng), 12)
    x = ls.tensor(rng.standard_normal((12, 4)))
    layer = GATConv(4, 3, heads=2, dropout=0.5, dtype="float64")
    ls.manual_seed(3)
    a = layer(x, graph).numpy()
    ls.manual_seed(3)
    b = layer(x, graph).numpy()
    c = layer(x, graph).numpy()
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    layer.eval()
    off = layer(x, graph).numpy()
    layer.dropout = 0.0
    np.testing.assert_array_equal(off, layer(x, graph).numpy())


def test_layers_in_a_define_and_run_graph_match_eager():
    rng = np.random.default_rng(8)
    graph = SparseGraph(_random_graph(rng), 12)
    x = rng.standard_normal((12, 4))
    for layer in (
        GCNConv(4, 3, dtype="float64"),
        SAGEConv(4, 3, aggr="max", dtype="float64"),
        GATConv(4, 3, heads=2, dtype="float64"),
    ):
        eager = layer(ls.tensor(x), graph).numpy()
        with ls.Graph() as g:
            ph = ls.placeholder("x", (12, 4), "float64")
            out = layer(ph, graph)
        np.testing.assert_allclose(g.run([out], {ph: x})[0], eager, rtol=1e-12, atol=1e-12)


def test_global_pooling_matches_pyg():
    pyg_pool = pytest.importorskip("torch_geometric.nn.pool")
    rng = np.random.default_rng(9)
    graphs = [
        SparseGraph(np.stack([rng.integers(0, n, 2 * n), rng.integers(0, n, 2 * n)]), n, x=rng.standard_normal((n, 3)))
        for n in (3, 5, 1, 4)
    ]
    batch = batch_graphs(graphs)
    assert batch.num_graphs == 4 and batch.num_nodes == 13 and batch.num_edges == 26
    x = batch.x.numpy()
    for ours, theirs in (
        (global_add_pool, pyg_pool.global_add_pool),
        (global_mean_pool, pyg_pool.global_mean_pool),
        (global_max_pool, pyg_pool.global_max_pool),
    ):
        lx = ls.tensor(x, requires_grad=True)
        tx = torch.tensor(x, requires_grad=True)
        out = ours(lx, batch.batch)
        ref = theirs(tx, batch.batch)
        np.testing.assert_allclose(out.numpy(), ref.detach().numpy(), rtol=TOL, atol=TOL)
        cot = rng.standard_normal(tuple(ref.shape))
        (g,) = ls.gradients((out * ls.tensor(cot)).sum(), [lx])
        (tg,) = torch.autograd.grad(ref, [tx], torch.tensor(cot))
        np.testing.assert_allclose(g.numpy(), tg.numpy(), rtol=TOL, atol=TOL)


def test_graph_layers_are_nn_modules_exported_from_gnn():
    # luoshu.nn cannot import luoshu.gnn (the layering); its docstring names where they are
    for layer in (GCNConv, SAGEConv, GATConv):
        assert issubclass(layer, ls.nn.Module)
        assert getattr(ls.gnn, layer.__name__) is layer
        assert f"ls.gnn.{layer.__name__}" in ls.nn.__doc__
