"""The zoo's GCN / GraphSAGE / GAT train to the stated accuracies.

- GCN on Zachary's karate club, featureless (X = I), trained on the two faction leaders
  only: Zachary (1977) assigned 33 of 34 members correctly, missing individual 9 (node 8).
  Over five seeds GCN gets at least 30/32 of the other members right (>= 93.8%; 32/34
  overall), its only errors node 8 and, on some seeds, node 2 (individual 3, who had ties
  to both factions); about half the seeds give Zachary's 33/34.
- GraphSAGE (mean) on a 10k-node SBM (5 classes, p_intra 0.5, noisy features):
  test accuracy >= 0.80 full-graph and sampled ([10, 5]), against 0.58 from the features
  alone (scikit-learn's logistic regression).
"""

from __future__ import annotations

import numpy as np
import pytest

import luoshu as ls
from luoshu.gnn.datasets import karate_club, stochastic_block_model
from luoshu.gnn.models import GAT, GCN, GATConfig, GCNConfig, GraphSAGE, GraphSAGEConfig
from luoshu.gnn.sampler import NeighborLoader
from luoshu.gnn.training import accuracy, train_full_graph_epoch, train_sampled_epoch


@pytest.fixture(scope="module")
def sbm():
    return stochastic_block_model(10_000, seed=0)


def test_gcn_on_karate_club():
    from luoshu.core.context import no_grad

    g = karate_club()
    for seed in range(5):
        ls.manual_seed(seed)
        model = GCN(GCNConfig(34, 2, hidden=16))
        opt = ls.optim.Adam(model.parameters(), lr=0.01, weight_decay=5e-4)
        for _ in range(200):
            train_full_graph_epoch(model, opt, g)
        acc = accuracy(model, g)
        assert acc["train"] == 1.0, seed
        assert acc["test"] >= 30 / 32, seed
        model.eval()
        with no_grad():
            wrong = set(np.nonzero(model(ls.tensor(g.x.float().numpy()), g).numpy().argmax(-1) != g.y.numpy())[0])
        assert wrong <= {2, 8}, (seed, wrong)


def test_features_alone_are_weak_on_the_sbm(sbm):
    from sklearn.linear_model import LogisticRegression

    tr, te = sbm.train_mask.numpy(), sbm.test_mask.numpy()
    x, y = sbm.x.numpy(), sbm.y.numpy()
    assert LogisticRegression(max_iter=500).fit(x[tr], y[tr]).score(x[te], y[te]) < 0.65


def test_graphsage_full_graph_on_sbm(sbm):
    ls.manual_seed(0)
    model = GraphSAGE(GraphSAGEConfig(16, 5, hidden=32))
    opt = ls.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(25):
        train_full_graph_epoch(model, opt, sbm)
    assert accuracy(model, sbm)["test"] >= 0.80


def test_graphsage_sampled_on_sbm(sbm):
    ls.manual_seed(0)
    model = GraphSAGE(GraphSAGEConfig(16, 5, hidden=32))
    opt = ls.optim.Adam(model.parameters(), lr=0.02)
    loader = NeighborLoader(sbm, [10, 5], seeds=sbm.train_mask, batch_size=256, num_workers=2, seed=0)
    for _ in range(2):
        train_sampled_epoch(model, opt, sbm, loader)
    assert accuracy(model, sbm)["test"] >= 0.80


def test_gat_learns_the_sbm_and_max_pool_sage_runs_sampled(sbm):
    small = stochastic_block_model(2000, seed=1)
    ls.manual_seed(0)
    model = GAT(GATConfig(16, 5, hidden=8, heads=4, dropout=0.2))
    opt = ls.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(30):
        train_full_graph_epoch(model, opt, small)
    assert accuracy(model, small)["test"] >= 0.75
    pool = GraphSAGE(GraphSAGEConfig(16, 5, hidden=16, aggr="max", project=True))
    opt = ls.optim.Adam(pool.parameters(), lr=0.02)
    loader = NeighborLoader(small, [5, 5], seeds=small.train_mask, batch_size=200)
    losses = [train_sampled_epoch(pool, opt, small, loader) for _ in range(3)]
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("name", ["gcn", "graphsage", "gat"])
def test_build_from_the_zoo(name):
    from luoshu import models

    assert models.MODELS[name][2] == "node"
    model = models.build(name, in_features=8, num_classes=3)
    g = stochastic_block_model(100, num_classes=3, num_features=8)
    out = model(ls.tensor(g.x.numpy()), g)
    assert out.shape == (100, 3) and np.isfinite(out.numpy()).all()


