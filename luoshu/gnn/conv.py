"""Graph convolution layers: `GCNConv`, `SAGEConv` and `GATConv`, under PyTorch Geometric's
argument names, parameter names and parameter shapes (weights copy across one to one).

Each layer is called as `layer(x, graph)`, where `graph` is a `SparseGraph` (a full graph
or a sampled bipartite block) and `x` the source-node features, or a pair `(x_src, x_dst)`.
For a block given a single `x`, the target nodes are its first `graph.num_nodes` rows, the
sampler's layout.
"""

from __future__ import annotations

import math

import torch

from luoshu import ops
from luoshu.core.errors import Error
from luoshu.core.tensor import make_constant
from luoshu.gnn.graph import BlockPlaceholders, SparseGraph, with_target_loops
from luoshu.nn import functional as F
from luoshu.nn import init
from luoshu.nn.layers import Linear, empty_parameter
from luoshu.nn.module import Module


def _pair(x, graph, layer: str):
    if not isinstance(graph, (SparseGraph, BlockPlaceholders)):
        raise Error(f"{layer}: graph must be a luoshu.gnn.SparseGraph, found {type(graph).__name__}")
    if isinstance(x, (tuple, list)):
        x_src, x_dst = x
    elif graph.symbolic:  # the targets lead the sources; their count is known at run time
        x_src, x_dst = x, ops.target_rows(x, graph.structure()[2])
    else:
        x_src = x
        x_dst = x if not graph.is_bipartite else x[: graph.num_nodes]
    if not graph.symbolic and x_src.shape[0] is not None and x_src.shape[0] != graph.num_src_nodes:
        raise Error(f"{layer}: x has {x_src.shape[0]} rows but the graph has {graph.num_src_nodes} source nodes")
    return x_src, x_dst


def _check_channels(layer: str, **sizes) -> None:
    for name, value in sizes.items():
        if not isinstance(value, int) or value <= 0:
            raise Error(f"{layer}: {name} must be a positive int, found {value!r}")


def _edge_constant(graph: SparseGraph, key, build, x):
    """A per-edge weight vector derived from the graph, as a constant of x's dtype and device."""
    return graph.cached((key, x.dtype, x.device), lambda: make_constant(build(), dtype=x.dtype, device=x.device))


def _normalize(x, eps: float = 1e-12):
    """`x / max(||x||_2, eps)` per row (torch.nn.functional.normalize)."""
    return x / ops.maximum(ops.norm(x, axis=-1, keepdims=True), eps)


