"""GraphSAGE with a learnable node embedding, trained data-parallel with the table on the
parameter servers (HET: DataParallel mode "hybrid", read through the worker cache); run by
tests/gnn/test_distributed.py under `luoshu launch -n N --servers 1`.

    luoshu launch -n 2 --servers 1 tests/gnn/het_dp_graphsage.py --batch B --out PREFIX

Each worker samples its slice of every global batch; the dense weights are all-reduced, the
embedding rows pulled through the cache and pushed to the servers. `train(...,
data_parallel=False)` at batch N*B with a local table holding the servers' initial rows is
the single-process reference. Every worker writes PREFIX.rank<r>.npz.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import luoshu as ls
from luoshu import ps
from luoshu.gnn.datasets import stochastic_block_model
from luoshu.gnn.models import GraphSAGE, GraphSAGEConfig
from luoshu.gnn.sampler import NeighborLoader

NODES, DIM, PREFIX = 800, 4, "gnn/"


def train(batch: int, rank: int, world_size: int, client=None, data_parallel: bool = True) -> dict:
    graph = stochastic_block_model(NODES, num_features=8, seed=5)
    ls.manual_seed(1234 + 1000 * rank)  # different per worker on purpose: worker 0's values must win
    model = GraphSAGE(GraphSAGEConfig(8, graph.num_classes, hidden=16, dropout=0.0, num_nodes=NODES, embedding_dim=DIM))
    opt = ls.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if data_parallel:
        dp = ls.parallel.DataParallel(model, opt, mode="hybrid", client=client, prefix=PREFIX, cache_capacity=300)
    else:
        rows = ps.initial_rows(PREFIX + "node_embedding", np.arange(NODES), DIM, ("normal", 0.0, 1.0))
        model.node_embedding.weight.value.copy_(torch.from_numpy(rows))
    loader = NeighborLoader(
        graph,
        [4, 3],
        seeds=graph.train_mask,
        batch_size=batch,
        seed=2,
        drop_last=True,
        rank=rank,
        world_size=world_size,
    )
    for mb in loader:
        x = ls.tensor(torch.index_select(graph.x, 0, mb.input_nodes).numpy())
        y = ls.tensor(torch.index_select(graph.y, 0, mb.seeds).numpy())
        loss = ls.nn.functional.cross_entropy(model(x, mb.blocks, mb.input_nodes.numpy()), y)
        (dp if data_parallel else opt).minimize(loss)
    out = {name: p.numpy() for name, p in model.named_parameters()}
    if data_parallel:
        dp.sync.flush()
        out["table"] = client.pull(PREFIX + "node_embedding", np.arange(NODES))[0]
    else:
        out["table"] = out.pop("node_embedding.weight")
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    ls.distributed.init()  # a server process serves here and exits
    store, _ = ls.distributed.ps_store()
    client = ps.connect(store=store, worker_rank=ls.distributed.rank())
    result = train(args.batch, ls.distributed.rank(), ls.distributed.world_size(), client)
    np.savez(f"{args.out}.rank{ls.distributed.rank()}.npz", **result)
    ls.distributed.barrier()  # every worker is done with the servers: worker 0 stops them
    if ls.distributed.rank() == 0:
        client.shutdown_servers(force=True)
    client.close()
    ls.distributed.shutdown()


if __name__ == "__main__":
    main()
