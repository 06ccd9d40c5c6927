"""Node-classification models of the zoo: `GCN`, `GraphSAGE` and `GAT` with their configs.

Each model's `forward(x, graph)` takes node features and either one `SparseGraph` (full-graph
training: every layer on the whole graph) or the list of sampled blocks of a `MiniBatch`
(one block per layer, outermost first), and returns (nodes, num_classes) logits for the
graph's nodes or the batch's seeds.
"""

from __future__ import annotations

from dataclasses import dataclass

from luoshu import ops
from luoshu.core.errors import Error
from luoshu.core.tensor import Tensor, make_constant
from luoshu.gnn.conv import GATConv, GCNConv, SAGEConv
from luoshu.gnn.graph import GraphInputError, SparseGraph
from luoshu.nn import functional as F
from luoshu.nn.container import ModuleList
from luoshu.nn.layers import Embedding
from luoshu.nn.module import Module


def _check_config(name: str, in_features: int, num_classes: int, hidden: int, num_layers: int, dropout: float):
    for field, value in (
        ("in_features", in_features),
        ("num_classes", num_classes),
        ("hidden", hidden),
        ("num_layers", num_layers),
    ):
        if not isinstance(value, int) or value < 1:
            raise Error(f"{name}: {field} must be a positive int, found {value!r}")
    if not 0.0 <= dropout < 1.0:
        raise Error(f"{name}: dropout must be in [0, 1), found {dropout}")


def _per_layer(model: str, graph, num_layers: int) -> list[SparseGraph]:
    if isinstance(graph, SparseGraph):
        return [graph] * num_layers
    blocks = list(getattr(graph, "blocks", graph))
    if len(blocks) != num_layers:
        raise GraphInputError(
            f"{model} has {num_layers} layers but was given {len(blocks)} blocks; sample with one fan-out per layer"
        )
    return blocks


@dataclass
class GCNConfig:
    in_features: int
    num_classes: int
    hidden: int = 16
    num_layers: int = 2
    dropout: float = 0.5

    def __post_init__(self):
        _check_config("GCNConfig", self.in_features, self.num_classes, self.hidden, self.num_layers, self.dropout)


@dataclass
class GraphSAGEConfig:
    in_features: int
    num_classes: int
    hidden: int = 64
    num_layers: int = 2
    aggr: str = "mean"
    project: bool = False  # with aggr="max": the paper's max-pooling aggregator
    dropout: float = 0.5
    # a learnable embedding per node, appended to its features (in_features counts only the
    # features); under DataParallel(mode="ps" | "hybrid") the table lives on the servers (HET)
    num_nodes: int = 0
    embedding_dim: int = 0

    def __post_init__(self):
        _check_config("GraphSAGEConfig", self.in_features, self.num_classes, self.hidden, self.num_layers, self.dropout)
        if (self.embedding_dim > 0) != (self.num_nodes > 0) or self.embedding_dim < 0 or self.num_nodes < 0:
            raise Error(
                f"GraphSAGEConfig: a node embedding needs both num_nodes and embedding_dim positive, "
                f"found num_nodes={self.num_nodes}, embedding_dim={self.embedding_dim}"
            )


@dataclass
class GATConfig:
    in_features: int
    num_classes: int
    hidden: int = 8
    heads: int = 8
    num_layers: int = 2
    dropout: float = 0.6

    def __post_init__(self):
        _check_config("GATConfig", self.in_features, self.num_classes, self.hidden, self.num_layers, self.dropout)


class _NodeClassifier(Module):
    def forward(self, x, graph):
        graphs = _per_layer(type(self).__name__, graph, len(self.convs))
        for i, (conv, g) in enumerate(zip(self.convs, graphs)):
            x = F.dropout(x, self.config.dropout, self.training)
            x = conv(x, g)
            if i < len(self.convs) - 1:
                x = self.activation(x)
        return x

    def activation(self, x):
        return F.relu(x)


class GCN(_NodeClassifier):
    """Kipf & Welling's GCN: `num_layers` GCNConv layers, ReLU and dropout between them."""

    def __init__(self, config: GCNConfig):
        super().__init__()
        self.config = config
        sizes = [config.in_features] + [config.hidden] * (config.num_layers - 1) + [config.num_classes]
        self.convs = ModuleList([GCNConv(a, b) for a, b in zip(sizes[:-1], sizes[1:])])

    def forward(self, x, graph):
        if not isinstance(graph, SparseGraph):
            raise GraphInputError(
                "GCN trains on the full graph (GCNConv has no bipartite form); use graphsage or "
                "gat for sampled mini-batches"
            )
        return super().forward(x, graph)


class GraphSAGE(_NodeClassifier):
    """Hamilton et al.'s GraphSAGE: `num_layers` SAGEConv layers (mean, sum or max[-pool]).

    With `embedding_dim`, `forward(x, graph, node_ids)` appends each input node's learnable
    embedding (`node_embedding`, an `nn.Embedding` of `num_nodes` rows) to its features.
    """

    def __init__(self, config: GraphSAGEConfig):
        super().__init__()
        self.config = config
        width = config.in_features + config.embedding_dim
        sizes = [width] + [config.hidden] * (config.num_layers - 1) + [config.num_classes]
        if config.embedding_dim:
            self.node_embedding = Embedding(config.num_nodes, config.embedding_dim)
        self.convs = ModuleList(
            [SAGEConv(a, b, aggr=config.aggr, project=config.project) for a, b in zip(sizes[:-1], sizes[1:])]
        )

    def forward(self, x, graph, node_ids=None):
        if self.config.embedding_dim:
            if node_ids is None:
                raise GraphInputError("GraphSAGE with a node embedding needs node_ids (the input nodes' global ids)")
            if not isinstance(node_ids, Tensor):
                node_ids = make_constant(node_ids, dtype="int64")
            x = ops.concat([x, self.node_embedding(node_ids)], axis=1)
        return super().forward(x, graph)


class GAT(_NodeClassifier):
    """Velickovic et al.'s GAT: multi-head GATConv layers (heads concatenated, one averaged
    output head), ELU between them, dropout on inputs and attention."""

    def __init__(self, config: GATConfig):
        super().__init__()
        self.config = config
        convs, width = [], config.in_features
        for _ in range(config.num_layers - 1):
            convs.append(GATConv(width, config.hidden, heads=config.heads, dropout=config.dropout))
            width = config.hidden * config.heads
        convs.append(GATConv(width, config.num_classes, heads=1, concat=False, dropout=config.dropout))
        self.convs = ModuleList(convs)

    def activation(self, x):
        return F.elu(x)
