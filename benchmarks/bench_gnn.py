"""Per-epoch time of GCN, GraphSAGE and GAT (full graph) and of sampled GraphSAGE mini-batches:
luoshu against PyTorch Geometric with the same layers, in one run, repeats interleaved,
medians after warm-up.

PyG runs as its users write it: layers called with `edge_index` (its default message
passing, gather + scatter), and where PyG offers it the faster sparse-matrix form (`adj_t`
as a torch.sparse CSR tensor, `cached=True` for GCN). The sampled rows train both on the
same blocks from luoshu's sampler, layer by layer on bipartite blocks (what PyG's
NeighborLoader + SAGEConv computes with `trim_to_layer`, its fastest form): PyG's
NeighborLoader itself cannot run here, as it needs pyg-lib (not on PyPI) or torch-sparse
(source only, a C++ build against this torch). PyG's per-block `adj_t` is built before the
timed epochs (a cost its epoch would pay, left out in its favour); luoshu's sampling time
is reported on its own line. The define-and-run row records one graph on
`BlockPlaceholders` and feeds every batch to it (one compiled plan for all block sizes).

    python benchmarks/bench_gnn.py                     # 100k nodes / 1M edges
    python benchmarks/bench_gnn.py --nodes 20000 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

import luoshu as ls
from luoshu.gnn import BlockPlaceholders
from luoshu.gnn.datasets import stochastic_block_model
from luoshu.gnn.models import GAT, GCN, GATConfig, GCNConfig, GraphSAGE, GraphSAGEConfig
from luoshu.gnn.sampler import NeighborSampler
from luoshu.gnn.training import minibatch_loss, train_full_graph_epoch


def _pyg_models(features: int, classes: int, hidden: int, heads: int):
    import torch_geometric.nn as pyg

    class Net(torch.nn.Module):
        def __init__(self, convs, act=torch.relu, dropout=0.5):
            super().__init__()
            self.convs, self.act, self.dropout = torch.nn.ModuleList(convs), act, dropout

        def forward(self, x, adj):
            adjs = adj if isinstance(adj, list) else [adj] * len(self.convs)
            for i, (conv, a) in enumerate(zip(self.convs, adjs)):
                x = torch.nn.functional.dropout(x, self.dropout, self.training)
                if isinstance(adj, list):  # a sampled block: (edge_index, (n_src, n_dst))
                    x = conv((x, x[: a[1][1]]), a[0], size=a[1])
                else:
                    x = conv(x, a)
                if i < len(self.convs) - 1:
                    x = self.act(x)
            return x

    return {
        "gcn": lambda cached: Net(
            [pyg.GCNConv(features, hidden, cached=cached), pyg.GCNConv(hidden, classes, cached=cached)]
        ),
        "graphsage": lambda cached: Net([pyg.SAGEConv(features, hidden), pyg.SAGEConv(hidden, classes)]),
        "gat": lambda cached: Net(
            [
                pyg.GATConv(features, hidden // heads, heads=heads, dropout=0.5),
                pyg.GATConv(hidden, classes, heads=1, concat=False, dropout=0.5),
            ],
            act=torch.nn.functional.elu,
        ),
    }


def _luoshu_model(name: str, features: int, classes: int, hidden: int, heads: int):
    if name == "gcn":
        return GCN(GCNConfig(features, classes, hidden=hidden))
    if name == "graphsage":
        return GraphSAGE(GraphSAGEConfig(features, classes, hidden=hidden))
    return GAT(GATConfig(features, classes, hidden=hidden // heads, heads=heads, dropout=0.5))


def _pyg_epoch(model, opt, x, adj, train_ids, y):
    model.train()
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(x, adj)[train_ids], y)
    loss.backward()
    opt.step()


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=100_000)
    parser.add_argument("--degree", type=float, default=10.0, help="mean degree (edges = nodes * degree)")
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--batches", type=int, default=10, help="sampled batches per timed epoch")
    parser.add_argument("--models", default="gcn,graphsage,gat")
    args = parser.parse_args()

    graph = stochastic_block_model(args.nodes, avg_degree=args.degree, num_features=args.features, seed=0)
    classes = graph.num_classes
    print(
        f"SBM graph: {graph.num_nodes} nodes, {graph.num_edges} edges, {args.features} features, "
        f"{classes} classes; torch threads {torch.get_num_threads()}; repeats {args.repeats} (+1 warm-up)"
    )
    x_t = graph.x.float()
    ei = graph.edge_index
    adj_t = torch.sparse_csr_tensor(graph.indptr, graph.col, torch.ones(graph.num_edges), (graph.num_nodes,) * 2)
    train_ids = torch.nonzero(graph.train_mask).reshape(-1)
    y_train = graph.y[train_ids]
    pyg_builders = _pyg_models(args.features, classes, args.hidden, args.heads)

    rows = []
    for name in [m for m in args.models.split(",") if m]:
        ls.manual_seed(0)
        torch.manual_seed(0)
        ours = _luoshu_model(name, args.features, classes, args.hidden, args.heads)
        ours_opt = ls.optim.Adam(ours.parameters(), lr=0.01)
        variants = {"edge_index": (pyg_builders[name](False), ei)}
        if name == "gcn":
            variants["edge_index, cached"] = (pyg_builders[name](True), ei)
        if name in ("gcn", "graphsage"):
            variants["adj_t (torch.sparse CSR)"] = (pyg_builders[name](name == "gcn"), adj_t)
        theirs = {k: (m, torch.optim.Adam(m.parameters(), lr=0.01), a) for k, (m, a) in variants.items()}
        times = {"luoshu": [], **{k: [] for k in theirs}}
        for r in range(args.repeats + 1):
            t = _timed(lambda ours=ours, ours_opt=ours_opt: train_full_graph_epoch(ours, ours_opt, graph))
            if r:
                times["luoshu"].append(t)
            for k, (m, opt, a) in theirs.items():
                t = _timed(lambda m=m, opt=opt, a=a: _pyg_epoch(m, opt, x_t, a, train_ids, y_train))
                if r:
                    times[k].append(t)
        ours_t = statistics.median(times["luoshu"])
        for k in theirs:
            ref = statistics.median(times[k])
            rows.append((f"{name} full graph", f"PyG {k}", ours_t, ref))

    # sampled GraphSAGE mini-batches: the same blocks for both
    sampler = NeighborSampler(graph, [10, 5], seed=0)
    seeds = train_ids.numpy()
    batches = [
        sampler.sample(seeds[i * args.batch_size : (i + 1) * args.batch_size], batch=i) for i in range(args.batches)
    ]
    sample_t = []
    for r in range(args.repeats + 1):
        t = _timed(
            lambda r=r: [
                sampler.sample(seeds[i * args.batch_size : (i + 1) * args.batch_size], epoch=r, batch=i)
                for i in range(args.batches)
            ]
        )
        if r:
            sample_t.append(t)
    ls.manual_seed(0)
    ours = GraphSAGE(GraphSAGEConfig(args.features, classes, hidden=args.hidden))
    ours_opt = ls.optim.Adam(ours.parameters(), lr=0.01)
    theirs = pyg_builders["graphsage"](False)
    theirs_opt = torch.optim.Adam(theirs.parameters(), lr=0.01)
    pyg_blocks = [[(b.edge_index, (b.num_src_nodes, b.num_nodes)) for b in mb.blocks] for mb in batches]
    # the same blocks as torch.sparse CSR adjacency (targets x sources; the blocks are CSR-sorted)
    pyg_adj = [
        [
            (
                torch.sparse_csr_tensor(b.indptr, b.col, torch.ones(b.num_edges), (b.num_nodes, b.num_src_nodes)),
                (b.num_src_nodes, b.num_nodes),
            )
            for b in mb.blocks
        ]
        for mb in batches
    ]
    theirs_adj = pyg_builders["graphsage"](False)
    theirs_adj_opt = torch.optim.Adam(theirs_adj.parameters(), lr=0.01)

    ls.manual_seed(0)
    dag_model = GraphSAGE(GraphSAGEConfig(args.features, classes, hidden=args.hidden))
    dag_opt = ls.optim.Adam(dag_model.parameters(), lr=0.01)
    with ls.Graph() as dag:
        x_ph = ls.placeholder("x", (None, args.features), "float32")
        y_ph = ls.placeholder("y", (None,), "int64")
        block_phs = [BlockPlaceholders(f"hop{i}") for i in range(2)]
        dag_loss = ls.nn.functional.cross_entropy(dag_model(x_ph, block_phs), y_ph)
        dag_step = dag_opt.minimize(dag_loss)

    def dag_epoch():
        dag_model.train()
        for mb in batches:
            feed = {x_ph: x_t.index_select(0, mb.input_nodes).numpy(), y_ph: graph.y.index_select(0, mb.seeds).numpy()}
            for ph, block in zip(block_phs, mb.blocks):
                feed.update(ph.feed(block))
            dag.run([dag_loss, dag_step], feed)

    def ours_epoch():
        ours.train()
        for mb in batches:
            ours_opt.zero_grad()
            loss = minibatch_loss(ours, graph, mb)
            loss.backward()
            ours_opt.step()

    def theirs_epoch(model, opt, all_blocks):
        model.train()
        for mb, blocks in zip(batches, all_blocks):
            opt.zero_grad()
            # index_select, as PyG's own loaders gather a batch's features
            out = model(x_t.index_select(0, mb.input_nodes), blocks)
            torch.nn.functional.cross_entropy(out, graph.y.index_select(0, mb.seeds)).backward()
            opt.step()

    runs = {
        "eager": ours_epoch,
        "graph": dag_epoch,
        "edge_index": lambda: theirs_epoch(theirs, theirs_opt, pyg_blocks),
        "adj_t": lambda: theirs_epoch(theirs_adj, theirs_adj_opt, pyg_adj),
    }
    sampled = {k: [] for k in runs}
    for r in range(args.repeats + 1):
        for k, fn in runs.items():
            t = _timed(fn)
            if r:
                sampled[k].append(t)
    workload = f"graphsage sampled [10,5] x{args.batches} batches of {args.batch_size}"
    for mode in ("eager", "graph"):
        for ref, label in (("edge_index", "PyG edge_index"), ("adj_t", "PyG adj_t (torch.sparse CSR)")):
            rows.append(
                (
                    f"{workload}{', define-and-run' if mode == 'graph' else ''}",
                    label,
                    statistics.median(sampled[mode]),
                    statistics.median(sampled[ref]),
                )
            )
    plans = len(dag._plans)
    rows.append(
        (
            f"{workload}, eager + luoshu's sampling",
            "PyG adj_t (no sampling counted)",
            statistics.median(sampled["eager"]) + statistics.median(sample_t),
            statistics.median(sampled["adj_t"]),
        )
    )

    print(f"\n{'workload':<68} {'reference':<28} {'luoshu s':>9} {'PyG s':>9} {'speed-up':>9}")
    for workload, ref, ours_t, ref_t in rows:
        print(f"{workload:<68} {ref:<28} {ours_t:>9.4f} {ref_t:>9.4f} {ref_t / ours_t:>8.2f}x")
    print(f"define-and-run: {plans} compiled plan(s) for {args.batches} batches of different block sizes")
    print(
        f"sampling [10,5], {args.batches} batches of {args.batch_size} (luoshu NeighborSampler): "
        f"{statistics.median(sample_t):.4f} s"
    )


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
