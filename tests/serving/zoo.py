"""Small configurations of every model of the zoo (`luoshu.models.MODELS`, each ResNet depth by its
name), with input makers, shared by the package and ONNX tests."""

from __future__ import annotations

import os

import numpy as np

import luoshu as ls
from luoshu.models import build

_CTR = dict(dense_dim=3, slot_sizes=[5, 7, 4], embedding_dim=4, mlp_dims=(8, 6))


def _images(channels, size):
    return lambda rng, b: {"x": rng.standard_normal((b, channels, size, size)).astype(np.float32)}


def _ids(vocab, length):
    return lambda rng, b: {"ids": rng.integers(0, vocab, (b, length))}


def _padded_ids(rng, b):
    """Token ids with right padding (id 0) after a random number of real tokens."""
    ids = rng.integers(1, 40, (b, 7))
    lengths = rng.integers(1, 8, b)
    ids[np.arange(7)[None, :] >= lengths[:, None]] = 0
    return {"ids": ids}


def _bert_inputs(rng, b):
    mask = (rng.random((b, 8)) < 0.8).astype(np.int64)
    mask[:, 0] = 1  # every sequence has its [CLS] token
    return {
        "input_ids": rng.integers(0, 50, (b, 8)),
        "token_type_ids": rng.integers(0, 2, (b, 8)),
        "attention_mask": mask,
    }


def _ctr_inputs(rng, b):
    sizes = np.asarray(_CTR["slot_sizes"])
    return {
        "dense": rng.standard_normal((b, _CTR["dense_dim"])).astype(np.float32),
        "sparse": (rng.random((b, len(sizes))) * sizes).astype(np.int64),
    }


def _seq2seq_inputs(rng, b):
    src = rng.integers(1, 30, (b, 6))
    src[:, 4:][rng.random((b, 2)) < 0.5] = 0  # some trailing padding, masked out of attention
    return {"src": src, "tgt": rng.integers(1, 31, (b, 5))}


def _ncf_inputs(rng, b):
    return {"users": rng.integers(0, 10, b), "items": rng.integers(0, 12, b)}


# name -> (zoo name, config, inputs(rng, batch) -> {forward argument: array})
ZOO = {
    "mlp": (
        "mlp",
        dict(in_features=12, hidden=(16, 8), num_classes=3),
        lambda rng, b: {"x": rng.standard_normal((b, 12)).astype(np.float32)},
    ),
    "lenet": ("lenet", dict(image_size=12), _images(1, 12)),
    "resnet18": ("resnet18", dict(num_classes=5, width=8), _images(3, 16)),
    "resnet50": ("resnet50", dict(num_classes=5, width=4, stem="imagenet"), _images(3, 32)),
    "alexnet": ("alexnet", dict(num_classes=5, hidden=16), _images(3, 32)),
    "vgg16": ("vgg16", dict(num_classes=5, width=4, hidden=16), _images(3, 32)),
    "lstm": ("lstm", dict(vocab_size=40, embed_dim=8, hidden_size=8, num_layers=2, bidirectional=True), _padded_ids),
    "bert": (
        "bert",
        dict(
            vocab_size=50, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32, max_position_embeddings=16
        ),
        _bert_inputs,
    ),
    "transformer": (
        "transformer",
        dict(
            src_vocab_size=30,
            tgt_vocab_size=31,
            d_model=16,
            nhead=2,
            num_encoder_layers=1,
            num_decoder_layers=1,
            dim_feedforward=32,
            max_len=16,
        ),
        _seq2seq_inputs,
    ),
    "gpt2": ("gpt2", dict(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16), _ids(50, 8)),
    "llama": (
        "llama",
        dict(vocab_size=50, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=24, max_seq_len=16),
        _ids(50, 8),
    ),
    "wdl": ("wdl", _CTR, _ctr_inputs),
    "deepfm": ("deepfm", _CTR, _ctr_inputs),
    "dcn": ("dcn", {**_CTR, "num_cross_layers": 2}, _ctr_inputs),
    "dcn_v2": ("dcn", {**_CTR, "num_cross_layers": 2, "cross_type": "v2"}, _ctr_inputs),
    "dlrm": ("dlrm", {**_CTR, "bottom_mlp_dims": (8,)}, _ctr_inputs),
    "lr": ("lr", _CTR, _ctr_inputs),
    "ncf": ("ncf", dict(num_users=10, num_items=12, mlp_dims=(8, 4)), _ncf_inputs),
}


