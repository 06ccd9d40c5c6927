"""The HET path: node embeddings on the parameter servers, read through the worker cache,
give exactly the training of the same model with a local embedding table (staleness 0)."""

from __future__ import annotations

import numpy as np
import pytest

import luoshu as ls
from luoshu.gnn.datasets import stochastic_block_model
from luoshu.gnn.het import HETGraphSAGE
from luoshu.gnn.models import GraphSAGE, GraphSAGEConfig
from luoshu.gnn.sampler import NeighborLoader

ps = pytest.importorskip("luoshu.ps")


def test_ps_node_embeddings_match_a_local_table():
    graph = stochastic_block_model(400, num_features=4, seed=2)
    dim, lr = 6, 0.1
    config = GraphSAGEConfig(4 + dim, graph.num_classes, hidden=8, dropout=0.0)
    with ps.start_local_servers(2, in_process=True) as servers:
        client = ps.connect(addresses=servers)
        ls.manual_seed(0)
        het = HETGraphSAGE(
            client, graph.num_nodes, config, dim, optimizer=("sgd", {"lr": lr}), cache_capacity=128, staleness=0
        )
        ls.manual_seed(0)
        local = GraphSAGE(config)
        table = ls.nn.Parameter(
            ps.initial_rows("gnn_node_embedding", np.arange(graph.num_nodes), dim, init=("normal", 0.0, 0.1))
        )
        for (_, a), (_, b) in zip(het.sage.named_parameters(), local.named_parameters()):
            b.value.copy_(a.value)
        het_opt = ls.optim.SGD(het.sage.parameters(), lr=lr)
        local_opt = ls.optim.SGD(local.parameters() + [table], lr=lr)
        loader = NeighborLoader(graph, [4, 4], seeds=graph.train_mask, batch_size=64, seed=1)
        losses = []
        for mb in loader:
            x = ls.tensor(graph.x[mb.input_nodes].numpy())
            y = ls.tensor(graph.y[mb.seeds].numpy())
            loss = ls.nn.functional.cross_entropy(het(x, mb.blocks, mb.input_nodes.numpy()), y)
            het_opt.zero_grad()
            loss.backward()
            het_opt.step()
            het.push_gradients()

            h = ls.ops.concat([x, ls.ops.index_select(table, 0, ls.tensor(mb.input_nodes.numpy()))], axis=1)
            ref = ls.nn.functional.cross_entropy(local(h, mb.blocks), y)
            local_opt.zero_grad()
            ref.backward()
            local_opt.step()
            np.testing.assert_allclose(loss.numpy(), ref.numpy(), rtol=1e-5, atol=1e-6)
            losses.append(float(loss.numpy()))
        rows, _ = client.pull("gnn_node_embedding", np.arange(graph.num_nodes))
        np.testing.assert_allclose(rows, table.numpy(), rtol=1e-4, atol=1e-6)
        assert losses[-1] < losses[0]
        client.close()
