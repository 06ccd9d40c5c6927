"""Node-classification jobs for `luoshu train`: the graph data sets by name and one run of a
zoo model (`gcn`, `graphsage`, `gat`), full-graph or sampled, reporting accuracy on the
train / val / test masks.

    luoshu train --model graphsage --dataset sbm --epochs 20
    luoshu train --model graphsage --dataset sbm --data-arg fanouts=[10,5] --batch-size 512

`data_args` hold the data set's options plus `fanouts` (sampled mini-batch training, one
fan-out per layer; without it every epoch is one full-graph step).
"""

from __future__ import annotations

import csv
import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tensorboardX import SummaryWriter

from luoshu.checkpoint import save
from luoshu.core.errors import Error
from luoshu.core.random import manual_seed
from luoshu.gnn import datasets
from luoshu.gnn.graph import SparseGraph
from luoshu.gnn.models import GAT, GCN, GATConfig, GCNConfig, GraphSAGE, GraphSAGEConfig
from luoshu.gnn.sampler import NeighborLoader
from luoshu.gnn.training import accuracy, train_full_graph_epoch, train_sampled_epoch
from luoshu.optim import OPTIMIZERS


class NodeJobError(Error, ValueError):
    """A node-classification job that cannot run as configured (names the setting)."""


def _sbm(path, args):
    return datasets.stochastic_block_model(**args)


def _karate(path, args):
    return datasets.karate_club()


def _edge_list(path, args):
    if path is None:
        raise NodeJobError("dataset 'edge-list' needs --data-path EDGES (and --data-arg nodes=NODE_FILE)")
    return datasets.read_edge_list(path, **args)


def _ogb(path, args):
    if path is None:
        raise NodeJobError("dataset 'ogb' needs --data-path DIRECTORY (an OGB node-property directory)")
    return datasets.read_ogb(path, **args)


# name -> (loader(path, args) -> SparseGraph, allowed options, description)
GRAPH_DATASETS: dict[str, tuple[Callable[[str | None, dict], SparseGraph], tuple[str, ...], str]] = {
    "sbm": (
        _sbm,
        ("num_nodes", "num_classes", "avg_degree", "p_intra", "num_features", "feature_noise", "split", "seed"),
        "a generated stochastic-block-model graph (10k nodes by default)",
    ),
    "karate": (_karate, (), "Zachary's karate club, the two leaders labelled (shipped with networkx)"),
    "edge-list": (
        _edge_list,
        ("nodes", "undirected", "split", "seed"),
        "an edge-list file (--data-path) and a Cora-style node file (--data-arg nodes=...)",
    ),
    "ogb": (_ogb, ("split",), "an OGB node-property directory (edge, node-feat, node-label, split/)"),
}


def _graph(config) -> tuple[SparseGraph, tuple[int, ...] | None]:
    if config.dataset not in GRAPH_DATASETS:
        raise NodeJobError(
            f"model {config.model!r} classifies nodes; its dataset must be one of "
            f"{sorted(GRAPH_DATASETS)}, found {config.dataset!r}"
        )
    load, allowed, _ = GRAPH_DATASETS[config.dataset]
    args = dict(config.data_args)
    fanouts = args.pop("fanouts", None)
    unknown = sorted(set(args) - set(allowed))
    if unknown:
        raise NodeJobError(
            f"dataset {config.dataset!r} has no option {unknown[0]!r}; its options are {list(allowed) + ['fanouts']}"
        )
    if "split" in args and isinstance(args["split"], list):
        args["split"] = tuple(args["split"])
    graph = load(config.data_path, args)
    if graph.x is None or graph.y is None:
        raise NodeJobError(f"dataset {config.dataset!r} gave a graph without node features or labels")
    if fanouts is not None:
        fanouts = tuple(fanouts) if isinstance(fanouts, list | tuple) else (fanouts,)
    return graph, fanouts


