"""`SparseGraph`: a directed (possibly bipartite) graph with CSR, CSC and COO views and its features.

Edges follow PyTorch Geometric's convention: `edge_index[0]` is the source, `edge_index[1]`
the target, and messages flow source -> target, so a layer aggregates over each target's
incoming edges. The graph stores its edges once, sorted by target (CSR order); the CSC
view (sorted by source) is a permutation of them. Both views are what the operators of
`luoshu.ops.sparse` take (`structure()`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from luoshu.core.errors import Error
from luoshu.core.graph import placeholder
from luoshu.core.tensor import Tensor, make_constant


class GraphInputError(Error, ValueError):
    """A graph, feature matrix, data file or sampler setting that cannot be used (names what was wrong)."""


def _as_torch(value, what: str, dtype=None) -> torch.Tensor:
    if isinstance(value, Tensor):
        value = value.value
    if isinstance(value, torch.Tensor):
        out = value.detach()
    else:
        try:
            out = torch.as_tensor(np.asarray(value))
        except (TypeError, ValueError) as exc:
            raise GraphInputError(f"{what}: cannot make an array from {type(value).__name__}: {exc}") from None
    return out if dtype is None else out.to(dtype)


def _offsets(sorted_keys: torch.Tensor, n: int) -> torch.Tensor:
    out = torch.zeros(n + 1, dtype=torch.int64, device=sorted_keys.device)
    if sorted_keys.numel():
        out[1:] = torch.cumsum(torch.bincount(sorted_keys, minlength=n), 0)
    return out


class SparseGraph:
    """A graph of `num_src_nodes` sources and `num_nodes` targets (equal unless bipartite).

    Build with `SparseGraph(edge_index, num_nodes)`, `from_edges`, `from_scipy` or
    `from_networkx`. Node features `x` (one row per node), labels `y`, per-edge `edge_weight`
    and `edge_attr`, and any masks (`train_mask`, ...) travel with it; per-edge arrays are
    given in the caller's edge order and stored in CSR order.
    """

    def __init__(
        self,
        edge_index,
        num_nodes: int | None = None,
        *,
        edge_weight=None,
        edge_attr=None,
        x=None,
        y=None,
        num_src_nodes: int | None = None,
        **node_data: Any,
    ):
        ei = _as_torch(edge_index, "edge_index")
        if ei.dtype.is_floating_point or ei.dtype == torch.bool:
            raise GraphInputError(f"edge_index must be integers, found {ei.dtype}")
        ei = ei.to(torch.int64)
        if ei.dim() != 2 or ei.shape[0] != 2:
            raise GraphInputError(f"edge_index must have shape (2, num_edges), found {tuple(ei.shape)}")
        if num_nodes is None:
            if x is not None:
                num_nodes = len(x)
            elif ei.numel():
                num_nodes = int(ei.max()) + 1
            else:
                num_nodes = 0
        num_nodes = int(num_nodes)
        num_src = num_nodes if num_src_nodes is None else int(num_src_nodes)
        if num_nodes <= 0 or num_src <= 0:
            raise GraphInputError(f"a graph needs at least one node, found {num_nodes} targets and {num_src} sources")
        src, dst = ei[0], ei[1]
        for name, ids, n in (("source", src, num_src), ("target", dst, num_nodes)):
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n):
                bad = ids[(ids < 0) | (ids >= n)][0]
                raise GraphInputError(
                    f"edge_index holds {name} node {int(bad)}, outside [0, {n}) "
                    f"(edge_index row {0 if name == 'source' else 1})"
                )
        self.num_nodes, self.num_src_nodes = num_nodes, num_src
        # stable sort keeps the caller's order among each target's edges (PyG's order)
        self.perm = torch.argsort(dst, stable=True)
        self.row, self.col = dst[self.perm].contiguous(), src[self.perm].contiguous()
        self.indptr = _offsets(self.row, num_nodes)
        self.t_perm = torch.argsort(self.col, stable=True)
        self.t_index = self.row[self.t_perm].contiguous()
        self.t_indptr = _offsets(self.col[self.t_perm], num_src)
        self.edge_weight = None if edge_weight is None else self._edge_array(edge_weight, "edge_weight", 1)
        self.edge_attr = None if edge_attr is None else self._edge_array(edge_attr, "edge_attr", None)
        self.x = None if x is None else self._node_array(x, "x", num_src)
        self.y = None if y is None else self._node_array(y, "y", num_nodes)
        for name, value in node_data.items():
            setattr(self, name, self._node_array(value, name, num_nodes))
        self._node_keys = tuple(node_data)
        self._structure: dict = {}
        self._cache: dict = {}

    # --- construction ------------------------------------------------------------------
    @classmethod
    def from_edges(cls, edges, num_nodes: int | None = None, **kwargs) -> SparseGraph:
        """From a list (or (E, 2) array) of `(source, target)` pairs."""
        arr = np.asarray(edges, dtype=np.int64).reshape(-1, 2) if len(edges) else np.zeros((0, 2), np.int64)
        return cls(arr.T, num_nodes, **kwargs)

    @classmethod
    def from_scipy(cls, matrix, **kwargs) -> SparseGraph:
        """From a SciPy sparse matrix `A[target, source] = weight` (the matrix `spmm` multiplies by)."""
        coo = matrix.tocoo()
        return cls(
            np.stack([coo.col, coo.row]),
            coo.shape[0],
            num_src_nodes=coo.shape[1],
            edge_weight=coo.data.astype(np.float64 if coo.data.dtype == np.float64 else np.float32),
            **kwargs,
        )

    @classmethod
    def from_networkx(cls, graph, weight: str | None = None, **kwargs) -> SparseGraph:
        """From a networkx graph (nodes relabelled 0..n-1 in `graph.nodes` order); an undirected
        graph gets both directions of every edge. `weight` names an edge attribute to use."""
        ids = {node: i for i, node in enumerate(graph.nodes)}
        pairs, weights = [], []
        for u, v, data in graph.edges(data=True):
            w = float(data.get(weight, 1.0)) if weight else 1.0
            pairs.append((ids[u], ids[v]))
            weights.append(w)
            if not graph.is_directed() and u != v:
                pairs.append((ids[v], ids[u]))
                weights.append(w)
        if weight:
            kwargs.setdefault("edge_weight", np.asarray(weights, np.float32))
        return cls.from_edges(pairs, len(ids), **kwargs)

    def _edge_array(self, value, name: str, ndim: int | None) -> torch.Tensor:
        t = _as_torch(value, name)
        if t.shape[:1] != (self.num_edges,):
            raise GraphInputError(f"{name} must have one row per edge ({self.num_edges}), found shape {tuple(t.shape)}")
        if ndim is not None and t.dim() != ndim:
            raise GraphInputError(f"{name} must be {ndim}-d, found shape {tuple(t.shape)}")
        return t[self.perm].contiguous()

    def _node_array(self, value, name: str, n: int) -> torch.Tensor:
        t = _as_torch(value, name)
        if t.dim() == 0 or t.shape[0] != n:
            raise GraphInputError(f"{name} must have one row per node ({n}), found shape {tuple(t.shape)}")
        return t

    symbolic = False  # a concrete graph (BlockPlaceholders stands for one inside a define-and-run graph)

    # --- views -----------------------------------------------------------------------
    @property
    def num_edges(self) -> int:
        return int(self.row.shape[0])

    @property
    def is_bipartite(self) -> bool:
        return self.num_src_nodes != self.num_nodes

    @property
    def edge_index(self) -> torch.Tensor:
        """COO view `(2, E)`: sources then targets, in CSR order."""
        return torch.stack([self.col, self.row])

    def coo(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`(source, target)` per edge, in CSR order."""
        return self.col, self.row

    def csr(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`(indptr, source)`: each target's incoming edges."""
        return self.indptr, self.col

    def csc(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(indptr, target, edge id)`: each source's outgoing edges, in source order."""
        return self.t_indptr, self.t_index, self.t_perm

    def weights(self, dtype=torch.float32) -> torch.Tensor:
        """The edge weights in CSR order (ones when the graph has none)."""
        if self.edge_weight is None:
            return torch.ones(self.num_edges, dtype=dtype)
        return self.edge_weight.to(dtype)

    def in_degree(self, weighted: bool = False) -> torch.Tensor:
        """Incoming edges per target node (the sum of their weights when `weighted`)."""
        if weighted:
            w = self.weights(torch.float64 if self.edge_weight is None else self.edge_weight.dtype)
            return torch.zeros(self.num_nodes, dtype=w.dtype).index_add_(0, self.row, w)
        return self.indptr.diff()

    def out_degree(self) -> torch.Tensor:
        return self.t_indptr.diff()

    def to_scipy(self):
        """The (num_nodes, num_src_nodes) SciPy CSR matrix `A[target, source] = weight`."""
        import scipy.sparse as sp

        return sp.csr_matrix(
            (self.weights(torch.float64).numpy(), self.col.numpy(), self.indptr.numpy()),
            shape=(self.num_nodes, self.num_src_nodes),
        )

    def structure(self, device: str | None = None) -> tuple[Tensor, ...]:
        """The six index tensors the sparse operators take (constants, cached per device)."""
        key = str(device or "cpu")
        if key not in self._structure:
            self._structure[key] = tuple(
                make_constant(t, device=device)
                for t in (self.row, self.col, self.indptr, self.t_indptr, self.t_index, self.t_perm)
            )
        return self._structure[key]

    def cached(self, key, build):
        """`build()`, computed once per graph and `key` (layers keep derived graphs and
        normalised edge weights here; the graph's edges never change after construction)."""
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    # --- transforms --------------------------------------------------------------------
    def _rebuild(self, edge_index, edge_weight=None, edge_attr=None) -> SparseGraph:
        extra = {k: getattr(self, k) for k in self._node_keys}
        return SparseGraph(
            edge_index,
            self.num_nodes,
            edge_weight=edge_weight,
            edge_attr=edge_attr,
            x=self.x,
            y=self.y,
            num_src_nodes=self.num_src_nodes,
            **extra,
        )

    def add_self_loops(self, fill_value: float = 1.0) -> SparseGraph:
        """A copy with an edge `i -> i` added for every node (after the existing edges, as PyG does)."""
        if self.is_bipartite:
            raise GraphInputError(
                f"self-loops need a square graph, found {self.num_src_nodes} sources and {self.num_nodes} targets"
            )
        loops = torch.arange(self.num_nodes)
        ei = torch.cat([self.edge_index, torch.stack([loops, loops])], 1)
        w = None
        if self.edge_weight is not None:
            w = torch.cat([self.edge_weight, torch.full((self.num_nodes,), fill_value, dtype=self.edge_weight.dtype)])
        if self.edge_attr is not None:
            raise GraphInputError("add_self_loops cannot invent edge_attr rows for the new loops")
        return self._rebuild(ei, w)

    def add_remaining_self_loops(self, fill_value: float = 1.0) -> SparseGraph:
        """A copy with a loop `i -> i` of weight `fill_value` for every node that has none;
        existing loops keep their weights (PyG's add_remaining_self_loops)."""
        if self.is_bipartite:
            raise GraphInputError(
                f"self-loops need a square graph, found {self.num_src_nodes} sources and {self.num_nodes} targets"
            )
        loop = self.row == self.col
        w = self.weights(torch.float64 if self.edge_weight is None else self.edge_weight.dtype)
        fill = torch.full((self.num_nodes,), fill_value, dtype=w.dtype)
        fill[self.row[loop]] = w[loop]
        ei = torch.cat([self.edge_index[:, ~loop], torch.stack([torch.arange(self.num_nodes)] * 2)], 1)
        return self._rebuild(ei, torch.cat([w[~loop], fill]))

    def remove_self_loops(self) -> SparseGraph:
        keep = self.row != self.col
        w = None if self.edge_weight is None else self.edge_weight[keep]
        a = None if self.edge_attr is None else self.edge_attr[keep]
        return self._rebuild(self.edge_index[:, keep], w, a)

    def gcn_norm(
        self, add_self_loops: bool = True, fill_value: float = 1.0, dtype=torch.float32
    ) -> tuple[SparseGraph, torch.Tensor]:
        """Symmetric normalisation `D^-1/2 (A + I) D^-1/2`: the graph with its remaining
        self-loops added (or `self`) and its per-edge weights in CSR order, D being the
        weighted in-degree (PyG's gcn_norm)."""
        g = self.add_remaining_self_loops(fill_value) if add_self_loops else self
        w = g.weights(dtype)
        deg = torch.zeros(g.num_nodes, dtype=dtype).index_add_(0, g.row, w)
        inv = deg.pow(-0.5)
        inv[torch.isinf(inv)] = 0.0
        return g, inv[g.col] * w * inv[g.row]

    def __repr__(self) -> str:
        nodes = (
            f"num_nodes={self.num_nodes}"
            if not self.is_bipartite
            else f"num_src_nodes={self.num_src_nodes}, num_dst_nodes={self.num_nodes}"
        )
        feats = "" if self.x is None else f", x={tuple(self.x.shape)}"
        return f"SparseGraph({nodes}, num_edges={self.num_edges}{feats})"


def batch_graphs(graphs: list[SparseGraph]) -> SparseGraph:
    """One block-diagonal graph of several (for graph classification): node ids offset per
    graph, node features and node labels concatenated, `batch[i]` the graph of node i and
    `num_graphs` set (graph-level labels stay with the caller)."""
    if not graphs:
        raise GraphInputError("batch_graphs needs at least one graph, found none")
    offsets = np.cumsum([0] + [g.num_nodes for g in graphs])
    for i, g in enumerate(graphs):
        if g.is_bipartite:
            raise GraphInputError(f"batch_graphs: graph {i} is bipartite")
        if (g.x is None) != (graphs[0].x is None):
            raise GraphInputError(
                f"batch_graphs: graph {i} {'lacks' if g.x is None else 'has'} node features x unlike graph 0"
            )
    ei = torch.cat([g.edge_index + int(o) for g, o in zip(graphs, offsets)], 1)
    x = None if graphs[0].x is None else torch.cat([g.x for g in graphs])
    batch = torch.repeat_interleave(torch.arange(len(graphs)), torch.tensor([g.num_nodes for g in graphs]))
    weights = None
    if any(g.edge_weight is not None for g in graphs):
        weights = torch.cat([g.weights(torch.float32) for g in graphs])
    y = torch.cat([g.y for g in graphs]) if all(g.y is not None for g in graphs) else None
    out = SparseGraph(ei, int(offsets[-1]), x=x, y=y, edge_weight=weights, batch=batch)
    out.num_graphs = len(graphs)
    return out


def with_target_loops(graph: SparseGraph) -> SparseGraph:
    """`graph` without its self-loops plus a loop `i -> i` for each of the first
    min(num_src_nodes, num_nodes) nodes (GATConv's loops, as PyG adds them; a sampled
    block lists its targets first among its sources). Kept with the graph."""

    def build():
        plain = graph.row != graph.col
        loops = torch.arange(min(graph.num_nodes, graph.num_src_nodes))
        ei = torch.cat([graph.edge_index[:, plain], torch.stack([loops, loops])], 1)
        return SparseGraph(ei, graph.num_nodes, num_src_nodes=graph.num_src_nodes)

    return graph.cached(("target_loops",), build)


_STRUCTURE = ("row", "col", "indptr", "t_indptr", "t_index", "t_perm")


class BlockPlaceholders:
    """Stands for a sampled block inside `with luoshu.Graph():`: placeholders for its six
    structure arrays (lengths known only at run time); `feed(block)` maps them to a block's
    arrays. With `self_loops=True` it carries the block with GATConv's loops added (what a
    GATConv with add_self_loops needs). SAGEConv and GATConv take it where they take a block.
    """

    symbolic = True
    is_bipartite = True
    num_nodes = num_src_nodes = None

    def __init__(self, name: str = "block", self_loops: bool = False, device: str = "cpu"):
        self.self_loops = self_loops
        self._tensors = tuple(placeholder(f"{name}.{key}", (None,), "int64", device) for key in _STRUCTURE)

    def structure(self, device: str | None = None) -> tuple[Tensor, ...]:
        return self._tensors

    def feed(self, block: SparseGraph) -> dict:
        if not isinstance(block, SparseGraph):
            raise GraphInputError(f"BlockPlaceholders.feed takes a SparseGraph block, found {type(block).__name__}")
        g = with_target_loops(block) if self.self_loops else block
        return {t: getattr(g, key).numpy() for t, key in zip(self._tensors, _STRUCTURE)}