class GCNConv(Module):
    """Kipf & Welling's graph convolution `D^-1/2 (A + I) D^-1/2 X W + b` (PyG's GCNConv).

    Parameters: `lin.weight` (out_channels, in_channels), `bias` (out_channels,). The
    normalised graph is computed once per graph and kept with it (PyG's `cached=True`,
    which is always right here: a SparseGraph never changes).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        improved: bool = False,
        cached: bool = False,
        add_self_loops: bool = True,
        normalize: bool = True,
        bias: bool = True,
        dtype="float32",
        device=None,
    ):
        super().__init__()
        _check_channels("GCNConv", in_channels=in_channels, out_channels=out_channels)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.improved, self.add_self_loops, self.normalize = improved, add_self_loops, normalize
        self.lin = Linear(in_channels, out_channels, bias=False, dtype=dtype, device=device)
        init.xavier_uniform_(self.lin.weight)
        if bias:
            self.bias = empty_parameter((out_channels,), dtype, device)
            init.zeros_(self.bias)
        else:
            self.register_parameter("bias", None)

    def _propagation_graph(self, graph: SparseGraph, x):
        if graph.is_bipartite:
            raise Error(
                f"GCNConv needs a square graph, found a block of {graph.num_src_nodes} sources and "
                f"{graph.num_nodes} targets; use SAGEConv or GATConv for sampled blocks"
            )
        key = ("gcn", self.improved, self.add_self_loops, self.normalize)

        def build():
            if self.normalize:
                return graph.gcn_norm(self.add_self_loops, 2.0 if self.improved else 1.0, torch.float64)
            g = graph.add_remaining_self_loops() if self.add_self_loops else graph
            return g, g.weights(torch.float64)

        g, weights = graph.cached(key, build)
        return g, _edge_constant(graph, key, lambda: weights, x)

    def forward(self, x, graph: SparseGraph):
        if getattr(graph, "symbolic", False):
            raise Error("GCNConv trains on the full graph; it takes no BlockPlaceholders")
        _pair(x, graph, "GCNConv")
        g, weight = self._propagation_graph(graph, x)
        out = ops.spmm(g.structure(x.device), weight, F.linear(x, self.lin.weight))
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}"


_SAGE_AGGREGATORS = ("mean", "sum", "add", "max")


class SAGEConv(Module):
    """GraphSAGE: `lin_l(aggregate(x_j for j -> i)) + lin_r(x_i)` (PyG's SAGEConv).

    `aggr` is "mean", "sum" or "max"; with `project=True` the neighbours first pass through
    `relu(lin(x_j))`, which with `aggr="max"` is the paper's max-pooling aggregator.
    Parameters: `lin_l.weight` (out, in_src), `lin_l.bias` (out,), `lin_r.weight` (out, in_dst),
    and `lin.weight` / `lin.bias` (in_src, in_src) with `project`.
    """

    def __init__(
        self,
        in_channels: int | tuple[int, int],
        out_channels: int,
        aggr: str = "mean",
        normalize: bool = False,
        root_weight: bool = True,
        project: bool = False,
        bias: bool = True,
        dtype="float32",
        device=None,
    ):
        super().__init__()
        in_src, in_dst = (in_channels, in_channels) if isinstance(in_channels, int) else tuple(in_channels)
        _check_channels("SAGEConv", in_channels=in_src, out_channels=out_channels)
        _check_channels("SAGEConv", in_channels=in_dst)
        if aggr not in _SAGE_AGGREGATORS:
            raise Error(f"SAGEConv: aggr must be one of {_SAGE_AGGREGATORS}, found {aggr!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.aggr = "sum" if aggr == "add" else aggr
        self.normalize, self.root_weight, self.project = normalize, root_weight, project
        if project:
            self.lin = Linear(in_src, in_src, bias=True, dtype=dtype, device=device)
        self.lin_l = Linear(in_src, out_channels, bias=bias, dtype=dtype, device=device)
        if root_weight:
            self.lin_r = Linear(in_dst, out_channels, bias=False, dtype=dtype, device=device)

    def forward(self, x, graph: SparseGraph):
        x_src, x_dst = _pair(x, graph, "SAGEConv")
        if self.project:
            x_src = F.relu(self.lin(x_src))
        structure = graph.structure(x_src.device)
        # mean and sum commute with lin_l: aggregating lin_l's output instead of its input moves
        # fewer columns through the sparse product when the layer narrows (DGL's lin_before_mp;
        # PyG always aggregates first). The bias is added after, so a node without neighbours
        # still gets lin_l's bias alone.
        width = x_src.shape[-1]
        linear_first = self.aggr != "max" and width is not None and self.out_channels < width
        h = F.linear(x_src, self.lin_l.weight) if linear_first else x_src
        if self.aggr == "max" or graph.symbolic:
            # per-edge messages, then each target's reduction (0 where a node has no neighbour);
            # a symbolic block has no degrees to fold into spmm's edge weights ahead of time
            messages = ops.gather_edges(h, structure[1])
            out = ops.scatter_reduce(messages, structure[0], self.aggr, indptr=structure[2])
        else:

            def weights():
                if self.aggr == "sum":
                    return torch.ones(graph.num_edges, dtype=torch.float64)
                deg = graph.in_degree().to(torch.float64)
                return (1.0 / deg.clamp(min=1.0))[graph.row]

            out = ops.spmm(structure, _edge_constant(graph, ("sage", self.aggr), weights, h), h)
        if not linear_first:
            out = self.lin_l(out)
        elif self.lin_l.bias is not None:
            out = out + self.lin_l.bias
        if self.root_weight:
            out = out + self.lin_r(x_dst)
        return _normalize(out) if self.normalize else out

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, aggr={self.aggr}"


class GATConv(Module):
    """Graph attention (Velickovic et al.), multi-head, PyG's GATConv.

    `alpha_ij = softmax_j(leaky_relu(a_src . W x_j + a_dst . W x_i))` over each target's
    incoming edges (self-loops added), dropped out with probability `dropout` while training;
    heads concatenated (`concat=True`) or averaged. Parameters: `lin.weight`
    (heads * out_channels, in_channels), `att_src` and `att_dst` (1, heads, out_channels),
    `bias` (heads * out_channels if concat else out_channels).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        heads: int = 1,
        concat: bool = True,
        negative_slope: float = 0.2,
        dropout: float = 0.0,
        add_self_loops: bool = True,
        bias: bool = True,
        dtype="float32",
        device=None,
    ):
        super().__init__()
        _check_channels("GATConv", in_channels=in_channels, out_channels=out_channels, heads=heads)
        if not 0.0 <= dropout < 1.0:
            raise Error(f"GATConv: dropout must be in [0, 1), found {dropout}")
        self.in_channels, self.out_channels, self.heads = in_channels, out_channels, heads
        self.concat, self.negative_slope, self.dropout = concat, negative_slope, dropout
        self.add_self_loops = add_self_loops
        self.lin = Linear(in_channels, heads * out_channels, bias=False, dtype=dtype, device=device)
        init.xavier_uniform_(self.lin.weight)
        self.att_src = empty_parameter((1, heads, out_channels), dtype, device)
        self.att_dst = empty_parameter((1, heads, out_channels), dtype, device)
        # glorot over the (heads, out_channels) slices, as PyG initialises them
        bound = math.sqrt(6.0 / (heads + out_channels))
        init.uniform_(self.att_src, -bound, bound)
        init.uniform_(self.att_dst, -bound, bound)
        if bias:
            self.bias = empty_parameter((heads * out_channels if concat else out_channels,), dtype, device)
            init.zeros_(self.bias)
        else:
            self.register_parameter("bias", None)

    def _attention_graph(self, graph):
        if graph.symbolic:
            if self.add_self_loops != graph.self_loops:
                raise Error(
                    f"GATConv(add_self_loops={self.add_self_loops}) needs BlockPlaceholders(self_loops="
                    f"{self.add_self_loops}), found self_loops={graph.self_loops}"
                )
            return graph
        return with_target_loops(graph) if self.add_self_loops else graph

    def forward(self, x, graph: SparseGraph):
        x_src, x_dst = _pair(x, graph, "GATConv")
        heads, channels = self.heads, self.out_channels
        h_src = F.linear(x_src, self.lin.weight).reshape((-1, heads, channels))
        h_dst = h_src if x_dst is x_src else F.linear(x_dst, self.lin.weight).reshape((-1, heads, channels))
        score_src = (h_src * self.att_src).sum(axis=-1)
        score_dst = (h_dst * self.att_dst).sum(axis=-1)
        g = self._attention_graph(graph)
        structure = g.structure(x_src.device)
        row, col, indptr = structure[0], structure[1], structure[2]
        alpha = ops.gather_edges(score_src, col) + ops.gather_edges(score_dst, row)
        alpha = F.leaky_relu(alpha, self.negative_slope)
        alpha = ops.segment_softmax(alpha, row, indptr=indptr)
        alpha = F.dropout(alpha, self.dropout, self.training)
        out = ops.spmm(structure, alpha, h_src)  # one sparse matrix per head
        out = out.reshape((-1, heads * channels)) if self.concat else out.mean(axis=1)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, heads={self.heads}"
