"""Graph neural networks: `SparseGraph`, graph convolution layers, global pooling,
neighbour sampling and graph data sets."""

from luoshu.gnn.conv import GATConv, GCNConv, SAGEConv
from luoshu.gnn.graph import BlockPlaceholders, GraphInputError, SparseGraph, batch_graphs
from luoshu.gnn.pool import global_add_pool, global_max_pool, global_mean_pool

__all__ = [
    "BlockPlaceholders",
    "GATConv",
    "GCNConv",
    "GraphInputError",
    "SAGEConv",
    "SparseGraph",
    "batch_graphs",
    "global_add_pool",
    "global_max_pool",
    "global_mean_pool",
]
