"""SparseGraph: its views against SciPy and networkx, self-loops and gcn_norm against PyG,
and the clear errors bad input gets."""

from __future__ import annotations

import re

import networkx as nx
import numpy as np
import pytest
import scipy.sparse as sp
import torch

import luoshu as ls
from luoshu.gnn import GraphInputError, SparseGraph
from luoshu.gnn.sampler import NeighborLoader, NeighborSampler

EI = np.array([[0, 2, 1, 3, 0, 2], [1, 1, 2, 0, 3, 2]])  # (source, target); 2 -> 2 is a loop


def test_views_match_scipy():
    w = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    g = SparseGraph(EI, 4, edge_weight=w)
    dense = np.zeros((4, 4))
    dense[EI[1], EI[0]] = w  # A[target, source]
    np.testing.assert_array_equal(g.to_scipy().toarray(), dense)
    indptr, col = g.csr()
    ref = sp.csr_matrix(dense)
    np.testing.assert_array_equal(indptr.numpy(), ref.indptr)
    np.testing.assert_array_equal(col.numpy(), ref.indices)
    t_indptr, t_index, t_perm = g.csc()
    csc = sp.csc_matrix(dense)
    np.testing.assert_array_equal(t_indptr.numpy(), csc.indptr)
    np.testing.assert_array_equal(t_index.numpy(), csc.indices)
    np.testing.assert_array_equal(g.weights(torch.float64)[t_perm].numpy(), csc.data)
    np.testing.assert_array_equal(g.in_degree().numpy(), (dense != 0).sum(1))
    np.testing.assert_array_equal(g.out_degree().numpy(), (dense != 0).sum(0))
    np.testing.assert_allclose(g.in_degree(weighted=True).numpy(), dense.sum(1))
    back = SparseGraph.from_scipy(sp.coo_matrix(dense))
    np.testing.assert_array_equal(back.to_scipy().toarray(), dense)


def test_from_networkx_and_edges():
    k = nx.karate_club_graph()
    g = SparseGraph.from_networkx(k)
    assert g.num_nodes == 34 and g.num_edges == 2 * k.number_of_edges()
    np.testing.assert_array_equal(g.to_scipy().toarray(), nx.to_numpy_array(k, weight=None))
    directed = SparseGraph.from_networkx(nx.DiGraph([(0, 1), (1, 2)]))
    assert directed.num_edges == 2
    g2 = SparseGraph.from_edges([(0, 1), (1, 2), (2, 0)])
    assert g2.num_nodes == 3 and sorted(map(tuple, g2.edge_index.T.tolist())) == [(0, 1), (1, 2), (2, 0)]


def test_self_loops_and_gcn_norm_match_pyg():
    utils = pytest.importorskip("torch_geometric.utils")
    gcn = pytest.importorskip("torch_geometric.nn.conv.gcn_conv")
    g = SparseGraph(EI, 4)
    looped = g.add_self_loops()
    assert looped.num_edges == 6 + 4
    ref_ei, _ = utils.add_self_loops(torch.as_tensor(EI), num_nodes=4)
    assert sorted(map(tuple, looped.edge_index.T.tolist())) == sorted(map(tuple, ref_ei.T.tolist()))
    assert g.remove_self_loops().num_edges == 5
    w = np.array([0.5, 1.0, 2.0, 1.5, 3.0, 4.0])
    ours_g, ours_w = SparseGraph(EI, 4, edge_weight=w).gcn_norm(dtype=torch.float64)
    ref_ei, ref_w = gcn.gcn_norm(torch.as_tensor(EI), torch.tensor(w), 4, dtype=torch.float64)
    ours = sp.coo_matrix((ours_w.numpy(), (ours_g.row.numpy(), ours_g.col.numpy())), (4, 4)).toarray()
    ref = sp.coo_matrix((ref_w.numpy(), (ref_ei[1].numpy(), ref_ei[0].numpy())), (4, 4)).toarray()
    np.testing.assert_allclose(ours, ref, rtol=1e-12)


