"""Packages from `luoshu.ctr` models: a compiled HugeCTR-style `Model`, or its files
(`graph_to_json` plus `save_params_to_files`), become an ordinary inference package.

The package's inputs are what a client has: `dense` (batch, dense_dim) float32 and, per sparse
input of the model's `Input`, its raw keys (batch, slots, max_nnz) int64 with -1 for an empty
place (as `Model.predict_batch` takes them). The key → row step is part of the graph: slot s's
key k is row `offset[s] + k`, and a key outside its slot's range, or -1, reads the table's padding
row (zeros), the default row of an unknown key at inference. The output `prediction` is the
model's evaluation-mode probability (batch, label_dim).

Tables without a `slot_size_array` (keys handed rows on first touch by a hash index) carry their
key index into the package as two weights (`<table>.sorted_keys`, `<table>.sorted_rows`) searched
in the graph; a key never stored reads the padding row. Tables on parameter servers or sharded
over processes are refused (export from a single-process model, e.g. with `export_ctr_files`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from luoshu import ops
from luoshu.core import context
from luoshu.core.errors import Error
from luoshu.core.graph import Graph
from luoshu.core.op import apply, topological_ops
from luoshu.core.tensor import make_constant
from luoshu.serving.package import DEFAULT_SHARD_BYTES, InferenceModel, from_graph, save


def _ctr():
    from luoshu import ctr  # a domain layer: imported only when a CTR model is exported

    return ctr


def _keys_to_rows(keys, table):
    """Rows of one sparse input's (batch, slots, hotness) keys in its table (see the module docstring)."""
    if table.slot_sizes is None:
        return _hash_rows(keys, table)
    sizes = make_constant(np.asarray(table.slot_sizes, np.int64)[None, :, None])
    offsets = make_constant(np.asarray(table.offsets, np.int64)[None, :, None])
    valid = ops.logical_and(keys >= 0, keys < sizes)
    return ops.where(valid, keys + offsets, table.pad)


def _hash_rows(keys, table):
    """Rows of a hash-indexed table's keys: a binary search of the table's sorted keys, in the graph.

    The key index (each stored key and its row, sorted by key) becomes two weights; a lower-bound
    search by binary lifting takes ceil(log2(n)) vectorised steps of gather, compare and select (ops
    every backend has, ONNX included). A key the table never stored reads the padding row."""
    stored = table.key.value.numpy()
    used = np.flatnonzero(stored >= 0)
    order = np.argsort(stored[used], kind="stable")
    sorted_keys, sorted_rows = stored[used][order], used[order].astype(np.int64)
    shape = keys.shape[1:]
    flat = ops.reshape(keys, (-1,))
    n = len(sorted_keys)
    if n == 0:
        return ops.reshape(ops.full_like(flat, table.pad), (-1, *shape))
    key_table = make_constant(sorted_keys, name=f"{table.name}.sorted_keys")
    row_table = make_constant(sorted_rows, name=f"{table.name}.sorted_rows")
    below = ops.zeros_like(flat)  # how many stored keys are smaller than each key
    step = 1 << (n.bit_length() - 1)
    while step:
        candidate = below + step
        probe = ops.index_select(key_table, 0, ops.clamp(candidate - 1, max=n - 1))
        below = ops.where(ops.logical_and(candidate <= n, probe < flat), candidate, below)
        step >>= 1
    at = ops.clamp(below, max=n - 1)
    found = ops.logical_and(ops.index_select(key_table, 0, at) == flat, flat >= 0)
    rows = ops.where(found, ops.index_select(row_table, 0, at), table.pad)
    return ops.reshape(rows, (-1, *shape))


