"""Data-parallel mini-batch GraphSAGE; run under `luoshu launch` by tests/gnn/test_distributed.py.

    python -m luoshu.distributed.launch -n N tests/gnn/dp_graphsage.py --batch B --out PREFIX

Each worker samples its own slice of every global batch of N*B seed nodes (the sampler's
counter-based randomness gives it the neighbourhoods one process would sample) and
`DataParallel` averages the gradients; every worker writes its final parameters to
PREFIX.rank<r>.npz. `train(...)` with world size 1 at batch N*B is the single-process
reference. `--graph` trains in define-and-run mode instead: one graph recorded on
`BlockPlaceholders`, every sampled batch fed to it, `DataParallel(graph)` rewriting its
update.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import luoshu as ls
from luoshu.gnn import BlockPlaceholders
from luoshu.gnn.datasets import stochastic_block_model
from luoshu.gnn.models import GraphSAGE, GraphSAGEConfig
from luoshu.gnn.sampler import NeighborLoader
from luoshu.gnn.training import minibatch_loss


def train(
    batch: int, rank: int, world_size: int, data_parallel: bool, epochs: int = 2, define_and_run: bool = False
) -> dict:
    graph = stochastic_block_model(1500, num_features=8, seed=3)
    ls.manual_seed(1234 + 1000 * rank)  # different on purpose: DataParallel broadcasts worker 0's weights
    model = GraphSAGE(GraphSAGEConfig(8, graph.num_classes, hidden=16, dropout=0.0))
    opt = ls.optim.Adam(model.parameters(), lr=0.01)
    if define_and_run:
        with ls.Graph() as dag:
            x = ls.placeholder("x", (None, 8), "float32")
            y = ls.placeholder("y", (None,), "int64")
            blocks = [BlockPlaceholders(f"hop{i}") for i in range(2)]
            loss = ls.nn.functional.cross_entropy(model(x, blocks), y)
            step = opt.minimize(loss)
        if data_parallel:
            ls.parallel.DataParallel(dag)
    dp = ls.parallel.DataParallel(model, opt) if data_parallel and not define_and_run else None
    loader = NeighborLoader(
        graph,
        [5, 3],
        seeds=graph.train_mask,
        batch_size=batch,
        seed=11,
        drop_last=True,
        rank=rank,
        world_size=world_size,
        num_workers=1,
    )
    for _ in range(epochs):
        for mb in loader:
            if define_and_run:
                feed = {x: graph.x[mb.input_nodes].numpy(), y: graph.y[mb.seeds].numpy()}
                for ph, block in zip(blocks, mb.blocks):
                    feed.update(ph.feed(block))
                dag.run([loss, step], feed)
                continue
            loss = minibatch_loss(model, graph, mb)
            if dp is None:
                opt.minimize(loss)
            else:
                loss.backward()
                dp.step()
                dp.zero_grad()
    return {name: p.numpy() for name, p in model.named_parameters()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--graph", action="store_true", help="define-and-run on BlockPlaceholders")
    args = parser.parse_args()
    torch.set_num_threads(1)
    ls.distributed.init()
    rank, world = ls.distributed.rank(), ls.distributed.world_size()
    params = train(args.batch, rank, world, data_parallel=True, define_and_run=args.graph)
    np.savez(f"{args.out}.rank{ls.distributed.rank()}.npz", **params)
    ls.distributed.barrier()
    ls.distributed.shutdown()


if __name__ == "__main__":
    main()
