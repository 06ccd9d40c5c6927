"""Graph data sets that work offline: Zachary's karate club, a seeded stochastic-block-model
generator, and readers for an edge list plus node file (Cora's `.cites`/`.content`) and an
OGB-style directory (`edge_index` / `node_feat` / `node_label` arrays with a split).

Every loader returns a `SparseGraph` with `x`, `y` and boolean `train_mask`, `val_mask`
and `test_mask` (one entry per node), and `num_classes` set.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from luoshu.gnn.graph import GraphInputError, SparseGraph


def _masks(n: int, train: np.ndarray, val: np.ndarray, test: np.ndarray) -> dict:
    out = {}
    for name, ids in (("train_mask", train), ("val_mask", val), ("test_mask", test)):
        mask = np.zeros(n, dtype=bool)
        mask[ids] = True
        out[name] = mask
    return out


def _random_split(n: int, rng: np.random.Generator, fractions: tuple[float, float]) -> dict:
    if not (0 < fractions[0] and 0 <= fractions[1] and sum(fractions) < 1):
        raise GraphInputError(f"split fractions (train, val) must be positive and sum below 1, found {fractions}")
    order = rng.permutation(n)
    a, b = int(round(fractions[0] * n)), int(round((fractions[0] + fractions[1]) * n))
    return _masks(n, order[:a], order[a:b], order[b:])


def _finish(graph: SparseGraph) -> SparseGraph:
    graph.num_classes = int(graph.y.max()) + 1
    return graph


def karate_club() -> SparseGraph:
    """Zachary's karate club (34 members, 78 friendships, both directions), labelled with
    the two factions it split into (0: Mr. Hi's, 1: the Officer's).

    Features are the identity (one-hot node ids), the featureless setting of Kipf &
    Welling's GCN demonstration. The semi-supervised split labels only the two leaders
    (node 0 and node 33) for training; every other member is a test node (val = test)."""
    import networkx as nx

    g = nx.karate_club_graph()
    y = np.array([0 if g.nodes[v]["club"] == "Mr. Hi" else 1 for v in g.nodes], dtype=np.int64)
    rest = np.setdiff1d(np.arange(34), [0, 33])
    masks = _masks(34, np.array([0, 33]), rest, rest)
    return _finish(SparseGraph.from_networkx(g, x=np.eye(34, dtype=np.float32), y=y, **masks))


def stochastic_block_model(
    num_nodes: int = 10_000,
    num_classes: int = 5,
    avg_degree: float = 10.0,
    p_intra: float = 0.5,
    num_features: int = 16,
    feature_noise: float = 3.0,
    split: tuple[float, float] = (0.6, 0.2),
    seed: int = 0,
) -> SparseGraph:
    """A seeded stochastic-block-model graph of any size, with class-correlated features.

    Each node gets a class uniformly at random. `num_nodes * avg_degree / 2` undirected
    edges are drawn: a uniform random endpoint, and with probability `p_intra` a second
    endpoint of the same class, else one of any class; both directions are stored (so the
    mean degree is `avg_degree`). Features are the class's random centre (N(0, 1) per
    feature) plus N(0, feature_noise^2) noise, so neither the graph nor the features alone
    determine the label. Masks: a random `split` = (train, val) fraction, the rest test.
    Vectorised: about a second per million edges.
    """
    if num_nodes < num_classes or num_classes < 2:
        raise GraphInputError(
            f"an SBM needs num_classes >= 2 and num_nodes >= num_classes, found "
            f"{num_nodes} nodes and {num_classes} classes"
        )
    if not 0.0 <= p_intra <= 1.0 or avg_degree <= 0 or num_features < 1:
        raise GraphInputError(
            f"an SBM needs 0 <= p_intra <= 1, avg_degree > 0 and num_features >= 1, found "
            f"p_intra={p_intra}, avg_degree={avg_degree}, num_features={num_features}"
        )
    rng = np.random.default_rng(seed)
    y = rng.integers(0, num_classes, num_nodes)
    by_class = np.argsort(y, kind="stable")
    sizes = np.bincount(y, minlength=num_classes)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    m = int(num_nodes * avg_degree / 2)
    src = rng.integers(0, num_nodes, m)
    same = rng.random(m) < p_intra
    c = y[src]
    intra = by_class[starts[c] + (rng.random(m) * sizes[c]).astype(np.int64)]
    dst = np.where(same, intra, rng.integers(0, num_nodes, m))
    edge_index = np.concatenate([np.stack([src, dst]), np.stack([dst, src])], 1)
    centres = rng.standard_normal((num_classes, num_features))
    x = (centres[y] + feature_noise * rng.standard_normal((num_nodes, num_features))).astype(np.float32)
    masks = _random_split(num_nodes, rng, split)
    return _finish(SparseGraph(edge_index, num_nodes, x=x, y=y, **masks))


def _open_lines(path: Path):
    if not path.is_file():
        raise GraphInputError(f"graph file {path} does not exist")
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if line and not line.startswith(("#", "%")):
                yield number, line.replace(",", " ").split()


def read_edge_list(
    edges: str | os.PathLike,
    nodes: str | os.PathLike | None = None,
    *,
    undirected: bool = False,
    split: tuple[float, float] = (0.6, 0.2),
    seed: int = 0,
) -> SparseGraph:
    """An edge-list file (`source target [weight]` per line, `#` comments) and an optional
    node file of `id feature... label` lines (Cora's `.content` layout: any id tokens, a
    label that may be a name). Without a node file, ids must be integers 0..n-1 and the
    graph has no features or labels. `undirected` stores both directions of each edge.
    Masks: a seeded random `split` (train, val fractions; the rest test)."""
    edges, ids, x, y = Path(edges), None, None, None
    if nodes is not None:
        nodes = Path(nodes)
        names, feats, labels = [], [], []
        for number, parts in _open_lines(nodes):
            if len(parts) < 2:
                raise GraphInputError(f"{nodes}:{number}: a node line needs `id [features...] label`, found {parts}")
            if feats and len(parts) - 2 != len(feats[0]):
                raise GraphInputError(f"{nodes}:{number}: {len(parts) - 2} features, but line 1 has {len(feats[0])}")
            names.append(parts[0])
            feats.append(parts[1:-1])
            labels.append(parts[-1])
        if not names:
            raise GraphInputError(f"node file {nodes} lists no nodes")
        ids = {name: i for i, name in enumerate(names)}
        if len(ids) != len(names):
            raise GraphInputError(f"node file {nodes} lists a node id twice")
        try:
            x = np.asarray(feats, dtype=np.float32)
        except ValueError as exc:
            raise GraphInputError(f"node file {nodes}: features must be numbers ({exc})") from None
        try:  # integer labels keep their order; names are numbered alphabetically
            _, y = np.unique(np.asarray([int(v) for v in labels]), return_inverse=True)
        except ValueError:
            _, y = np.unique(np.asarray(labels), return_inverse=True)
        y = y.astype(np.int64)
    pairs, weights = [], []
    for number, parts in _open_lines(edges):
        if len(parts) not in (2, 3):
            raise GraphInputError(f"{edges}:{number}: an edge line needs `source target [weight]`, found {parts}")
        if ids is not None:
            for p in parts[:2]:
                if p not in ids:
                    raise GraphInputError(f"{edges}:{number}: node {p!r} is not in the node file {nodes}")
            pairs.append((ids[parts[0]], ids[parts[1]]))
        else:
            try:
                pairs.append((int(parts[0]), int(parts[1])))
            except ValueError:
                raise GraphInputError(
                    f"{edges}:{number}: node ids must be integers without a node file, found {parts[:2]}"
                ) from None
        weights.append(float(parts[2]) if len(parts) == 3 else 1.0)
    ei = np.asarray(pairs, dtype=np.int64).reshape(-1, 2).T
    w = np.asarray(weights, dtype=np.float32)
    if undirected:
        ei, w = np.concatenate([ei, ei[::-1]], 1), np.concatenate([w, w])
    n = len(ids) if ids is not None else (int(ei.max()) + 1 if ei.size else 0)
    kwargs = {"edge_weight": w} if any(v != 1.0 for v in weights) else {}
    if x is not None:
        kwargs.update(x=x, y=y)
        kwargs.update(_random_split(n, np.random.default_rng(seed), split))
    graph = SparseGraph(ei, n, **kwargs)
    return _finish(graph) if graph.y is not None else graph


def _load_array(root: Path, stem: str, required: bool = True):
    """`stem.npy`, `stem.csv` or `stem.csv.gz` under root (OGB's raw files are gzipped CSVs)."""
    for suffix in (".npy", ".csv.gz", ".csv"):
        path = root / f"{stem}{suffix}"
        if path.is_file():
            try:
                if suffix == ".npy":
                    return np.load(path, allow_pickle=False)
                return np.loadtxt(path, delimiter=",", ndmin=2)
            except ValueError as exc:
                raise GraphInputError(f"cannot read {path}: {exc}") from None
    if required:
        raise GraphInputError(f"{root} has no {stem}.npy, {stem}.csv or {stem}.csv.gz")
    return None


def read_ogb(root: str | os.PathLike, split: str | None = None) -> SparseGraph:
    """An OGB node-property-prediction directory, e.g. ogbn-arxiv unpacked on disk.

    Arrays are read from `root` or `root/raw`: `edge_index` (2, E) or OGB's `edge` (E, 2),
    `node_feat` / `node-feat` (N, F), `node_label` / `node-label` (N,) or (N, 1). The split
    is `root/split/<name>/{train,valid,test}` (the only one, or `split`), or `root/split/` itself:
    node-id arrays in the same formats."""
    root = Path(root)
    if not root.is_dir():
        raise GraphInputError(f"OGB directory {root} does not exist")
    base = root / "raw" if (root / "raw").is_dir() else root
    ei = _load_array(base, "edge_index", required=False)
    if ei is None:
        ei = _load_array(base, "edge").T
    x = _load_array(base, "node_feat", required=False)
    x = _load_array(base, "node-feat") if x is None else x
    y = _load_array(base, "node_label", required=False)
    y = _load_array(base, "node-label") if y is None else y
    y = np.asarray(y).reshape(-1)
    if y.dtype.kind == "f" and np.isnan(y).any():
        raise GraphInputError(f"{base}: node labels hold NaN (unlabelled nodes are not supported)")
    split_root = root / "split"
    if not split_root.is_dir():
        raise GraphInputError(f"OGB directory {root} has no split/ folder")
    schemes = sorted(p for p in split_root.iterdir() if p.is_dir())
    if split is not None:
        split_dir = split_root / split
        if not split_dir.is_dir():
            raise GraphInputError(f"{split_root} has no split {split!r}; found {[p.name for p in schemes]}")
    elif len(schemes) == 1:
        split_dir = schemes[0]
    elif not schemes:
        split_dir = split_root
    else:
        raise GraphInputError(f"{split_root} holds several splits {[p.name for p in schemes]}; pass split=")
    parts = [
        np.asarray(_load_array(split_dir, name)).reshape(-1).astype(np.int64) for name in ("train", "valid", "test")
    ]
    n = len(x)
    for name, ids in zip(("train", "valid", "test"), parts):
        if ids.size and (ids.min() < 0 or ids.max() >= n):
            raise GraphInputError(f"{split_dir}/{name}: node id {int(ids.max())} outside [0, {n})")
    graph = SparseGraph(
        np.asarray(ei).astype(np.int64), n, x=np.asarray(x, dtype=np.float32), y=y.astype(np.int64), **_masks(n, *parts)
    )
    return _finish(graph)
