"""HugeCTR's `Model`: layers added in order, compiled onto one luoshu define-and-run graph, trained
with `fit`, evaluated by AUC, saved and loaded as luoshu checkpoint packages.

`compile()` checks everything before any training (the Input, the embeddings' inputs and
slot sizes, every layer's inputs and shapes, the data files against the Input) and raises a
`CTRError` naming the layer and the field. It then records, in one `luoshu.Graph`, a
training pass (dropout on, batch statistics) with its loss and update ops and an evaluation
pass (dropout off, running statistics) sharing the same parameters. The dense network has one
optimizer and each embedding table its own (HugeCTR lets an embedding carry its own
`optimizer`); all of them update from one backward pass.

Files (`save_params_to_files(prefix, iter)`, also written by `fit(snapshot=...)`):
`{prefix}_dense_{iter}.model` and `{prefix}{i}_sparse_{iter}.model` for embedding i (one
`.rank<r>` package per rank for a table sharded over processes), each a
luoshu checkpoint directory (graph.json, weights.safetensors, the optimizer's state,
manifest.json with SHA-256) — HugeCTR's names, luoshu's verified format, no pickle. A
sparse package holds `emb_vector` (and `key` for hash tables). HugeCTR's separate
`_opt_` files are folded into these packages; `load_*_optimizer_states` read them from there.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.torch import load_file

from luoshu import distributed as dist
from luoshu import optim, ps
from luoshu.amp import autocast
from luoshu.checkpoint import load as load_checkpoint
from luoshu.checkpoint import save as save_checkpoint
from luoshu.checkpoint import verify
from luoshu.core.autodiff import gradients
from luoshu.core.errors import CheckpointError, Error
from luoshu.core.graph import Graph, placeholder
from luoshu.core.random import manual_seed
from luoshu.ctr import reader as readers
from luoshu.ctr.config import (
    LOSS_LAYERS,
    CTRError,
    DataReaderParams,
    DenseLayer,
    Embedding_t,
    Input,
    Layer_t,
    MetricsType,
    Optimizer_t,
    OptParamsPy,
    Solver,
    SparseEmbedding,
    Update_t,
    layer_from_json,
)
from luoshu.ctr.embedding import PSTable, ShardedTable, SparseEmbeddingTable, ps_optimizer_spec
from luoshu.ctr.layers import Builder, build_layer
from luoshu.metrics import auc as auc_score
from luoshu.nn.layers import Linear
from luoshu.nn.module import Module
from luoshu.ops import comm

GRAPH_FORMAT = "luoshu-ctr-graph"
GRAPH_VERSION = 1


class _Network(Module):
    """Owns the dense layers' parameters (children named after their top tensors)."""


def make_optimizer(opt: OptParamsPy, params: list, lr: float) -> optim.Optimizer:
    """The luoshu optimizer an `OptParamsPy` describes."""
    lr = opt.lr if opt.lr is not None else lr
    t = opt.optimizer_type
    if t is Optimizer_t.Adam:
        return optim.Adam(params, lr=lr, betas=(opt.beta1, opt.beta2), eps=opt.epsilon)
    if t is Optimizer_t.AdaGrad:
        return optim.AdaGrad(params, lr=lr, initial_accumulator_value=opt.initial_accu_value, eps=opt.epsilon)
    if t is Optimizer_t.Nesterov:
        if not opt.momentum_factor > 0:
            raise CTRError(f"CreateOptimizer momentum_factor: Nesterov needs momentum_factor > 0, "
                           f"found {opt.momentum_factor}")
        return optim.Nesterov(params, lr=lr, momentum=opt.momentum_factor)
    return optim.SGD(params, lr=lr, momentum=opt.momentum_factor if t is Optimizer_t.MomentumSGD else 0.0)


def _minimize_all(loss, groups: list, scaler, world: int = 1, replicated: tuple = (), remote: tuple = (),
                  global_rows: tuple = ()) -> list:
    """One backward pass, one update op per optimizer (`groups`: (optimizer, params) pairs).

    The sparse gradients of the `global_rows` parameters (tables with `Update_t.Global`) update
    every row of the table (optimizer update kind "g"), the others only the rows looked up.

    In a `world`-process job each rank's loss covers its share of the global batch: the
    gradients are taken of loss / world, the `replicated` parameters' (the dense network's)
    are summed over the ranks, and sharded tables' arrive summed through their all-to-all.
    `remote` parameter-server tables get a push op for their gradient instead of an update."""
    if len(groups) == 1 and world == 1 and not remote and not global_rows:
        opt, params = groups[0]
        return [opt.minimize(loss, var_list=params, loss_scaler=scaler)]
    target = loss * (1.0 / world) if world > 1 else loss
    target = scaler.scale(target) if scaler is not None else target
    flat = [p for _, params in groups for p in params]
    grads = gradients(target, flat + [t.remote.weight for t in remote])
    pushes = [t.remote.push_op(g) for t, g in zip(remote, grads[len(flat):]) if g is not None]
    grads = grads[:len(flat)]
    if world > 1:
        shared = {id(p) for p in replicated}
        grads = [comm.all_reduce(g) if id(p) in shared and g is not None else g for p, g in zip(flat, grads)]
    updates, pos = [], 0
    for opt, params in groups:
        indices = [opt._index[id(p)] for p in params]
        everywhere = {opt._index[id(p)] for p in global_rows if id(p) in opt._index}
        update = opt.update_op(loss.graph, indices, grads[pos:pos + len(params)], scaler, everywhere)
        pos += len(params)
        if update is not None:
            updates.append(update)
    return updates + pushes


