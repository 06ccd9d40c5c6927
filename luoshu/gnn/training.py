"""Node-classification training loops: full-graph epochs, sampled mini-batch epochs, and
accuracy on the train / val / test masks. `luoshu train` and the tests drive these."""

from __future__ import annotations

import numpy as np
import torch

from luoshu import ops
from luoshu.core.context import no_grad
from luoshu.core.errors import Error
from luoshu.core.tensor import make_constant
from luoshu.gnn.graph import SparseGraph
from luoshu.gnn.sampler import MiniBatch
from luoshu.nn import functional as F

MASKS = ("train", "val", "test")


def _ids(graph: SparseGraph, split: str) -> torch.Tensor:
    mask = getattr(graph, f"{split}_mask", None)
    if mask is None:
        raise Error(f"the graph has no {split}_mask; give it train_mask, val_mask and test_mask")
    return torch.nonzero(torch.as_tensor(mask)).reshape(-1)


def _features(graph: SparseGraph, device=None):
    if graph.x is None:
        raise Error("the graph has no node features x")
    return graph.cached(("x", str(device)), lambda: make_constant(graph.x.float(), device=device))


def train_full_graph_epoch(model, optimizer, graph: SparseGraph, device=None) -> float:
    """One optimizer step on the whole graph, the loss over the train mask; returns the loss."""
    model.train()
    ids = graph.cached(("train_ids", str(device)), lambda: make_constant(_ids(graph, "train"), device=device))
    labels = graph.cached(("train_y", str(device)), lambda: make_constant(graph.y[_ids(graph, "train")], device=device))
    optimizer.zero_grad()
    logits = model(_features(graph, device), graph)
    loss = F.cross_entropy(ops.index_select(logits, 0, ids), labels)
    loss.backward()
    optimizer.step()
    return float(loss.numpy())


def minibatch_loss(model, graph: SparseGraph, batch: MiniBatch, device=None):
    """The mean cross-entropy over a sampled batch's seeds (features gathered for its input nodes)."""
    # index_select, not x[ids]: the advanced-indexing gather is several times slower on CPU
    x = make_constant(torch.index_select(graph.x, 0, batch.input_nodes).float(), device=device)
    y = make_constant(torch.index_select(graph.y, 0, batch.seeds), device=device)
    return F.cross_entropy(model(x, batch.blocks), y)


def train_sampled_epoch(model, optimizer, graph: SparseGraph, loader, device=None) -> float:
    """One pass over a `NeighborLoader`: one optimizer step per batch; returns the mean loss."""
    model.train()
    losses = []
    for batch in loader:
        optimizer.zero_grad()
        loss = minibatch_loss(model, graph, batch, device)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.numpy()))
    return float(np.mean(losses)) if losses else float("nan")


def accuracy(model, graph: SparseGraph, device=None) -> dict[str, float]:
    """Full-graph inference; the accuracy on each of the train / val / test masks."""
    model.eval()
    with no_grad():
        pred = model(_features(graph, device), graph).numpy().argmax(-1)
    model.train()
    y = graph.y.numpy()
    out = {}
    for split in MASKS:
        ids = _ids(graph, split).numpy()
        out[split] = float((pred[ids] == y[ids]).mean()) if len(ids) else float("nan")
    return out
