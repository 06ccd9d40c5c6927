"""A packaged model whose embedding tables are served from an `EmbeddingStore` instead of its own weights.

`StoreBackedModel(model, store, {weight name: table name})` runs the package's IR graph op by
op (each op's `OpDef.compute`, as the plan executor does) but answers every `embedding` op
that reads one of the named weights with `store.lookup(table, ids)`, and runs every
`embedding_bag` on a compact table of the rows its batch reads (from the store). The ids are
whatever the graph computed (slot offsets, luoshu.ctr's key -> row step), so the zoo's CTR
models and `luoshu.ctr` packages work unchanged. The
model's own copy of a table is never read, and `release_tables()` drops it. It has the
inference-model protocol (`name`, `version`, `inputs`, `outputs`, `__call__`), so
`InferenceServer` serves it like any other model.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import numpy as np
import torch

from luoshu.serving.embedding_store import EmbeddingStore, StoreError

_GATHER_OPS = ("embedding", "embedding_bag")


class StoreBackedModel:
    def __init__(self, model, store: EmbeddingStore, tables: Mapping[str, str] | None = None):
        tables = dict(tables) if tables is not None else {name: name for name in store.tables}
        self.model, self.store, self.tables = model, store, tables
        self.name, self.version = model.name, model.version
        self.inputs, self.outputs = list(model.inputs), list(model.outputs)
        for weight, table in tables.items():
            if weight not in model.weights:
                raise StoreError(f"model {model.name!r} has no weight {weight!r}; weights are {sorted(model.weights)}")
            t = store.table(table)
            shape = tuple(model.weights[weight].shape)
            if len(shape) != 2 or shape[1] != t.dim:
                raise StoreError(
                    f"model {model.name!r}: weight {weight!r} has shape {list(shape)}, the store's table "
                    f"{table!r} has rows of {t.dim}"
                )
        table_of = {id(model.weights[w]): t for w, t in tables.items()}
        slot: dict[int, int] = {}

        def slot_of(t) -> int:
            return slot.setdefault(id(t), len(slot))

        self._feeds = [(spec.name, slot_of(t)) for spec, t in zip(model.inputs, model.input_tensors)]
        self._steps = []
        served = set()
        leaves = {}
        for op in model.ops:
            table_reads = [i for i, t in enumerate(op.inputs) if id(t) in table_of]
            if table_reads:
                if op.opdef.name not in _GATHER_OPS or table_reads != [0]:
                    name = table_of[id(op.inputs[table_reads[0]])]
                    raise StoreError(
                        f"model {model.name!r}: op {op.opdef.name!r} reads the table of {name!r} other "
                        f"than as an embedding lookup; only {_GATHER_OPS} can be served from the store"
                    )
                table = table_of[id(op.inputs[0])]
                served.add(table)
                if op.opdef.name == "embedding":  # its forward ignores padding_idx: the rows are the answer
                    kernel = functools.partial(self._lookup, table)
                    ins = (slot_of(op.inputs[1]),)
                else:
                    kernel = functools.partial(self._bag, table, op.opdef.compute, dict(op.attrs))
                    ins = tuple(slot_of(t) for t in op.inputs[1:])
                for t in op.inputs[1:]:
                    if t.producer is None and t.kind != "placeholder":
                        leaves[slot_of(t)] = t
            else:
                kernel = op.opdef.bind(op.attrs)
                ins = tuple(slot_of(t) for t in op.inputs)
                for t in op.inputs:
                    if t.producer is None and t.kind != "placeholder":
                        leaves[slot_of(t)] = t
            self._steps.append((kernel, ins, tuple(slot_of(t) for t in op.outputs)))
        missing = set(tables.values()) - served
        if missing:
            raise StoreError(f"model {model.name!r}: no embedding op reads the weights of table(s) {sorted(missing)}")
        self._leaves = list(leaves.items())
        self._fetch = [slot_of(t) for t in model.output_tensors]
        self._size = len(slot)

    def _lookup(self, table: str, ids: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.store.lookup(table, ids.numpy()))

    def _bag(self, table: str, compute, attrs: dict, ids: torch.Tensor, *rest):
        """An embedding bag over the batch's own rows: the op runs on a compact table of the unique
        ids it reads (from the store), with the ids renumbered into it and padding_idx moved along."""
        flat = ids.numpy()
        uniq, inverse = np.unique(flat.reshape(-1), return_inverse=True)
        rows = self.store.lookup(table, uniq)
        pad = attrs.get("padding_idx")
        if pad is not None:
            pos = int(np.searchsorted(uniq, pad))
            if pos == len(uniq) or uniq[pos] != pad:  # the padding id is not in this batch: give it a row
                rows = np.concatenate([rows, np.zeros((1, rows.shape[1]), rows.dtype)])
                pos = len(uniq)
            attrs = {**attrs, "padding_idx": pos}
        local = torch.from_numpy(inverse.reshape(flat.shape).astype(np.int64))
        return compute(torch.from_numpy(rows), local, *rest, **attrs)

    def release_tables(self) -> None:
        """Drops the model's own copies of the store-served tables (the store has them)."""
        for weight in self.tables:
            t = self.model.weights[weight]
            t._value = torch.empty((0, t._value.shape[1]), dtype=t._value.dtype)

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        checked = self.model.check_feeds(feeds)
        values: list = [None] * self._size
        for name, s in self._feeds:
            array = checked[name]
            if not (array.flags.writeable and array.flags.c_contiguous):  # torch wants its own writable copy
                array = np.array(array)
            values[s] = torch.from_numpy(array)
        for s, t in self._leaves:
            values[s] = t._value
        with torch.no_grad():
            for kernel, ins, outs in self._steps:
                result = kernel(*(values[i] for i in ins))
                if len(outs) == 1:
                    values[outs[0]] = result
                else:
                    for s, v in zip(outs, result):
                        values[s] = v
        return {spec.name: values[s].numpy() for spec, s in zip(self.outputs, self._fetch)}
