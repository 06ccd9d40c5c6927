"""Offline graph data: karate club against networkx, the SBM generator's properties, and the
edge-list and OGB-directory readers on files the tests write."""

from __future__ import annotations

import gzip

import networkx as nx
import numpy as np
import pytest

from luoshu.gnn import GraphInputError
from luoshu.gnn.datasets import karate_club, read_edge_list, read_ogb, stochastic_block_model


def test_karate_club_matches_networkx():
    g = karate_club()
    k = nx.karate_club_graph()
    assert g.num_nodes == 34 and g.num_edges == 156 and g.num_classes == 2
    np.testing.assert_array_equal(g.to_scipy().toarray(), nx.to_numpy_array(k, weight=None))
    assert int(g.y.sum()) == sum(k.nodes[v]["club"] == "Officer" for v in k.nodes)
    assert g.train_mask.nonzero().flatten().tolist() == [0, 33]
    assert int(g.test_mask.sum()) == 32


def test_sbm_is_seeded_sized_and_class_correlated():
    a = stochastic_block_model(3000, num_classes=4, avg_degree=8, seed=1)
    b = stochastic_block_model(3000, num_classes=4, avg_degree=8, seed=1)
    assert a.num_nodes == 3000 and a.num_edges == 2 * 12000
    np.testing.assert_array_equal(a.edge_index.numpy(), b.edge_index.numpy())
    np.testing.assert_array_equal(a.x.numpy(), b.x.numpy())
    y = a.y.numpy()
    same = (y[a.row.numpy()] == y[a.col.numpy()]).mean()
    assert abs(same - (0.5 + 0.5 / 4)) < 0.02  # p_intra plus the random endpoints that land in-class
    masks = a.train_mask.numpy().astype(int) + a.val_mask.numpy() + a.test_mask.numpy()
    assert (masks == 1).all() and abs(a.train_mask.numpy().mean() - 0.6) < 1e-3
    centres = np.stack([a.x.numpy()[y == c].mean(0) for c in range(4)])
    assert np.linalg.norm(centres[0] - centres[1]) > 0.5  # features depend on the class
    with pytest.raises(GraphInputError, match="num_classes >= 2"):
        stochastic_block_model(10, num_classes=1)


def test_edge_list_with_cora_style_node_file(tmp_path):
    (tmp_path / "g.content").write_text("p10 1 0 0 Theory\np20 0 1 0 Neural\np30 0 0 1 Theory\n")
    (tmp_path / "g.cites").write_text("# cited citing\np10 p20\np20 p30\np30 p10\n")
    g = read_edge_list(tmp_path / "g.cites", tmp_path / "g.content", undirected=True)
    assert g.num_nodes == 3 and g.num_edges == 6 and g.num_classes == 2
    np.testing.assert_array_equal(g.x.numpy(), np.eye(3))
    np.testing.assert_array_equal(g.y.numpy(), [1, 0, 1])  # Neural=0, Theory=1
    (tmp_path / "bad.cites").write_text("p10 p99\n")
    with pytest.raises(GraphInputError, match=r"bad.cites:1: node 'p99' is not in the node file"):
        read_edge_list(tmp_path / "bad.cites", tmp_path / "g.content")
    (tmp_path / "ragged.content").write_text("a 1 2 x\nb 1 y\n")
    with pytest.raises(GraphInputError, match="ragged.content:2: 1 features, but line 1 has 2"):
        read_edge_list(tmp_path / "g.cites", tmp_path / "ragged.content")


def test_plain_edge_list_with_weights(tmp_path):
    (tmp_path / "e.txt").write_text("0 1 0.5\n1 2 2.0\n")
    g = read_edge_list(tmp_path / "e.txt")
    assert g.num_nodes == 3 and g.x is None
    np.testing.assert_array_equal(g.to_scipy().toarray(), [[0, 0, 0], [0.5, 0, 0], [0, 2.0, 0]])
    with pytest.raises(GraphInputError, match="does not exist"):
        read_edge_list(tmp_path / "missing.txt")


def _write_csv_gz(path, array, fmt="%d"):
    with gzip.open(path, "wt") as f:
        np.savetxt(f, array, delimiter=",", fmt=fmt)


def test_ogb_directory_raw_csv_and_npy(tmp_path):
    rng = np.random.default_rng(0)
    n = 20
    edges = np.stack([rng.integers(0, n, 50), rng.integers(0, n, 50)], 1)
    feat, label = rng.standard_normal((n, 4)), rng.integers(0, 3, (n, 1))
    (tmp_path / "arxiv" / "raw").mkdir(parents=True)
    (tmp_path / "arxiv" / "split" / "time").mkdir(parents=True)
    _write_csv_gz(tmp_path / "arxiv" / "raw" / "edge.csv.gz", edges)
    _write_csv_gz(tmp_path / "arxiv" / "raw" / "node-feat.csv.gz", feat, "%.8f")
    _write_csv_gz(tmp_path / "arxiv" / "raw" / "node-label.csv.gz", label)
    for name, ids in (("train", np.arange(12)), ("valid", np.arange(12, 16)), ("test", np.arange(16, 20))):
        _write_csv_gz(tmp_path / "arxiv" / "split" / "time" / f"{name}.csv.gz", ids[:, None])
    g = read_ogb(tmp_path / "arxiv")
    assert g.num_nodes == n and g.num_edges == 50
    np.testing.assert_allclose(g.x.numpy(), feat, atol=1e-7)
    np.testing.assert_array_equal(g.y.numpy(), label[:, 0])
    assert int(g.train_mask.sum()) == 12 and bool(g.test_mask[19]) and not bool(g.test_mask[0])

    (tmp_path / "npy" / "split").mkdir(parents=True)
    np.save(tmp_path / "npy" / "edge_index.npy", edges.T)
    np.save(tmp_path / "npy" / "node_feat.npy", feat)
    np.save(tmp_path / "npy" / "node_label.npy", label[:, 0])
    for name, ids in (("train", [0, 1]), ("valid", [2]), ("test", [3, 30])):
        np.save(tmp_path / "npy" / "split" / f"{name}.npy", np.array(ids))
    with pytest.raises(GraphInputError, match="node id 30 outside"):
        read_ogb(tmp_path / "npy")
    np.save(tmp_path / "npy" / "split" / "test.npy", np.array([3, 4]))
    assert int(read_ogb(tmp_path / "npy").test_mask.sum()) == 2
    np.save(tmp_path / "npy" / "edge_index.npy", np.array([[0, 1], [1, 25]]))
    with pytest.raises(GraphInputError, match="target node 25"):
        read_ogb(tmp_path / "npy")
    with pytest.raises(GraphInputError, match="does not exist"):
        read_ogb(tmp_path / "nothing")