def test_spmm_on_a_graph_matches_torch_sparse():
    rng = np.random.default_rng(0)
    g = SparseGraph(np.stack([rng.integers(0, 50, 300), rng.integers(0, 40, 300)]), 40, num_src_nodes=50)
    x = rng.standard_normal((50, 6))
    w = rng.standard_normal(300)
    ref = torch.sparse_coo_tensor(
        torch.stack([torch.as_tensor(g.row), torch.as_tensor(g.col)]),
        torch.tensor(w[g.perm.numpy()]),
        (40, 50),
        check_invariants=True,
    ).to_dense() @ torch.tensor(x)
    out = ls.ops.spmm(g, ls.tensor(w[g.perm.numpy()]), ls.tensor(x))
    np.testing.assert_allclose(out.numpy(), ref.numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "edge_index, what",
    [
        (np.array([[0, 4], [1, 2]]), "source node 4, outside [0, 4)"),
        (np.array([[0, 1], [1, -1]]), "target node -1, outside [0, 4)"),
        (np.array([[0, 1, 2]]), "shape (2, num_edges)"),
        (np.array([[0.0, 1.0], [1.0, 2.0]]), "must be integers"),
    ],
)
def test_bad_edge_index_is_refused(edge_index, what):
    with pytest.raises(GraphInputError, match=re.escape(what)):
        SparseGraph(edge_index, 4)


def test_bad_features_and_empty_graph_are_refused():
    with pytest.raises(GraphInputError, match=r"x must have one row per node \(4\), found shape \(3, 2\)"):
        SparseGraph(EI, 4, x=np.zeros((3, 2)))
    with pytest.raises(GraphInputError, match="y must have one row per node"):
        SparseGraph(EI, 4, y=np.zeros(5))
    with pytest.raises(GraphInputError, match="edge_weight must have one row per edge"):
        SparseGraph(EI, 4, edge_weight=np.ones(5))
    with pytest.raises(GraphInputError, match="at least one node"):
        SparseGraph(np.zeros((2, 0), np.int64), 0)
    with pytest.raises(GraphInputError, match="at least one node"):
        SparseGraph.from_edges([])
    assert isinstance(GraphInputError("x"), ls.Error)


def test_bad_fanouts_are_refused():
    g = SparseGraph(EI, 4)
    with pytest.raises(GraphInputError, match=r"give 3 hops but the model has 2 layers"):
        NeighborSampler(g, [5, 5, 5], num_layers=2)
    with pytest.raises(GraphInputError, match="positive ints"):
        NeighborSampler(g, [5, 0])
    with pytest.raises(GraphInputError, match="positive ints"):
        NeighborSampler(g, [])
    with pytest.raises(GraphInputError, match=r"seed nodes must be in \[0, 4\)"):
        NeighborSampler(g, [2]).sample([0, 7])
    with pytest.raises(GraphInputError, match="seed mask needs one entry per node"):
        NeighborLoader(g, [2], seeds=np.ones(3, bool))


def test_model_with_wrong_number_of_blocks_is_refused():
    from luoshu.gnn.models import GraphSAGE, GraphSAGEConfig

    rng = np.random.default_rng(1)
    g = SparseGraph(np.stack([rng.integers(0, 30, 100), rng.integers(0, 30, 100)]), 30, x=rng.random((30, 4)))
    batch = NeighborSampler(g, [3, 3, 3]).sample([0, 1, 2])
    model = GraphSAGE(GraphSAGEConfig(4, 2))
    with pytest.raises(GraphInputError, match="has 2 layers but was given 3 blocks"):
        model(ls.tensor(g.x[batch.input_nodes].float()), batch.blocks)


def test_layer_refuses_features_of_the_wrong_size():
    from luoshu.gnn import SAGEConv

    with pytest.raises(ls.Error, match="x has 3 rows but the graph has 4 source nodes"):
        SAGEConv(2, 2)(ls.tensor(np.zeros((3, 2), np.float32)), SparseGraph(EI, 4))


def test_data_parallel_loader_needs_drop_last():
    with pytest.raises(GraphInputError, match="needs drop_last=True"):
        NeighborLoader(SparseGraph(EI, 4), [2], world_size=2, rank=1)