# the zoo's node models (luoshu.models lists the same three; importing it here would be a circle)
NODE_MODELS = {"gcn": (GCNConfig, GCN), "graphsage": (GraphSAGEConfig, GraphSAGE), "gat": (GATConfig, GAT)}


def _model(config, graph: SparseGraph, num_layers_hint: int | None):
    if config.model not in NODE_MODELS:
        raise NodeJobError(f"node-classification jobs take model one of {sorted(NODE_MODELS)}, found {config.model!r}")
    config_class, model_class = NODE_MODELS[config.model]
    fields = {f.name for f in dataclasses.fields(config_class)}
    args: dict[str, Any] = {"in_features": int(graph.x.shape[1]), "num_classes": int(graph.num_classes)}
    if num_layers_hint is not None and "num_layers" not in config.model_args:
        args["num_layers"] = num_layers_hint
    for key, value in config.model_args.items():
        if key not in fields:
            raise NodeJobError(f"model {config.model!r} has no config field {key!r}; its fields are {sorted(fields)}")
        if key in ("in_features", "num_classes") and value != args[key]:
            raise NodeJobError(f"model arg {key}={value!r} does not fit the dataset, which needs {key}={args[key]}")
        args[key] = value
    return model_class(config_class(**args))


def _optimizer(config, params):
    if config.optimizer not in OPTIMIZERS:
        raise NodeJobError(f"optimizer must be one of {sorted(OPTIMIZERS)}, found {config.optimizer!r}")
    return OPTIMIZERS[config.optimizer](
        params, lr=config.lr, weight_decay=config.weight_decay, **dict(getattr(config, "optimizer_args", {}) or {})
    )


def train_node_job(config, log: Callable[[str], None] | None = None) -> dict[str, float]:
    """Trains `config.model` on `config.dataset` for `config.epochs`; returns the final loss and
    the train / val / test accuracies. Writes `<job dir>/metrics.csv` (one row per epoch), a
    TensorBoard event file in the job dir and the final model and optimizer as a checkpoint
    in the checkpoint dir."""
    graph, fanouts = _graph(config)
    manual_seed(config.seed)
    model = _model(config, graph, len(fanouts) if fanouts else None)
    if fanouts is not None and config.model == "gcn":
        raise NodeJobError("gcn trains on the full graph; drop fanouts, or use graphsage or gat for sampled batches")
    opt = _optimizer(config, model.parameters())
    loader = None
    if fanouts is not None:
        loader = NeighborLoader(
            graph,
            fanouts,
            seeds=graph.train_mask,
            batch_size=config.batch_size,
            seed=config.seed,
            num_workers=config.num_workers,
            num_layers=len(model.convs),
        )
    job_dir = Path(config.job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    with SummaryWriter(str(job_dir)) as events:
        for epoch in range(config.epochs):
            loss = (
                train_sampled_epoch(model, opt, graph, loader)
                if loader is not None
                else train_full_graph_epoch(model, opt, graph)
            )
            acc = accuracy(model, graph)
            rows.append({"epoch": epoch + 1, "loss": loss, **{f"{k}_accuracy": v for k, v in acc.items()}})
            events.add_scalar("train/loss", loss, epoch + 1)
            for split, value in acc.items():
                events.add_scalar(f"accuracy/{split}", value, epoch + 1)
            if log is not None:
                log(
                    f"epoch {epoch + 1}: loss {loss:.4f}, train {acc['train']:.4f}, val {acc['val']:.4f}, "
                    f"test {acc['test']:.4f}"
                )
    with open(job_dir / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    checkpoints = Path(getattr(config, "checkpoint_path", job_dir / "checkpoints"))
    save(
        checkpoints / f"epoch-{config.epochs}", model, opt, metadata={"model": config.model, "dataset": config.dataset}
    )
    final = rows[-1]
    return {k: float(v) for k, v in final.items() if k != "epoch"}


def describe_datasets() -> Mapping[str, str]:
    return {name: spec[2] for name, spec in GRAPH_DATASETS.items()}
