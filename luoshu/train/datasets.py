"""The datasets a job can name (`DATASETS`): readers and generators of `luoshu.data` turned into `DataSplits`."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from luoshu.data import (
    CIFAR10,
    CIFAR100,
    MNIST,
    CriteoDataset,
    ParquetDataset,
    copy_task,
    ctr_from_columns,
    load_digits,
    pad_sequences,
    read_criteo,
    read_movielens,
    synthetic_ctr,
    synthetic_sequences,
)
from luoshu.gnn.job import describe_datasets
from luoshu.train.errors import TrainConfigError, suggestion


@dataclass
class DataSplits:
    """A dataset ready for a task: train and eval arrays (dicts of equal-length NumPy arrays, keyed by
    the task's input names), what the model config must say (`info`, exactly; `min_info`, at least)
    and a per-batch transform `transform(batch, rng, train)` (rng: seeded per batch, so random
    augmentation and masking are reproducible and resume exactly)."""

    train: dict[str, np.ndarray]
    eval: dict[str, np.ndarray]
    info: dict[str, Any]  # config fields the data fixes (classes, channels, dense features)
    transform: Callable[[dict, np.random.Generator, bool], dict] | None = None
    min_info: dict[str, Any] = field(default_factory=dict)  # fields the data bounds below (vocabulary, length)
    # Data too large for memory: `train_stream(epoch, batch_size)` yields the training batches of one
    # pass (full batches only; `train` is then empty) and `stream_rows` is the rows per pass, if known.
    train_stream: Callable[[int, int], Iterable[dict]] | None = None
    stream_rows: int | None = None


@dataclass(frozen=True)
class DatasetSpec:
    """An entry of `DATASETS`: the tasks the data serves, whether it reads `data_path`, its loader and
    its line in `luoshu train --help`."""

    tasks: tuple[str, ...]
    needs_path: bool
    load: Callable[[str | None, dict, str], DataSplits]  # (path, data_args, task) -> splits
    help: str


def _args(data_args: Mapping, dataset: str, defaults: dict) -> dict:
    unknown = sorted(set(data_args) - set(defaults))
    if unknown:
        raise TrainConfigError(f"dataset {dataset!r} has no option {unknown[0]!r}{suggestion(unknown[0], defaults)}; "
                               f"its options: {', '.join(f'{k}={v!r}' for k, v in defaults.items())}")
    return {**defaults, **data_args}


def _split(arrays: dict[str, np.ndarray], eval_fraction: float, seed: int, shuffle: bool = True):
    n = len(next(iter(arrays.values())))
    if not 0 < eval_fraction < 1:
        raise TrainConfigError(f"eval_fraction must be in (0, 1), found {eval_fraction}")
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    cut = n - max(1, int(round(n * eval_fraction)))
    train, held = order[:cut], order[cut:]
    return {k: v[train] for k, v in arrays.items()}, {k: v[held] for k, v in arrays.items()}


def _image_splits(train_images, train_labels, eval_images, eval_labels, num_classes, mean, std,
                  augment: bool = False) -> DataSplits:
    """uint8/float images (N, H, W) or (N, H, W, C) -> float32 (N, C, H, W), normalised per batch; with
    `augment`, training batches get the usual CIFAR augmentation (random crop with 4 pixels of zero
    padding, horizontal flip)."""
    def nchw(images):
        return images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)

    train_images, eval_images = nchw(train_images), nchw(eval_images)
    channels, size = train_images.shape[1], train_images.shape[2]
    scale = np.float32(255.0) if train_images.dtype == np.uint8 else np.float32(1.0)
    mean = np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(std, np.float32).reshape(1, -1, 1, 1)

    def transform(batch, rng, train):
        images = (batch["image"].astype(np.float32) / scale - mean) / std
        if augment and train:
            images = _crop_and_flip(images, rng)
        return {**batch, "image": images}

    info = {"num_classes": num_classes, "in_channels": channels, "image_size": size,
            "in_features": channels * size * train_images.shape[3]}
    return DataSplits({"image": train_images, "label": train_labels}, {"image": eval_images, "label": eval_labels},
                      info, transform)


def _crop_and_flip(images: np.ndarray, rng: np.random.Generator, pad: int = 4) -> np.ndarray:
    n, _, h, w = images.shape
    padded = np.pad(images, ((0, 0), (0, 0), (pad, pad), (pad, pad)))  # zero = the mean after normalising
    top, left = rng.integers(0, 2 * pad + 1, n), rng.integers(0, 2 * pad + 1, n)
    rows = top[:, None] + np.arange(h)[None, :]  # (n, h)
    cols = left[:, None] + np.arange(w)[None, :]
    flip = rng.random(n) < 0.5
    cols = np.where(flip[:, None], cols[:, ::-1], cols)
    return padded[np.arange(n)[:, None, None, None], np.arange(images.shape[1])[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


def _load_digits(path, data_args, task):
    a = _args(data_args, "digits", {"eval_fraction": 0.2, "split_seed": 0})
    x, y = load_digits(images=True)
    train, held = _split({"image": x, "label": y}, a["eval_fraction"], a["split_seed"])
    return _image_splits(train["image"], train["label"], held["image"], held["label"], 10, [0.3], [0.4])


def _load_mnist(path, data_args, task):
    _args(data_args, "mnist", {})
    train, test = MNIST(path, train=True), MNIST(path, train=False)
    return _image_splits(train.images, train.labels, test.images, test.labels, 10, [0.1307], [0.3081])


def _load_cifar(classes: int):
    def load(path, data_args, task):
        if classes == 10:
            a = _args(data_args, "cifar10", {"augment": True})
            train, test = CIFAR10(path, train=True), CIFAR10(path, train=False)
        else:
            a = _args(data_args, "cifar100", {"label": "fine", "augment": True})
            train, test = CIFAR100(path, True, a["label"]), CIFAR100(path, False, a["label"])
        num_classes = 10 if classes == 10 else 100 if a["label"] == "fine" else 20
        return _image_splits(train.images, train.labels, test.images, test.labels, num_classes,
                             [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616], a["augment"])
    return load


def _ctr_arrays(data: dict, log_dense: bool = True) -> dict[str, np.ndarray]:
    """CTR columns for the models: missing dense values 0 and counts log-scaled (as DLRM's preprocessing)."""
    dense = np.nan_to_num(np.asarray(data["dense"], np.float32))
    return {"dense": np.log1p(np.maximum(dense, 0)) if log_dense else dense,
            "sparse": np.asarray(data["sparse"], np.int64), "label": np.asarray(data["label"], np.float32)}


def _ctr_splits(train: dict, held: dict, slot_sizes) -> DataSplits:
    train, held = _ctr_arrays(train), _ctr_arrays(held)
    sparse = np.concatenate([train["sparse"], held["sparse"]])
    sizes = np.asarray(slot_sizes, np.int64)
    if sparse.shape[1] != len(sizes) or (sparse.size and (sparse.min() < 0 or np.any(sparse.max(0) >= sizes))):
        raise TrainConfigError(f"the CTR ids do not fit the slot sizes {sizes.tolist()}: expected "
                               f"{len(sizes)} slots with ids in [0, size), found {sparse.shape[1]} slots with ids in "
                               f"[{sparse.min(initial=0)}, {sparse.max(initial=0)}]")
    return DataSplits(train, held, {"dense_dim": int(train["dense"].shape[1])},
                      min_info={"slot_sizes": sizes.tolist()})


def _tail_split(data: dict, eval_fraction: float) -> tuple[dict, dict]:
    """The last `eval_fraction` of the rows as the eval set: click logs are in time order, so this
    scores the model on later clicks than it trained on, as the usual day-based split does."""
    if not 0 < eval_fraction < 1:
        raise TrainConfigError(f"eval_fraction must be in (0, 1), found {eval_fraction}")
    n = len(data["label"])
    if n < 2:
        raise TrainConfigError(f"the data holds {n} rows; need at least 2 to train and evaluate")
    cut = n - max(1, int(round(n * eval_fraction)))
    return {k: v[:cut] for k, v in data.items()}, {k: v[cut:] for k, v in data.items()}


def _load_synthetic_ctr(path, data_args, task):
    a = _args(data_args, "synthetic-ctr", {"num_samples": 100_000, "eval_samples": 20_000, "dense_dim": 13,
                                           "num_slots": 26, "max_slot_size": 1000, "slot_sizes": None,
                                           "dist": "uniform", "seed": 0})
    slot_sizes = a["slot_sizes"] or [int(v) for v in np.geomspace(4, max(a["max_slot_size"], 4), a["num_slots"])
                                     .round()]
    total = a["num_samples"] + a["eval_samples"]
    data = synthetic_ctr(total, dense_dim=a["dense_dim"], slot_sizes=slot_sizes, dist=a["dist"], seed=a["seed"])
    if a["eval_samples"] < 1 or a["num_samples"] < 1:
        raise TrainConfigError("dataset 'synthetic-ctr': num_samples and eval_samples must be at least 1")
    train = {k: v[:a["num_samples"]] for k, v in data.items()}
    held = {k: v[a["num_samples"]:] for k, v in data.items()}
    return _ctr_splits(train, held, slot_sizes)


def _files(path, pattern: str) -> list[Path]:
    files = sorted(p for p in Path(path).glob(pattern) if p.is_file()) if Path(path).is_dir() else [Path(path)]
    if not files:
        raise TrainConfigError(f"no {pattern} files in {path}")
    return files


def _stream_files(path, a: dict, dataset: str, pattern: str) -> tuple[list[Path], list[Path]]:
    """(train files, eval files) for streaming: `eval_path`, or else the last file of a directory
    (as Criteo's last day is its test set)."""
    files = _files(path, pattern)
    if a["eval_path"] is not None:
        return files, _files(a["eval_path"], pattern)
    if len(files) < 2:
        raise TrainConfigError(f"dataset {dataset!r} with stream=true needs eval data: give --data-arg eval_path=FILE, "
                               f"or a directory of several files (the last one is held out); found {files}")
    return files[:-1], files[-1:]


def _load_criteo(path, data_args, task):
    """Criteo TSV: read into memory and split (the last `eval_fraction` of rows held out), or with
    `stream=true` read in chunks while training (for files larger than memory; needs --max-steps)."""
    a = _args(data_args, "criteo", {"num_buckets": 10_000, "eval_fraction": 0.1, "stream": False,
                                    "eval_path": None})
    if not a["stream"]:
        data = read_criteo(path, num_buckets=a["num_buckets"])
        buckets = np.broadcast_to(np.asarray(a["num_buckets"]), (data["sparse"].shape[1],))
        return _ctr_splits(*_tail_split(data, a["eval_fraction"]), buckets)
    train_files, eval_files = _stream_files(path, a, "criteo", "*")
    held = read_criteo(eval_files[0], num_buckets=a["num_buckets"]) if len(eval_files) == 1 else \
        _concat_ctr([read_criteo(f, num_buckets=a["num_buckets"]) for f in eval_files])
    buckets = np.broadcast_to(np.asarray(a["num_buckets"]), (held["sparse"].shape[1],))
    splits = _ctr_splits({k: v[:0] for k, v in held.items()}, held, buckets)

    def stream(epoch: int, batch_size: int):
        # Criteo is in time order: every pass reads the files in order, unshuffled
        return (_ctr_arrays(b) for b in CriteoDataset(train_files, batch_size, drop_last=True,
                                                      num_buckets=a["num_buckets"]))
    splits.train, splits.train_stream = {}, stream
    return splits


def _concat_ctr(parts: list[dict]) -> dict:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _parquet_slot_sizes(files: list[Path]) -> list[int]:
    """Slot sizes from the row groups' max statistics of columns C1.. (the largest id + 2: one row
    for each id and one for a missing id)."""
    top: dict[str, int] = {}
    for f in files:
        meta = pq.ParquetFile(f).metadata
        names = meta.schema.names
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            for j, name in enumerate(names):
                if name[:1] == "C" and name[1:].isdigit():
                    stats = group.column(j).statistics
                    if stats is None or not stats.has_min_max:
                        raise TrainConfigError(f"{f}: column {name} has no statistics; give --data-arg "
                                               "slot_sizes=[...]")
                    top[name] = max(top.get(name, -1), int(stats.max))
    return [top[c] + 2 for c in sorted(top, key=lambda c: int(c[1:]))]


def _load_parquet(path, data_args, task):
    """CTR Parquet (`label`, `I1`.., `C1`..): read into memory and split, or with `stream=true` streamed
    row group by row group, shuffled per epoch (needs eval data: `eval_path` or several files)."""
    a = _args(data_args, "parquet", {"eval_fraction": 0.1, "slot_sizes": None, "stream": False, "eval_path": None,
                                     "seed": 0})
    if a["stream"]:
        train_files, eval_files = _stream_files(path, a, "parquet", "*.parquet")
        slot_sizes = list(a["slot_sizes"]) if a["slot_sizes"] is not None else \
            _parquet_slot_sizes(train_files + eval_files)
        missing = np.asarray(slot_sizes) - 1  # a missing id (negative) gets the last row

        def ctr(columns):
            batch = ctr_from_columns(columns)
            return {**batch, "sparse": np.where(batch["sparse"] < 0, missing, batch["sparse"])}

        held = _concat_ctr(list(ParquetDataset(eval_files, batch_size=1 << 16, transform=ctr)))
        splits = _ctr_splits({k: v[:0] for k, v in held.items()}, held, slot_sizes)
        train_rows = ParquetDataset(train_files).num_rows

        def stream(epoch: int, batch_size: int):
            ds = ParquetDataset(train_files, batch_size=batch_size, shuffle=True, seed=a["seed"], drop_last=True,
                                transform=ctr)
            ds.set_epoch(epoch)
            return (_ctr_arrays(b) for b in ds)
        splits.train, splits.train_stream, splits.stream_rows = {}, stream, train_rows
        return splits
    files = _files(path, "*.parquet")
    data = _concat_ctr(list(ParquetDataset(files, batch_size=1 << 16, transform=ctr_from_columns)))
    sparse = data["sparse"]
    if a["slot_sizes"] is None:
        # ids are used as they are; a missing id (negative) gets its own row past the largest id
        top = sparse.max(axis=0, initial=0)
        data["sparse"] = np.where(sparse < 0, top + 1, sparse)
        slot_sizes = (top + 2).tolist()
    else:
        slot_sizes = list(a["slot_sizes"])
    return _ctr_splits(*_tail_split(data, a["eval_fraction"]), slot_sizes)


def _load_movielens(path, data_args, task):
    """Implicit feedback, the NCF protocol: every rating is a positive; each user's latest one is held
    out and ranked against `eval_negatives` items the user never rated; training pairs every positive
    with `num_negatives` unrated items."""
    a = _args(data_args, "movielens", {"num_negatives": 4, "eval_negatives": 99, "seed": 0})
    raw = read_movielens(path)
    if len(raw["user"]) == 0:
        raise TrainConfigError(f"dataset 'movielens': {path} holds no ratings")
    users, user = np.unique(raw["user"], return_inverse=True)
    items, item = np.unique(raw["item"], return_inverse=True)
    num_users, num_items = len(users), len(items)
    if num_items <= a["eval_negatives"]:
        raise TrainConfigError(f"dataset 'movielens': {num_items} items cannot give {a['eval_negatives']} negatives "
                               "per user; lower eval_negatives")
    order = np.lexsort((raw["timestamp"], user))  # by user, then time
    user, item = user[order], item[order]
    last = np.r_[user[1:] != user[:-1], True]  # each user's latest rating
    rated = np.unique(user.astype(np.int64) * num_items + item)
    rng = np.random.default_rng(a["seed"])

    def unrated(u: np.ndarray, k: int) -> np.ndarray:
        """k items per user in u that the user never rated (redrawn until they are)."""
        out = rng.integers(0, num_items, (len(u), k))
        for _ in range(100):
            bad = np.isin(u[:, None] * num_items + out, rated)
            if not bad.any():
                return out
            out[bad] = rng.integers(0, num_items, int(bad.sum()))
        raise TrainConfigError("dataset 'movielens': users rated nearly every item; cannot sample negatives")

    tu, ti = user[~last], item[~last]
    neg = unrated(tu, a["num_negatives"])
    train = {"user": np.concatenate([tu, np.repeat(tu, a["num_negatives"])]).astype(np.int64),
             "item": np.concatenate([ti, neg.reshape(-1)]).astype(np.int64),
             "label": np.concatenate([np.ones(len(tu)), np.zeros(neg.size)]).astype(np.float32)}
    eu, ei = user[last].astype(np.int64), item[last].astype(np.int64)
    candidates = np.concatenate([ei[:, None], unrated(eu, a["eval_negatives"])], axis=1)  # held-out item first
    held = {"user": np.repeat(eu[:, None], candidates.shape[1], axis=1), "item": candidates}
    return DataSplits(train, held, {}, min_info={"num_users": num_users, "num_items": num_items})


def _pad(seqs, length: int, value: int) -> np.ndarray:
    return pad_sequences(seqs, value, length)[0]


def _load_copy(reverse: bool):
    name = "reverse" if reverse else "copy"

    def load(path, data_args, task):
        a = _args(data_args, name, {"num_samples": 4096, "eval_samples": 512, "vocab": 16, "min_len": 2,
                                    "max_len": 12, "seed": 0})
        pairs = copy_task(a["num_samples"] + a["eval_samples"], a["vocab"], a["min_len"], a["max_len"],
                          reverse=reverse, dist="uniform", seed=a["seed"])
        info = {"vocab_size": a["vocab"], "src_vocab_size": a["vocab"], "tgt_vocab_size": a["vocab"]}
        if task == "lm":  # source, separator, answer: score the answer only
            length = 2 * a["max_len"]
            arrays = {"tokens": _pad([p[0] for p in pairs], length, 0), "targets": _pad([p[1] for p in pairs],
                                                                                         length, -100)}
            info.update(_lengths_info(length))
        else:  # seq2seq: the source, and the answer after a start token (1) with an end token (1) after it
            n_src = [len(p[0]) // 2 for p in pairs]  # inputs: source, separator, answer[:-1]
            sources = [p[0][:k] for p, k in zip(pairs, n_src)]
            answers = [p[1][k:] for p, k in zip(pairs, n_src)]
            arrays = {"src": _pad(sources, a["max_len"], 0),
                      "tgt_in": _pad([np.r_[1, ans] for ans in answers], a["max_len"] + 1, 0),
                      "tgt_out": _pad([np.r_[ans, 1] for ans in answers], a["max_len"] + 1, -100)}
            info["max_len"] = a["max_len"] + 1
        n = a["num_samples"]
        return DataSplits({k: v[:n] for k, v in arrays.items()}, {k: v[n:] for k, v in arrays.items()}, {},
                          min_info=info)
    return load


def _load_synthetic_lm(path, data_args, task):
    """A long-tail corpus (Zipf tokens, power-law document lengths) packed into blocks of `seq_len`."""
    a = _args(data_args, "synthetic-lm", {"num_docs": 2000, "vocab": 256, "seq_len": 32, "min_len": 4,
                                          "max_len": 256, "eval_fraction": 0.1, "seed": 0})
    docs = synthetic_sequences(a["num_docs"], a["vocab"], a["min_len"], a["max_len"], num_special=1, seed=a["seed"])
    stream = np.concatenate([np.r_[d, 0] for d in docs]).astype(np.int64)  # 0 ends a document
    block = a["seq_len"] + 1
    n = len(stream) // block
    if n < 2:
        raise TrainConfigError(f"dataset 'synthetic-lm': {len(stream)} tokens make fewer than 2 blocks of {block}")
    blocks = stream[:n * block].reshape(n, block)
    train, held = _split({"tokens": blocks[:, :-1].copy(), "targets": blocks[:, 1:].copy()}, a["eval_fraction"],
                         a["seed"], shuffle=False)
    return DataSplits(train, held, {}, min_info={"vocab_size": a["vocab"], **_lengths_info(a["seq_len"])})


def _lengths_info(length: int) -> dict[str, int]:
    """The zoo's names for a language model's longest sequence."""
    return {"block_size": length, "max_seq_len": length, "max_position_embeddings": length}


def _load_synthetic_text(path, data_args, task):
    """Topic classification: each class draws its tokens from its own Zipf distribution (a random
    permutation of the vocabulary), sequence lengths long-tailed; padding id 0."""
    a = _args(data_args, "synthetic-text", {"num_samples": 4096, "eval_samples": 1024, "num_classes": 4,
                                            "vocab": 64, "min_len": 4, "max_len": 32, "seed": 0})
    n = a["num_samples"] + a["eval_samples"]
    rng = np.random.default_rng(a["seed"])
    labels = rng.integers(0, a["num_classes"], n)
    seqs = synthetic_sequences(n, a["vocab"], a["min_len"], a["max_len"], num_special=1, seed=a["seed"])
    topics = np.stack([1 + rng.permutation(a["vocab"] - 1) for _ in range(a["num_classes"])])  # token 0: padding
    tokens = _pad([topics[c][s - 1] for c, s in zip(labels, seqs)], a["max_len"], 0)
    arrays = {"tokens": tokens, "label": labels.astype(np.int64)}
    m = a["num_samples"]
    return DataSplits({k: v[:m] for k, v in arrays.items()}, {k: v[m:] for k, v in arrays.items()},
                      {"num_classes": a["num_classes"]}, min_info={"vocab_size": a["vocab"]})


DATASETS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec(("image",), False, _load_digits, "scikit-learn's 8x8 digits (shipped, no path)"),
    "mnist": DatasetSpec(("image",), True, _load_mnist, "MNIST IDX files under --data-path"),
    "cifar10": DatasetSpec(("image",), True, _load_cifar(10), "CIFAR-10 binary batches under --data-path"),
    "cifar100": DatasetSpec(("image",), True, _load_cifar(100), "CIFAR-100 binary batches under --data-path"),
    "movielens": DatasetSpec(("rating",), True, _load_movielens, "MovieLens ratings file (u.data, ratings.csv)"),
    "criteo": DatasetSpec(("ctr",), True, _load_criteo, "Criteo TSV file (label, 13 int, 26 hex columns)"),
    "parquet": DatasetSpec(("ctr",), True, _load_parquet, "CTR Parquet file or directory (label, I1.., C1..)"),
    "synthetic-ctr": DatasetSpec(("ctr",), False, _load_synthetic_ctr, "generated click logs with a hidden model"),
    "copy": DatasetSpec(("seq2seq", "lm"), False, _load_copy(False), "copy a random sequence (synthetic)"),
    "reverse": DatasetSpec(("seq2seq", "lm"), False, _load_copy(True), "reverse a random sequence (synthetic)"),
    "synthetic-lm": DatasetSpec(("lm",), False, _load_synthetic_lm, "long-tail token corpus (synthetic)"),
    "synthetic-text": DatasetSpec(("sequence",), False, _load_synthetic_text,
                                  "token sequences labelled by topic (synthetic)"),
}


def _graph_job(name: str) -> Callable:
    def load(path, data_args, task):
        raise TrainConfigError(f"dataset {name!r} is a graph: its jobs run through luoshu.gnn.job.train_node_job, "
                               "not the Trainer")
    return load


# graphs for the "node" task (gcn, graphsage, gat); `train` hands these jobs to luoshu.gnn.job
DATASETS.update({name: DatasetSpec(("node",), name in ("edge-list", "ogb"), _graph_job(name), help)
                 for name, help in describe_datasets().items()})