def make(name: str, seed: int = 0):
    """The model in eval mode, its batch norms given non-trivial running statistics."""
    zoo_name, config, _ = ZOO[name]
    ls.manual_seed(seed)
    model = build(zoo_name, **config)
    rng = np.random.default_rng(seed)
    for key, buffer in model.state_dict().items():
        if key.endswith("running_mean"):
            buffer.value.copy_(ls.tensor(rng.standard_normal(buffer.shape).astype(np.float32) * 0.1).value)
        elif key.endswith("running_var"):
            buffer.value.copy_(ls.tensor(rng.uniform(0.5, 2.0, buffer.shape).astype(np.float32)).value)
    return model.eval()


def inputs(name: str, batch: int, seed: int = 1) -> dict[str, np.ndarray]:
    return ZOO[name][2](np.random.default_rng(seed), batch)


def live_outputs(model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The live model's outputs, run eagerly (the reference a package must reproduce)."""
    with ls.no_grad():
        out = model(*[ls.tensor(v) for v in feeds.values()])
    return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]


# --- the HugeCTR-style DCN of luoshu.ctr ---------------------------------------------------------
def hugectr_dcn_files(folder, hashed: bool = False):
    """Trains the (shrunk) HugeCTR DCN quick start of tests/ctr for a few steps on generated Parquet
    data and saves it as HugeCTR does; returns (model, graph JSON, dense file, sparse files).
    `hashed`: without a slot_size_array, so keys get rows through the table's hash index."""
    from tests.ctr.conftest import dcn_model, generate

    source, eval_source = generate(folder, per_file=256, files=1)
    model = dcn_model(source, eval_source, batch=64)
    if hashed:
        model.reader_params.slot_size_array = []
    model.compile()
    cwd = os.getcwd()
    os.chdir(folder)  # fit() writes its metrics file into the working directory
    try:
        model.fit(max_iter=6, display=100, eval_interval=1000, snapshot=0, progress=False)
    finally:
        os.chdir(cwd)
    model.graph_to_json(folder / "dcn.json")
    dense, *sparse = model.save_params_to_files(str(folder / "dcn"), 6)
    return model, folder / "dcn.json", dense, sparse


def hugectr_inputs(rng, batch: int) -> dict[str, np.ndarray]:
    """Keys of the HugeCTR DCN's one sparse input (batch, 8 slots, 1), some empty (-1) or out of range."""
    from tests.ctr.conftest import DENSE, SLOTS

    sizes = np.asarray(SLOTS)
    keys = (rng.random((batch, len(sizes))) * sizes).astype(np.int64)
    keys[rng.random(keys.shape) < 0.1] = -1
    keys[rng.random(keys.shape) < 0.05] = 10**6
    return {"dense": rng.standard_normal((batch, DENSE)).astype(np.float32), "data1": keys[:, :, None]}


def hugectr_bag_model():
    """A compiled (untrained, data-less) luoshu.ctr model with multi-hot slots averaged per bag."""
    from luoshu import ctr as hugectr

    solver = hugectr.CreateSolver(batchsize=16, batchsize_eval=16, lr=0.01, seed=3)
    reader = hugectr.DataReaderParams(source=[""], slot_size_array=[6, 9, 4])  # no data: inference only
    model = hugectr.Model(solver, reader, hugectr.CreateOptimizer(optimizer_type=hugectr.Optimizer_t.SGD))
    model.add(
        hugectr.Input(
            label_dim=1,
            label_name="label",
            dense_dim=2,
            dense_name="dense",
            data_reader_sparse_param_array=[hugectr.DataReaderSparseParam("keys", 3, False, 3)],
        )
    )
    model.add(
        hugectr.SparseEmbedding(
            embedding_type=hugectr.Embedding_t.DistributedSlotSparseEmbeddingHash,
            workspace_size_per_gpu_in_mb=1,
            embedding_vec_size=4,
            combiner="mean",
            sparse_embedding_name="emb",
            bottom_name="keys",
        )
    )
    L = hugectr.Layer_t
    model.add(hugectr.DenseLayer(layer_type=L.Reshape, bottom_names=["emb"], top_names=["flat"], leading_dim=12))
    model.add(hugectr.DenseLayer(layer_type=L.Concat, bottom_names=["flat", "dense"], top_names=["x"]))
    model.add(hugectr.DenseLayer(layer_type=L.InnerProduct, bottom_names=["x"], top_names=["fc"], num_output=1))
    model.add(hugectr.DenseLayer(layer_type=L.BinaryCrossEntropyLoss, bottom_names=["fc", "label"], top_names=["loss"]))
    model.compile()
    return model


def hugectr_bag_inputs(rng, batch: int) -> dict[str, np.ndarray]:
    keys = (rng.random((batch, 3, 3)) * np.array([6, 9, 4])[None, :, None]).astype(np.int64)
    keys[rng.random(keys.shape) < 0.3] = -1  # short bags
    keys[:, 0, 0] = 0  # at least one key per sample
    return {"dense": rng.standard_normal((batch, 2)).astype(np.float32), "keys": keys}