def _lr_at(solver: Solver, step: int) -> float:
    """HugeCTR's learning-rate schedule: linear warm-up, then polynomial decay from decay_start."""
    base = solver.lr
    if solver.warmup_steps > 1 and step <= solver.warmup_steps:
        return base * step / solver.warmup_steps
    if solver.decay_start > 0 and step > solver.decay_start:
        if step > solver.decay_start + solver.decay_steps:
            return solver.end_lr
        frac = 1 - (step - solver.decay_start) / max(solver.decay_steps, 1)
        return (base - solver.end_lr) * frac ** solver.decay_power + solver.end_lr
    return base


class Model:
    """A HugeCTR model: `add` an `Input`, `SparseEmbedding`s and `DenseLayer`s (the last a loss),
    `compile()`, then `fit()`; see the module docstring for the files it writes."""

    def __init__(self, solver: Solver, reader_params: DataReaderParams, opt_params: OptParamsPy | None = None,
                 etc: Any = None):
        if not isinstance(solver, Solver):
            raise CTRError(f"Model solver: expected hugectr.CreateSolver(...), found {type(solver).__name__}")
        if not isinstance(reader_params, DataReaderParams):
            raise CTRError(f"Model reader_params: expected hugectr.DataReaderParams(...), found "
                           f"{type(reader_params).__name__}")
        self.solver, self.reader_params = solver, reader_params
        self.opt_params = opt_params if opt_params is not None else OptParamsPy()
        self.layers: list = []
        self._compiled = False
        self._train_batches: Iterator | None = None
        self._iteration = 0
        self._last_loss = float("nan")
        self._eval_results: dict | None = None
        self._last_feeds: dict | None = None
        self._frozen: set[int] = set()

    # --- building -------------------------------------------------------------------------
    def add(self, layer) -> None:
        """Appends an `Input`, `SparseEmbedding` or `DenseLayer`."""
        if not isinstance(layer, (Input, SparseEmbedding, DenseLayer)):
            raise CTRError(f"Model.add: expected Input, SparseEmbedding or DenseLayer, found {type(layer).__name__}")
        if self._compiled:
            raise CTRError("Model.add: the model is already compiled; build a new Model to change it")
        self.layers.append(layer)

    def _check_structure(self) -> tuple[Input, list[SparseEmbedding], list[DenseLayer]]:
        inputs = [layer for layer in self.layers if isinstance(layer, Input)]
        if len(inputs) != 1 or not isinstance(self.layers[0], Input):
            raise CTRError(f"Model.compile: the first layer must be the one Input, found {len(inputs)} Input layer(s)"
                           f"{'' if not self.layers else ' and first ' + type(self.layers[0]).__name__}")
        inp = inputs[0]
        embeddings = [layer for layer in self.layers if isinstance(layer, SparseEmbedding)]
        dense = [layer for layer in self.layers if isinstance(layer, DenseLayer)]
        sparse_names = [p.sparse_name for p in inp.data_reader_sparse_param_array]
        if len(set(sparse_names)) != len(sparse_names):
            raise CTRError(f"Input data_reader_sparse_param_array: sparse names must be unique, found {sparse_names}")
        total_slots = sum(p.slot_num for p in inp.data_reader_sparse_param_array)
        sizes = self.reader_params.slot_size_array
        if sizes and len(sizes) != total_slots:
            per_input = ", ".join(f"{p.sparse_name}: {p.slot_num}" for p in inp.data_reader_sparse_param_array)
            raise CTRError(f"DataReaderParams slot_size_array: {len(sizes)} entries for the Input's {total_slots} "
                           f"slots ({per_input})")
        for e in embeddings:
            where = f"SparseEmbedding {e.sparse_embedding_name!r}"
            if e.bottom_name not in sparse_names:
                raise CTRError(f"{where} bottom_name: {e.bottom_name!r} is not a sparse input; the Input has "
                               f"{sparse_names}")
            if e.combiner not in ("sum", "mean"):
                raise CTRError(f"{where} combiner: expected 'sum' or 'mean', found {e.combiner!r}")
            if not isinstance(e.embedding_vec_size, int) or e.embedding_vec_size < 1:
                raise CTRError(f"{where} embedding_vec_size: expected a positive integer, found "
                               f"{e.embedding_vec_size!r}")
            if not e.sparse_embedding_name:
                raise CTRError("SparseEmbedding sparse_embedding_name: every embedding needs a name")
            param = inp.data_reader_sparse_param_array[sparse_names.index(e.bottom_name)]
            if e.slot_size_array and len(e.slot_size_array) != param.slot_num:
                raise CTRError(f"{where} slot_size_array: {len(e.slot_size_array)} entries for the "
                               f"{param.slot_num} slots of {e.bottom_name!r}")
        if not dense or dense[-1].resolved(f"layer {len(self.layers) - 1}")[0] not in LOSS_LAYERS:
            raise CTRError("Model.compile: the last layer must be a loss (BinaryCrossEntropyLoss, CrossEntropyLoss "
                           "or MultiCrossEntropyLoss)")
        return inp, embeddings, dense

    def _slot_range(self, inp: Input, sparse_name: str) -> tuple[int, int]:
        start = 0
        for p in inp.data_reader_sparse_param_array:
            if p.sparse_name == sparse_name:
                return start, start + p.slot_num
            start += p.slot_num
        raise CTRError(f"no sparse input {sparse_name!r}")

    def _open_sources(self, inp: Input) -> None:
        rp, total_slots = self.reader_params, sum(p.slot_num for p in inp.data_reader_sparse_param_array)
        args = dict(label_dim=inp.total_label_dim, dense_dim=inp.dense_dim, num_slots=total_slots,
                    i64_keys=self.solver.i64_input_key, seed=self.solver.seed)
        self._train_source = readers.open_source(rp, rp.source[0], "source", eval_=False, **args)
        self._eval_source = readers.open_source(rp, rp.eval_source, "eval_source", eval_=True, **args) \
            if rp.eval_source else None
        for src, what in ((self._train_source, "source"), (self._eval_source, "eval_source")):
            if src is None:
                continue
            lay = src.layout
            if lay.dense_dim != inp.dense_dim:
                raise CTRError(f"Input dense_dim: {inp.dense_dim}, but the {what} data hold {lay.dense_dim} dense "
                               f"features")
            if lay.label_dim != inp.total_label_dim:
                raise CTRError(f"Input label_dim: {inp.label_dim}, but the {what} data hold {lay.label_dim} label "
                               f"column(s)")
            if lay.num_slots != total_slots:
                raise CTRError(f"Input data_reader_sparse_param_array: {total_slots} slots in all, but the {what} "
                               f"data hold {lay.num_slots}")

    def compile(self, loss_names: Sequence[str] = (), loss_weights: Sequence[float] = ()) -> None:
        """Checks the model and its data, creates the parameters and records the graph."""
        inp, embeddings, dense = self._check_structure()
        self._input = inp
        if self.reader_params.source and self.reader_params.source[0]:
            self._open_sources(inp)
        manual_seed(self.solver.seed)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
            dist.init()  # started by `luoshu launch`: HugeCTR scripts call no init of their own
        self._world, self._rank = (dist.world_size(), dist.rank()) if dist.is_distributed() else (1, 0)
        self._ps_client = self._connect_ps() if self.solver.embedding_placement == "parameter_server" else None
        for name, size in (("batchsize", self.solver.batchsize), ("batchsize_eval", self.solver.batchsize_eval)):
            if size % self._world:
                raise CTRError(f"CreateSolver {name}: the global batch {size} must split evenly over the "
                               f"{self._world} processes")
        params_of = {p.sparse_name: p for p in inp.data_reader_sparse_param_array}
        self.tables: list[SparseEmbeddingTable] = []
        self._table_inputs: list[tuple[int, int]] = []
        for e in embeddings:
            s0, s1 = self._slot_range(inp, e.bottom_name)
            sizes = e.slot_size_array or (self.reader_params.slot_size_array[s0:s1]
                                          if self.reader_params.slot_size_array else None)
            opt = e.optimizer or self.opt_params
            global_update = opt.update_type is Update_t.Global and opt.optimizer_type is not Optimizer_t.SGD
            if self._ps_client is not None:
                if global_update or self.solver.use_mixed_precision:
                    raise CTRError(f"SparseEmbedding {e.sparse_embedding_name!r}: a parameter-server table updates "
                                   f"the rows it is sent (Update_t.Local / LazyGlobal) in fp32; found update_type "
                                   f"{opt.update_type.name}, use_mixed_precision={self.solver.use_mixed_precision}")
                table = PSTable(e, params_of[e.bottom_name], sizes, self._ps_client,
                                ps_optimizer_spec(opt, self.solver.lr), self._world, self.solver.seed)
            elif self._world > 1:
                placement = self.solver.embedding_placement
                if placement == "auto":
                    placement = "distributed" if e.embedding_type is Embedding_t.DistributedSlotSparseEmbeddingHash \
                        else "localized"
                table = ShardedTable(e, params_of[e.bottom_name], sizes, global_update, self._world, self._rank,
                                     placement, self.solver.seed)
            else:
                table = SparseEmbeddingTable(e, params_of[e.bottom_name], sizes, global_update, self.solver.seed)
            self.tables.append(table)
            self._table_inputs.append((s0, s1))
        self.network = _Network()
        self._hotness = max((p.max_nnz for p in inp.data_reader_sparse_param_array), default=1)
        self.graph = Graph("ctr")
        self._resolved = [(layer, *layer.resolved(f"layer {i + 1 + len(embeddings)}")) for i, layer in
                          enumerate(dense)]
        self._shapes: dict[str, tuple] = {}
        precision = contextlib.nullcontext()
        if self.solver.use_mixed_precision:
            precision = autocast(self.solver.mixed_precision_dtype)
        with self.graph:
            label_dim = inp.total_label_dim
            self._ph_label = placeholder("label", (None, label_dim))
            self._ph_dense = placeholder("dense", (None, inp.dense_dim))
            self._ph_rows = [placeholder(f"rows_{t.name}", (None, t.num_slots, t.hotness), "int64")
                             for t in self.tables]
            self._ph_send = [placeholder(f"send_{t.name}", (None,), "int64") if isinstance(t, ShardedTable) else None
                             for t in self.tables]
            with precision:
                train = self._forward(inp, embeddings, training=True)
                evaluation = self._forward(inp, embeddings, training=False)
            self._train_tensors, self._eval_tensors = train, evaluation
            losses = train["losses"]
            if loss_names:
                unknown = [n for n in loss_names if n not in losses]
                if unknown:
                    raise CTRError(f"compile loss_names: {unknown} are not loss outputs; the losses are "
                                   f"{sorted(losses)}")
                weights = list(loss_weights) or [1.0] * len(loss_names)
                loss = sum(w * losses[n] for n, w in zip(loss_names, weights))
            else:
                loss = losses[next(iter(losses))]
            self._loss = loss
            dense_params = self.network.parameters()
            self.dense_optimizer = make_optimizer(self.opt_params, dense_params, self.solver.lr) \
                if dense_params else None
            self.sparse_optimizers = [None if isinstance(t, PSTable) else
                                      make_optimizer(e.optimizer or self.opt_params, t.parameters(), self.solver.lr)
                                      for e, t in zip(embeddings, self.tables)]
            self.scaler = optim.LossScaler(init_scale=max(float(self.solver.scaler), 1.0), growth_interval=1 << 30) \
                if self.solver.use_mixed_precision else None
            groups = ([(self.dense_optimizer, dense_params)] if dense_params else []) + \
                [(o, t.parameters()) for o, t in zip(self.sparse_optimizers, self.tables) if o is not None]
            remote = tuple(t for t in self.tables if isinstance(t, PSTable))
            global_rows = tuple(t.emb_vector for t in self.tables if getattr(t, "global_update", False))
            self._updates = _minimize_all(loss, groups, self.scaler, self._world, tuple(dense_params), remote,
                                          global_rows)
        if self.solver.compile_step:  # forward, backward and every update as one graph (a LoweringWarning where not)
            self.graph.compile([self._loss, *self._updates])
        self._embeddings = embeddings
        self._compiled = True

    def _connect_ps(self):
        """A client of the job's parameter servers (`luoshu launch --servers N`), or of one started
        in this process when the job has none."""
        store, servers = dist.ps_store()
        if servers:
            return ps.connect(store=store, worker_rank=dist.rank())
        self._ps_servers = ps.start_local_servers(1, in_process=True)
        return ps.connect(addresses=self._ps_servers)

    def _forward(self, inp: Input, embeddings: list[SparseEmbedding], training: bool) -> dict:
        tensors: dict[str, Any] = {}
        if isinstance(inp.label_dim, list):
            start = 0
            for name, dim in zip(inp.label_name, inp.label_dim):
                tensors[name] = self._ph_label[:, start:start + dim]
                start += dim
        else:
            tensors[inp.label_name] = self._ph_label
        tensors[inp.dense_name] = self._ph_dense
        for e, table, rows, send in zip(embeddings, self.tables, self._ph_rows, self._ph_send):
            if e.sparse_embedding_name in tensors:
                raise CTRError(f"SparseEmbedding sparse_embedding_name: {e.sparse_embedding_name!r} is already a "
                               f"tensor name")
            tensors[e.sparse_embedding_name] = table(rows) if send is None else table(rows, send)
        builder = Builder(self.network, training)
        losses, producers = {}, {}
        first_dense = 1 + len(embeddings)
        for i, (layer, kind, params) in enumerate(self._resolved):
            index = first_dense + i
            xs = []
            for name in layer.bottom_names:
                if name not in tensors:
                    raise CTRError(f"layer {index} ({kind.name} -> {', '.join(layer.top_names)}): bottom_names entry "
                                   f"{name!r} is produced by no earlier layer; known tensors: {sorted(tensors)}")
                xs.append(tensors[name])
            if not layer.top_names:
                raise CTRError(f"layer {index} ({kind.name}): top_names is empty")
            outs, loss_info = build_layer(builder, index, layer, kind, params, xs, self._dense_weights)
            if len(outs) != len(layer.top_names):
                raise CTRError(f"layer {index} ({kind.name} -> {', '.join(layer.top_names)}): top_names: the layer "
                               f"produces {len(outs)} tensor(s), {len(layer.top_names)} name(s) given")
            for name, t in zip(layer.top_names, outs):
                if name in tensors and kind is not Layer_t.Interaction:
                    raise CTRError(f"layer {index} ({kind.name}): top_names entry {name!r} is already produced by "
                                   f"{producers.get(name, 'the Input / an embedding')}")
                tensors[name] = t
                producers[name] = f"layer {index}"
                if training:
                    self._shapes[name] = tuple(t.shape)
            if loss_info:
                losses[layer.top_names[0]] = loss_info["loss"]
                tensors["__prediction__"], tensors["__label__"] = loss_info["prediction"], loss_info["label"]
        if training:
            for e, t in zip(embeddings, self.tables):
                self._shapes[e.sparse_embedding_name] = (None, t.num_slots, t.vec_size)
        return {"tensors": tensors, "losses": losses, "prediction": tensors["__prediction__"],
                "label": tensors["__label__"], "loss": next(iter(losses.values()))}

    def _dense_weights(self) -> list:
        return [m.weight for m in self.network.modules() if isinstance(m, Linear)]

    def _require_compiled(self, what: str) -> None:
        if not self._compiled:
            raise CTRError(f"Model.{what}: call compile() first")

    # --- feeding ----------------------------------------------------------------------------
    def _feeds(self, batch: dict, insert: bool, shard: bool = False) -> dict:
        """Feeds for a batch; with `shard` (training in a multi-process job) this rank's part of it."""
        if shard and self._world > 1:
            part = len(batch["label"]) // self._world
            batch = {k: v[self._rank * part:(self._rank + 1) * part] for k, v in batch.items()}
        feeds = {self._ph_label: batch["label"], self._ph_dense: batch["dense"]}
        sparse = batch["sparse"]
        for table, ph, send, (s0, s1) in zip(self.tables, self._ph_rows, self._ph_send, self._table_inputs):
            rows = table.rows_of(sparse[:, s0:s1, :table.hotness], insert)
            feeds[ph] = rows
            if send is not None:
                feeds[send] = table.route(rows)
        return feeds

    def _batches(self, source, batch_size: int, repeat: bool):
        return readers.batches(source, batch_size, repeat, self._hotness)

    # --- training ------------------------------------------------------------------------------
    def start_data_reading(self) -> None:
        """Starts (or restarts) the training reader (HugeCTR's low-level API)."""
        self._require_compiled("start_data_reading")
        self._train_batches = self._batches(self._train_source, self.solver.batchsize, self.solver.repeat_dataset)

    def _set_lr(self, step: int) -> float:
        lr = _lr_at(self.solver, step)
        for opt, spec in [(self.dense_optimizer, self.opt_params)] + [  # parameter-server tables: None
                (o, e.optimizer or self.opt_params) for o, e in zip(self.sparse_optimizers, self._embeddings)]:
            if opt is None:
                continue
            value = 0.0 if id(opt) in self._frozen else (lr if spec.lr is None else spec.lr)
            for group in opt.param_groups:
                group["lr"] = value
        return lr

    def train(self) -> bool:
        """One training iteration on the next batch; False when an epoch-mode pass has ended."""
        self._require_compiled("train")
        if self._train_batches is None:
            self.start_data_reading()
        batch = next(self._train_batches, None)
        if batch is None:
            self._train_batches = None
            return False
        self._iteration += 1
        self._set_lr(self._iteration)
        if self._world > 1 and len(batch["label"]) % self._world:
            raise CTRError(f"training batch of {len(batch['label'])} rows does not split over {self._world} "
                           f"processes (an epoch's last batch); use repeat_dataset=True or a dividing batchsize")
        feeds = self._feeds(batch, insert=True, shard=True)
        self._last_feeds = feeds
        self._last_loss = float(self.graph.run([self._loss, *self._updates], feeds)[0])
        if not math.isfinite(self._last_loss) and self.scaler is None:
            raise Error(f"training diverged at iteration {self._iteration}: loss {self._last_loss}")
        return True

    def get_current_loss(self) -> float:
        return self._last_loss

    def _eval_arrays(self, source, num_batches: int | None, want_loss: bool = True):
        preds, labels, loss_sum, rows = [], [], 0.0, 0
        fetch = [self._eval_tensors["prediction"], self._eval_tensors["label"], self._eval_tensors["loss"]]
        for i, batch in enumerate(self._batches(source, self.solver.batchsize_eval, repeat=False)):
            if num_batches is not None and i >= num_batches:
                break
            pred, label, loss = self.graph.run(fetch, self._feeds(batch, insert=False))
            preds.append(np.asarray(pred, np.float32))
            labels.append(np.asarray(label, np.float32))
            loss_sum += float(loss) * len(pred)
            rows += len(pred)
        if not rows:
            raise CTRError("evaluation: the evaluation source yielded no samples")
        return np.concatenate(preds), np.concatenate(labels), loss_sum / rows

    def evaluate(self, num_batches: int | None = None) -> dict[str, float]:
        """AUC (mean over label columns) and average loss over `max_eval_batches` eval batches."""
        self._require_compiled("evaluate")
        if self._eval_source is None:
            raise CTRError("DataReaderParams eval_source: evaluation needs an eval_source")
        pred, label, loss = self._eval_arrays(self._eval_source, num_batches or self.solver.max_eval_batches)
        aucs = []
        for c in range(pred.shape[1]):
            y = label[:, c] > 0.5
            aucs.append(auc_score(y, pred[:, c]) if 0 < y.sum() < len(y) else float("nan"))
        self._eval_results = {"AUC": float(np.nanmean(aucs)) if not all(map(math.isnan, aucs)) else float("nan"),
                              "AverageLoss": loss}
        return dict(self._eval_results)

    def eval(self) -> dict[str, float]:
        """HugeCTR's low-level eval: runs the evaluation; read it with get_eval_metrics()."""
        return self.evaluate()

    def get_eval_metrics(self) -> list[tuple[str, float]]:
        if self._eval_results is None:
            raise CTRError("get_eval_metrics: no evaluation has run yet")
        return list(self._eval_results.items())

    def fit(self, num_epochs: int = 0, max_iter: int = 2000, display: int = 200, eval_interval: int = 1000,
            snapshot: int = 10000, snapshot_prefix: str = "", metrics_file: str | os.PathLike | None = None,
            progress: bool = True) -> list[dict]:
        """Trains for `max_iter` iterations (`repeat_dataset=True`) or `num_epochs` passes, printing the
        loss every `display` iterations, evaluating every `eval_interval` (and at the end), and
        saving every `snapshot` iterations under `snapshot_prefix`. Shows a tqdm bar with samples/s
        and appends every display / evaluation to `metrics_file` (CSV; default
        `{snapshot_prefix or model_name or 'ctr'}_metrics.csv`). Returns those rows."""
        from tqdm import tqdm

        self._require_compiled("fit")
        repeat = self.solver.repeat_dataset
        if repeat and max_iter < 1:
            raise CTRError(f"fit max_iter: expected a positive number of iterations, found {max_iter}")
        if not repeat and num_epochs < 1:
            raise CTRError(f"fit num_epochs: repeat_dataset=False trains by epochs; expected num_epochs >= 1, "
                           f"found {num_epochs}")
        for name, v in (("display", display), ("eval_interval", eval_interval), ("snapshot", snapshot)):
            if not isinstance(v, int) or v < 0:
                raise CTRError(f"fit {name}: expected an integer >= 0, found {v!r}")
        stem = snapshot_prefix or self.solver.model_name or "ctr"
        path = Path(metrics_file) if metrics_file is not None else Path(f"{stem}_metrics.csv")
        lead = self._rank == 0  # in a multi-process job rank 0 reports; every rank trains and evaluates
        if lead:
            path.parent.mkdir(parents=True, exist_ok=True)
        else:
            path, progress = Path(os.devnull), False
        history: list[dict] = []
        fields = ["iteration", "epoch", "phase", "loss", "auc", "samples_per_s", "lr", "elapsed_s"]
        threshold = self.solver.metrics_spec.get(MetricsType.AUC, 1.0)
        batch = self.solver.batchsize
        steps_per_epoch = math.ceil(self._train_source.layout.num_rows / batch)
        total = max_iter if repeat else num_epochs * steps_per_epoch
        start = time.perf_counter()
        window_start, window_loss, window_n = start, 0.0, 0
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()

            def record(row):
                writer.writerow(row)
                f.flush()
                history.append(row)

            bar = tqdm(total=total, unit="it", disable=not progress, dynamic_ncols=True, desc="fit")
            epoch, done, stop = 0, 0, False
            if not repeat or self._train_batches is None:
                self.start_data_reading()
            while not stop:
                if not self.train():
                    epoch += 1
                    if repeat or epoch >= num_epochs:
                        break
                    self.start_data_reading()
                    continue
                done += 1
                it = self._iteration
                window_loss += self._last_loss
                window_n += 1
                bar.update(1)
                now = time.perf_counter()
                rate = window_n * batch / max(now - window_start, 1e-9)
                bar.set_postfix(loss=f"{self._last_loss:.4f}", samples_s=f"{rate:,.0f}", refresh=False)
                if display and it % display == 0:
                    lr = _lr_at(self.solver, it)
                    if lead:
                        bar.write(f"Iter: {it} Time({window_n} iters): {now - window_start:.3f}s "
                                  f"Loss: {window_loss / window_n:.6f} lr:{lr:g} ({rate:,.0f} samples/s)")
                    record({"iteration": it, "epoch": epoch, "phase": "train", "loss": window_loss / window_n,
                            "auc": "", "samples_per_s": rate, "lr": lr, "elapsed_s": now - start})
                    window_start, window_loss, window_n = now, 0.0, 0
                last = done >= total
                if self._eval_source is not None and ((eval_interval and it % eval_interval == 0) or last):
                    m = self.evaluate()
                    if lead:
                        bar.write(f"Evaluation, AUC: {m['AUC']:.6f} AverageLoss: {m['AverageLoss']:.6f} (iter {it})")
                    record({"iteration": it, "epoch": epoch, "phase": "eval", "loss": m["AverageLoss"],
                            "auc": m["AUC"], "samples_per_s": "", "lr": "", "elapsed_s": time.perf_counter() - start})
                    if threshold < 1.0 and m["AUC"] >= threshold:
                        if lead:
                            bar.write(f"Hit target AUC {threshold} at iteration {it}; stopping")
                        stop = True
                if snapshot and it % snapshot == 0:
                    self.save_params_to_files(snapshot_prefix, it)
                if repeat and last:
                    break
            bar.close()
        return history

    # --- inference -------------------------------------------------------------------------------
    def predict(self, source: str | None = None, num_batches: int | None = None) -> np.ndarray:
        """Predicted probabilities (samples, label_dim) for a file list (Norm / Parquet) or Raw file;
        by default the evaluation source. Sample order is the data's."""
        self._require_compiled("predict")
        inp = self._input
        if source is None:
            src = self._eval_source
            if src is None:
                raise CTRError("predict: pass a source (no eval_source is configured)")
        else:
            src = readers.open_source(self.reader_params, source, "predict source",
                                      label_dim=inp.total_label_dim, dense_dim=inp.dense_dim,
                                      num_slots=self._train_source.layout.num_slots if hasattr(self, "_train_source")
                                      else sum(p.slot_num for p in inp.data_reader_sparse_param_array),
                                      i64_keys=self.solver.i64_input_key, eval_=True)
        return self._eval_arrays(src, num_batches)[0]

    def _batch_of(self, dense, sparse) -> dict:
        sparse = np.asarray(sparse, dtype=np.int64)
        if sparse.ndim == 2:
            sparse = sparse[:, :, None]
        dense = np.asarray(dense, dtype=np.float32)
        if sparse.shape[2] < self._hotness:
            pad = np.full(sparse.shape[:2] + (self._hotness - sparse.shape[2],), -1, np.int64)
            sparse = np.concatenate([sparse, pad], axis=2)
        return {"label": np.zeros((len(dense), self._input.total_label_dim), np.float32), "dense": dense,
                "sparse": sparse}

    def predict_batch(self, dense: np.ndarray, sparse: np.ndarray) -> np.ndarray:
        """Probabilities for arrays: dense (n, dense_dim) and sparse keys (n, slots[, hotness], -1 = none)."""
        self._require_compiled("predict_batch")
        feeds = self._feeds(self._batch_of(dense, sparse), insert=False)
        return np.asarray(self.graph.run(self._eval_tensors["prediction"], feeds))

    def check_out_tensor(self, tensor_name: str, tensor_type: str = "Evaluate", dense: np.ndarray | None = None,
                         sparse: np.ndarray | None = None) -> np.ndarray:
        """A named tensor's value (evaluation-mode pass) on the last training batch, or on the
        given `dense` / `sparse` arrays (as `predict_batch` takes them)."""
        self._require_compiled("check_out_tensor")
        tensors = self._eval_tensors["tensors"]
        if tensor_name not in tensors or tensor_name.startswith("__"):
            raise CTRError(f"check_out_tensor tensor_name: no tensor {tensor_name!r}; known: "
                           f"{sorted(k for k in tensors if not k.startswith('__'))}")
        feeds = self._last_feeds if dense is None else self._feeds(self._batch_of(dense, sparse), insert=False)
        if feeds is None:
            raise CTRError("check_out_tensor: no batch has run yet; pass dense and sparse arrays")
        return np.asarray(self.graph.run(tensors[tensor_name], feeds), dtype=np.float32)

    # --- description ----------------------------------------------------------------------------
    def summary(self) -> str:
        """Prints (and returns) each layer with its inputs, outputs, output shapes and parameter count."""
        self._require_compiled("summary")
        rows = [("#", "layer", "bottom", "top", "output shape", "params")]
        inp = self._input
        rows.append(("0", "Input", "", f"{inp.label_name}, {inp.dense_name}, " +
                     ", ".join(p.sparse_name for p in inp.data_reader_sparse_param_array),
                     f"(None, {inp.total_label_dim}), (None, {inp.dense_dim})", "0"))
        for i, (e, t) in enumerate(zip(self._embeddings, self.tables)):
            rows.append((str(i + 1), e.embedding_type.name, e.bottom_name, e.sparse_embedding_name,
                         str(self._shapes[e.sparse_embedding_name]), f"{t.emb_vector.value.numel():,}"))
        counts: dict[str, int] = {}
        for name, p in self.network.named_parameters():
            counts[name.split(".")[0]] = counts.get(name.split(".")[0], 0) + p.value.numel()
        for i, (layer, kind, _) in enumerate(self._resolved):
            key = "".join(c if c.isalnum() or c == "_" else "_" for c in "_".join(layer.top_names))
            n = sum(v for k, v in counts.items() if k == key or k.startswith(key + "_"))
            rows.append((str(i + 1 + len(self.tables)), kind.name, ", ".join(layer.bottom_names),
                         ", ".join(layer.top_names), ", ".join(str(self._shapes[t]) for t in layer.top_names),
                         f"{n:,}"))
        widths = [max(len(r[c]) for r in rows) for c in range(6)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)) for r in rows]
        dense = sum(p.value.numel() for p in self.network.parameters())
        sparse = sum(t.emb_vector.value.numel() for t in self.tables)
        lines.append(f"dense parameters: {dense:,}  sparse parameters: {sparse:,}")
        text = "\n".join(lines)
        print(text)
        return text

    def graph_to_json(self, graph_config_file: str | os.PathLike) -> None:
        """Writes the solver, reader, optimizer and every layer to a JSON file (`Model.from_json` /
        `construct_from_json` read it back)."""
        doc = {"format": GRAPH_FORMAT, "version": GRAPH_VERSION, "solver": self.solver.to_json(),
               "reader": self.reader_params.to_json(), "optimizer": self.opt_params.to_json(),
               "layers": [layer.to_json() for layer in self.layers]}
        Path(graph_config_file).write_text(json.dumps(doc, indent=2))

    @staticmethod
    def _read_graph_json(path) -> dict:
        try:
            doc = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise CTRError(f"graph JSON {path} does not exist") from None
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CTRError(f"graph JSON {path} cannot be read: {exc}") from None
        if not isinstance(doc, dict) or doc.get("format") != GRAPH_FORMAT or doc.get("version") != GRAPH_VERSION:
            raise CTRError(f"graph JSON {path}: expected format {GRAPH_FORMAT!r} version {GRAPH_VERSION}, found "
                           f"{doc.get('format') if isinstance(doc, dict) else type(doc).__name__!r}")
        return doc

    def construct_from_json(self, graph_config_file: str | os.PathLike, include_dense_network: bool = True) -> None:
        """Adds the layers a `graph_to_json` file holds (only Input and embeddings without the dense network)."""
        doc = self._read_graph_json(graph_config_file)
        for d in doc.get("layers", []):
            layer = layer_from_json(d)
            if include_dense_network or not isinstance(layer, DenseLayer):
                self.add(layer)

    @classmethod
    def from_json(cls, graph_config_file: str | os.PathLike, **overrides: Any) -> Model:
        """A whole model (solver, reader, optimizer, layers) from a `graph_to_json` file;
        `overrides` replace solver / reader fields (e.g. `source=...`)."""
        doc = cls._read_graph_json(graph_config_file)
        solver_args = {**doc["solver"], **{k: v for k, v in overrides.items() if k in Solver.__dataclass_fields__}}
        reader_args = {**doc["reader"],
                       **{k: v for k, v in overrides.items() if k in DataReaderParams.__dataclass_fields__}}
        model = cls(Solver(**solver_args), DataReaderParams(**reader_args), OptParamsPy(**doc["optimizer"]))
        model.construct_from_json(graph_config_file)
        return model

    # --- files -------------------------------------------------------------------------------------
    def save_params_to_files(self, prefix: str, iter: int = 0) -> list[Path]:  # noqa: A002 - HugeCTR's name
        """Writes `{prefix}_dense_{iter}.model` and `{prefix}{i}_sparse_{iter}.model` (see the module doc)."""
        self._require_compiled("save_params_to_files")
        meta = {"iteration": self._iteration, "model_name": self.solver.model_name}
        out = []
        if self._rank == 0:  # the dense network is the same on every rank
            out.append(save_checkpoint(f"{prefix}_dense_{iter}.model", self.network, self.dense_optimizer,
                                       metadata=meta))
        for i, (table, opt) in enumerate(zip(self.tables, self.sparse_optimizers)):
            if isinstance(table, PSTable):  # the servers hold it (and snapshot it themselves)
                continue
            out.append(save_checkpoint(f"{prefix}{i}_sparse_{iter}.model{self._shard_suffix()}", table, opt,
                                       metadata={**meta, "sparse_embedding_name": table.name}))
        return out

    def _shard_suffix(self) -> str:
        """Sharded tables save one package per rank: `<file>.rank<r>`."""
        return f".rank{self._rank}" if self._world > 1 else ""

    def load_dense_weights(self, dense_model_file: str | os.PathLike) -> None:
        self._require_compiled("load_dense_weights")
        load_checkpoint(dense_model_file, self.network)

    def load_dense_optimizer_states(self, dense_opt_states_file: str | os.PathLike) -> None:
        self._require_compiled("load_dense_optimizer_states")
        _load_optimizer(dense_opt_states_file, self.dense_optimizer)

    def _sparse_targets(self, files) -> list[tuple[int, str]]:
        if isinstance(files, Mapping):
            names = [t.name for t in self.tables]
            out = []
            for name, f in files.items():
                if name not in names:
                    raise CTRError(f"load_sparse_weights: no embedding {name!r}; the model has {names}")
                out.append((names.index(name), f))
            return out
        files = [files] if isinstance(files, (str, os.PathLike)) else list(files)
        if len(files) != len(self.tables):
            raise CTRError(f"load_sparse_weights: {len(files)} file(s) for {len(self.tables)} embedding(s)")
        return list(enumerate(files))

    def load_sparse_weights(self, sparse_embedding_files) -> None:
        """Loads embedding tables: a list (one per embedding, in order) or {name: file}."""
        self._require_compiled("load_sparse_weights")
        targets = [(i, f"{f}{self._shard_suffix()}") for i, f in self._sparse_targets(sparse_embedding_files)]
        for _, f in targets:  # verify everything before changing anything
            verify(f)
        for i, f in targets:
            if isinstance(self.tables[i], PSTable):
                raise CTRError(f"load_sparse_weights: {self.tables[i].name!r} lives on the parameter servers; "
                               f"restore it with luoshu.ps snapshots")
            load_checkpoint(f, self.tables[i])
            self.tables[i].reset_index()

    def load_sparse_optimizer_states(self, sparse_opt_states_files) -> None:
        self._require_compiled("load_sparse_optimizer_states")
        for i, f in self._sparse_targets(sparse_opt_states_files):
            _load_optimizer(f"{f}{self._shard_suffix()}", self.sparse_optimizers[i])

    def embedding_table(self, embedding: int | str = 0) -> np.ndarray:
        """An embedding table's rows (without the padding row) as one array; in a multi-process
        job gathered from every rank (call it on all ranks)."""
        self._require_compiled("embedding_table")
        index = embedding if isinstance(embedding, int) else self._tables_named(embedding)[0]
        table = self.tables[index]
        full = table.full_table() if isinstance(table, (ShardedTable, PSTable)) else table.emb_vector.numpy()
        return np.array(full[:-1])

    # --- freezing -------------------------------------------------------------------------------------
    def freeze_dense(self) -> None:
        """Stops updating the dense network (its optimizer runs with lr 0)."""
        self._require_compiled("freeze_dense")
        self._frozen.add(id(self.dense_optimizer))

    def unfreeze_dense(self) -> None:
        self._require_compiled("unfreeze_dense")
        self._frozen.discard(id(self.dense_optimizer))

    def _tables_named(self, embedding_name: str | None) -> list[int]:
        found = [i for i, t in enumerate(self.tables) if embedding_name in (None, t.name)]
        if embedding_name is not None and not found:
            raise CTRError(f"no embedding {embedding_name!r}; the model has {[t.name for t in self.tables]}")
        return found

    def freeze_embedding(self, embedding_name: str | None = None) -> None:
        """Stops updating one embedding table (or all)."""
        self._require_compiled("freeze_embedding")
        for i in self._tables_named(embedding_name):
            self._frozen.add(id(self.sparse_optimizers[i]))

    def unfreeze_embedding(self, embedding_name: str | None = None) -> None:
        self._require_compiled("unfreeze_embedding")
        for i in self._tables_named(embedding_name):
            self._frozen.discard(id(self.sparse_optimizers[i]))


def _load_optimizer(path, optimizer) -> None:
    if optimizer is None:
        return
    path = Path(path)
    verify(path)
    try:
        meta = json.loads((path / "optimizer.json").read_text())
        tensors = load_file(path / "optimizer.safetensors")
    except FileNotFoundError:
        raise CheckpointError(f"{path} holds no optimizer state") from None
    except (OSError, json.JSONDecodeError, SafetensorError) as exc:
        raise CheckpointError(f"{path}: the optimizer state cannot be read: {exc}") from None
    if meta.get("class") != type(optimizer).__name__:
        raise CheckpointError(f"{path} holds {meta.get('class')} state, not {type(optimizer).__name__}")
    optimizer.load_state_dict({"tensors": {k: v for k, v in tensors.items()}, "meta": meta["meta"]})


__all__ = ["Model", "make_optimizer"]