def trace_ctr(model, *, name: str | None = None, version: int | str = 1) -> InferenceModel:
    """The inference graph of a compiled `luoshu.ctr.Model` (its evaluation pass, keys as inputs)."""
    ctr = _ctr()
    from luoshu.ctr.embedding import SparseEmbeddingTable

    if not isinstance(model, ctr.Model):
        raise Error(f"export_ctr: expected a luoshu.ctr.Model, found {type(model).__name__}")
    model._require_compiled("export")
    for table in model.tables:
        if type(table) is not SparseEmbeddingTable:
            raise Error(
                f"export_ctr: embedding {table.name!r} is a {type(table).__name__}; export a single-process "
                "model whose tables it holds itself (load the saved files with export_ctr_files)"
            )
    inp = model._input
    src = model.graph
    prediction = model._eval_tensors["prediction"]
    graph = Graph("ctr-inference")
    mapped: dict[int, object] = {}
    with graph, context.no_grad(), context.autocast_scope(None):
        dense = graph.placeholder(inp.dense_name, (None, inp.dense_dim), "float32")
        mapped[id(model._ph_dense)] = dense
        inputs, keys_of = [dense], {}
        for p in inp.data_reader_sparse_param_array:
            keys_of[p.sparse_name] = graph.placeholder(p.sparse_name, (None, p.slot_num, p.max_nnz), "int64")
            inputs.append(keys_of[p.sparse_name])
        for embedding, table, rows in zip(model._embeddings, model.tables, model._ph_rows):
            mapped[id(rows)] = _keys_to_rows(keys_of[embedding.bottom_name], table)
        for op in topological_ops([prediction], src):  # the evaluation pass, replayed onto the new inputs
            for t in op.inputs:
                if t.kind == "placeholder" and id(t) not in mapped:
                    raise Error(
                        f"export_ctr: the prediction reads placeholder {t.name!r}, which inference does not feed"
                    )
            result = apply(op.opdef, *[mapped.get(id(t), t) for t in op.inputs], **op.attrs)
            for t, new in zip(op.outputs, result if isinstance(result, tuple) else (result,)):
                mapped[id(t)] = new
        output = mapped[id(prediction)]
    weight_names = {id(t): f"dense.{n}" for n, t in model.network.state_dict().items()}
    for table in model.tables:
        weight_names[id(table.emb_vector)] = f"sparse.{table.name}.emb_vector"
    meta = {
        "source": "luoshu.ctr",
        "model_name": model.solver.model_name,
        "tables": {
            t.name: {
                "input": e.bottom_name,
                "rows": t.rows,
                "vec_size": t.vec_size,
                "slot_sizes": None if t.slot_sizes is None else list(t.slot_sizes),
                "index": "hash" if t.slot_sizes is None else "slot offsets",
                "combiner": t.combiner,
                "weight": f"sparse.{t.name}.emb_vector",
            }
            for e, t in zip(model._embeddings, model.tables)
        },
    }
    return from_graph(
        graph,
        inputs,
        [output],
        ["prediction"],
        weight_names,
        name=name or model.solver.model_name or "ctr",
        version=version,
        metadata=meta,
    )


def model_from_files(
    graph_config_file: str | os.PathLike, dense_model_file: str | os.PathLike, sparse_model_files: Sequence | Mapping
):
    """A compiled `luoshu.ctr.Model` from `graph_to_json` output and `save_params_to_files` packages
    (every file verified against its manifest before anything is loaded)."""
    ctr = _ctr()
    # The data the model trained on is not needed: an empty source list makes compile() open none
    model = ctr.Model.from_json(graph_config_file, source=[""], eval_source="")
    model.compile()
    model.load_dense_weights(dense_model_file)
    model.load_sparse_weights(sparse_model_files)
    return model


def export_ctr(
    path, model, *, name: str | None = None, version: int | str = 1, max_shard_bytes: int = DEFAULT_SHARD_BYTES
) -> Path:
    """Writes the inference package of a compiled `luoshu.ctr.Model` at `path`."""
    return save(path, trace_ctr(model, name=name, version=version), max_shard_bytes=max_shard_bytes)


def export_ctr_files(
    path,
    graph_config_file,
    dense_model_file,
    sparse_model_files,
    *,
    name: str | None = None,
    version: int | str = 1,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Writes the inference package of a CTR model saved as files (`graph_to_json` + `save_params_to_files`)."""
    model = model_from_files(graph_config_file, dense_model_file, sparse_model_files)
    return export_ctr(path, model, name=name, version=version, max_shard_bytes=max_shard_bytes)
