"""The HET path for graphs: per-node embedding tables on `luoshu.ps`, read through the
worker cache, as the HET paper trains GraphSAGE on graphs whose nodes have no (or too
large) features to hold on every worker.

`PSNodeEmbedding` owns the table; `HETGraphSAGE` feeds `[features, embedding]` of a
mini-batch's input nodes into GraphSAGE. A step is `loss.backward(); opt.step();
model.push_gradients()`: dense weights update locally (or through DataParallel), the
touched embedding rows go to the servers as sparse gradients.
"""

from __future__ import annotations

from luoshu import ops
from luoshu.core.errors import Error
from luoshu.core.tensor import Tensor, make_constant
from luoshu.gnn.models import GraphSAGE, GraphSAGEConfig
from luoshu.nn.module import Module
from luoshu.ps.embedding import PSEmbedding


class PSNodeEmbedding(Module):
    """One `embedding_dim` row per node of a `num_nodes` graph, on the parameter servers
    (server-side `optimizer`, `cache_capacity` rows cached under `staleness`)."""

    def __init__(
        self,
        client,
        num_nodes: int,
        embedding_dim: int,
        table: str = "gnn_node_embedding",
        *,
        optimizer=("sgd", {"lr": 0.01}),
        init=("normal", 0.0, 0.1),
        cache_capacity: int = 0,
        staleness: int = 0,
        scale: float = 1.0,
        seed: int = 0,
    ):
        super().__init__()
        self.embedding = PSEmbedding(
            client,
            table,
            embedding_dim,
            num_embeddings=num_nodes,
            init=init,
            optimizer=optimizer,
            id_policy="refuse",
            cache_capacity=cache_capacity,
            staleness=staleness,
            scale=scale,
            seed=seed,
        )

    def forward(self, node_ids):
        if not isinstance(node_ids, Tensor):
            node_ids = make_constant(node_ids, dtype="int64")
        return self.embedding(node_ids)

    def prefetch(self, node_ids) -> None:
        self.embedding.prefetch(node_ids)

    def push_gradients(self) -> None:
        self.embedding.push_gradients()


class HETGraphSAGE(Module):
    """GraphSAGE over `[x, embedding(node)]` (or the embedding alone when `in_features` is 0)."""

    def __init__(self, client, num_nodes: int, config: GraphSAGEConfig, embedding_dim: int, **table_options):
        super().__init__()
        if config.in_features < embedding_dim:
            raise Error(
                f"HETGraphSAGE: config.in_features ({config.in_features}) must count the node features "
                f"plus the {embedding_dim} embedding columns"
            )
        self.feature_dim = config.in_features - embedding_dim
        self.nodes = PSNodeEmbedding(client, num_nodes, embedding_dim, **table_options)
        self.sage = GraphSAGE(config)

    def forward(self, x, graph, node_ids):
        """`x`: the features of `node_ids` (None when feature_dim is 0); `graph`: a SparseGraph
        or a MiniBatch's blocks; `node_ids`: the global ids of the input nodes."""
        h = self.nodes(node_ids)
        if self.feature_dim:
            h = ops.concat([x, h], axis=1)
        return self.sage(h, graph)

    def push_gradients(self) -> None:
        self.nodes.push_gradients()