def test_define_and_run_training_matches_eager():
    # the same GraphSAGE / GAT steps recorded once into a graph and run, against eager steps
    from luoshu import ops

    g = stochastic_block_model(300, seed=4)
    ids = ls.tensor(np.nonzero(g.train_mask.numpy())[0])
    labels = ls.tensor(g.y.numpy()[g.train_mask.numpy()])
    for build in (
        lambda: GraphSAGE(GraphSAGEConfig(16, 5, hidden=8, dropout=0.0)),
        lambda: GAT(GATConfig(16, 5, hidden=4, heads=2, dropout=0.0)),
    ):
        ls.manual_seed(0)
        eager = build()
        ls.manual_seed(0)
        graph_model = build()
        eager_opt = ls.optim.Adam(eager.parameters(), lr=0.01)
        graph_opt = ls.optim.Adam(graph_model.parameters(), lr=0.01)
        with ls.Graph() as dag:
            x = ls.placeholder("x", (300, 16), "float32")
            loss = ls.nn.functional.cross_entropy(ops.index_select(graph_model(x, g), 0, ids), labels)
            step = graph_opt.minimize(loss)
        features = g.x.numpy()
        for _ in range(3):
            (got, _) = dag.run([loss, step], {x: features})
            eager_opt.zero_grad()
            ref = ls.nn.functional.cross_entropy(ops.index_select(eager(ls.tensor(features), g), 0, ids), labels)
            ref.backward()
            eager_opt.step()
            np.testing.assert_allclose(got, ref.numpy(), rtol=1e-5)


@pytest.mark.parametrize("kind", ["graphsage", "gat"])
def test_define_and_run_sampled_training_matches_eager(kind):
    # one graph recorded with BlockPlaceholders, fed a new sampled batch per step
    from luoshu.gnn import BlockPlaceholders

    g = stochastic_block_model(600, seed=6)
    loader = NeighborLoader(g, [4, 3], seeds=g.train_mask, batch_size=64, seed=3)

    def build():
        ls.manual_seed(0)
        if kind == "gat":
            return GAT(GATConfig(16, 5, hidden=4, heads=2, dropout=0.0))
        return GraphSAGE(GraphSAGEConfig(16, 5, hidden=8, dropout=0.0))

    eager, graph_model = build(), build()
    eager_opt = ls.optim.Adam(eager.parameters(), lr=0.01)
    graph_opt = ls.optim.Adam(graph_model.parameters(), lr=0.01)
    with ls.Graph() as dag:
        x = ls.placeholder("x", (None, 16), "float32")
        y = ls.placeholder("y", (None,), "int64")
        blocks = [BlockPlaceholders(f"hop{i}", self_loops=kind == "gat") for i in range(2)]
        loss = ls.nn.functional.cross_entropy(graph_model(x, blocks), y)
        step = graph_opt.minimize(loss)
    steps, plans, sizes = 0, set(), set()
    for mb in loader:
        feed = {x: g.x[mb.input_nodes].numpy(), y: g.y[mb.seeds].numpy()}
        for ph, block in zip(blocks, mb.blocks):
            feed.update(ph.feed(block))
        (got, _) = dag.run([loss, step], feed)
        plans.add(id(dag.plan([loss, step], feed)))
        sizes.add(tuple(b.num_src_nodes for b in mb.blocks))
        eager_opt.zero_grad()
        ref = ls.nn.functional.cross_entropy(eager(ls.tensor(feed[x]), mb.blocks), ls.tensor(feed[y]))
        ref.backward()
        eager_opt.step()
        np.testing.assert_allclose(got, ref.numpy(), rtol=1e-5, atol=1e-6)
        steps += 1
    assert steps == 6
    assert len(sizes) > 1 and len(plans) == 1  # blocks of every size run through one compiled plan
    with pytest.raises(ls.Error, match=r"needs BlockPlaceholders\(self_loops=True\)"):
        with ls.Graph():
            GAT(GATConfig(16, 5, hidden=4, heads=2))(ls.placeholder("x", (None, 16)), [BlockPlaceholders("a")] * 2)
