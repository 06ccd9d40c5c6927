"""Dense layers and multi-hot embeddings of luoshu.ctr against NumPy / torch written from HugeCTR's layer book."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from luoshu import ctr as hugectr
from tests.ctr.conftest import DENSE, SLOTS

L = hugectr.Layer_t
VEC = 4


def _model(parquet_data, combiner):
    solver = hugectr.CreateSolver(batchsize=64, batchsize_eval=64, max_eval_batches=1, seed=1)
    reader = hugectr.DataReaderParams(data_reader_type=hugectr.DataReaderType_t.Parquet,
                                      source=[str(parquet_data[0])], eval_source=str(parquet_data[1]),
                                      slot_size_array=SLOTS)
    model = hugectr.Model(solver, reader, hugectr.CreateOptimizer(optimizer_type=hugectr.Optimizer_t.SGD))
    model.add(hugectr.Input(label_dim=1, label_name="label", dense_dim=DENSE, dense_name="dense",
                            data_reader_sparse_param_array=[hugectr.DataReaderSparseParam("data1", 3, False,
                                                                                          len(SLOTS))]))
    model.add(hugectr.SparseEmbedding(embedding_type=hugectr.Embedding_t.LocalizedSlotSparseEmbeddingHash,
                                      workspace_size_per_gpu_in_mb=1, embedding_vec_size=VEC, combiner=combiner,
                                      sparse_embedding_name="emb", bottom_name="data1"))
    add = lambda kind, bottoms, tops, **kw: model.add(hugectr.DenseLayer(layer_type=kind, bottom_names=bottoms,  # noqa: E731
                                                                         top_names=tops, **kw))
    add(L.Reshape, ["emb"], ["flat"], leading_dim=VEC * len(SLOTS))
    add(L.FmOrder2, ["flat"], ["fm"], out_dim=VEC)
    add(L.InnerProduct, ["dense"], ["fc_d"], num_output=VEC)
    add(L.Interaction, ["fc_d", "emb"], ["inter"])
    add(L.Concat, ["flat", "dense"], ["c1"])
    add(L.MultiCross, ["c1"], ["mc"], num_layers=3, bias_init_type=hugectr.Initializer_t.Uniform)
    add(L.Slice, ["mc"], ["s1", "s2"], ranges=[(0, 10), (10, 36)])
    add(L.ReduceSum, ["s2"], ["rs"], axis=1)
    add(L.WeightMultiply, ["dense"], ["wm"], weight_dims=[DENSE, 2])
    add(L.DotProduct, ["fm", "fc_d"], ["dp"])
    add(L.Add, ["fm", "fc_d", "dp"], ["sum3"])
    add(L.Concat, ["inter", "sum3", "s1", "rs", "wm"], ["c2"])
    add(L.InnerProduct, ["c2"], ["logit"], num_output=1)
    add(L.BinaryCrossEntropyLoss, ["logit", "label"], ["loss"])
    model.compile()
    return model


def _inputs(n=16, seed=0):
    rng = np.random.default_rng(seed)
    dense = rng.standard_normal((n, DENSE)).astype(np.float32)
    sparse = np.stack([rng.integers(0, s, (n, 3)) for s in SLOTS], axis=1)
    sparse[rng.random(sparse.shape) < 0.3] = -1  # short slots: padding
    sparse[0, 0] = -1  # one empty slot
    return dense, sparse


@pytest.mark.parametrize("combiner", ["sum", "mean"])
def test_dense_layers_match_numpy(parquet_data, combiner):
    model = _model(parquet_data, combiner)
    dense, sparse = _inputs()
    out = lambda name: model.check_out_tensor(name, dense=dense, sparse=sparse).astype(np.float64)  # noqa: E731
    p = {k: v.numpy().astype(np.float64) for k, v in model.network.state_dict().items()}

    # multi-hot embedding: torch EmbeddingBag over each slot's keys (+ slot offsets), padding skipped
    table = torch.from_numpy(model.tables[0].emb_vector.numpy()[:-1])
    offsets = np.concatenate([[0], np.cumsum(SLOTS)[:-1]])
    emb = np.zeros((len(dense), len(SLOTS), VEC))
    for b in range(len(dense)):
        for s in range(len(SLOTS)):
            keys = sparse[b, s][sparse[b, s] >= 0] + offsets[s]
            if len(keys):
                bag = torch.nn.functional.embedding_bag(torch.from_numpy(keys), table, torch.tensor([0]),
                                                        mode=combiner)
                emb[b, s] = bag[0].numpy()
    np.testing.assert_allclose(out("emb"), emb, rtol=1e-5, atol=1e-6)

    flat = emb.reshape(len(dense), -1)
    v = flat.reshape(len(dense), len(SLOTS), VEC)
    fm = 0.5 * (v.sum(1) ** 2 - (v ** 2).sum(1))  # FM second order, per latent dimension
    np.testing.assert_allclose(out("fm"), fm, rtol=1e-4, atol=1e-6)

    fc_d = dense @ p["fc_d.weight"].T + p["fc_d.bias"]
    np.testing.assert_allclose(out("fc_d"), fc_d, rtol=1e-5, atol=1e-6)

    feats = np.concatenate([fc_d[:, None], emb], axis=1)  # DLRM interaction: dense, lower triangle, one zero pad
    dots = feats @ feats.transpose(0, 2, 1)
    rows, cols = np.tril_indices(len(SLOTS) + 1, -1)
    inter = np.concatenate([fc_d, dots[:, rows, cols], np.zeros((len(dense), 1))], axis=1)
    assert out("inter").shape == (len(dense), VEC + (len(SLOTS) + 1) * len(SLOTS) // 2 + 1)
    np.testing.assert_allclose(out("inter"), inter, rtol=1e-4, atol=1e-6)

    x0 = x = np.concatenate([flat, dense], axis=1)  # DCN v1: x_{l+1} = x0 x_l^T w_l + b_l + x_l
    for i in range(3):
        x = x0 * (x @ p[f"mc.weight{i}"])[:, None] + p[f"mc.bias{i}"] + x
    np.testing.assert_allclose(out("mc"), x, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out("s1"), x[:, :10], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out("rs"), x[:, 10:].sum(1, keepdims=True), rtol=1e-4, atol=1e-4)

    wm = (dense[:, :, None] * p["wm.weight"][None]).reshape(len(dense), -1)
    np.testing.assert_allclose(out("wm"), wm, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out("dp"), fm * fc_d, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out("sum3"), fm + fc_d + fm * fc_d, rtol=1e-4, atol=1e-6)


def _loss_model(parquet_data, loss, head, **kw):
    solver = hugectr.CreateSolver(batchsize=64, batchsize_eval=64, max_eval_batches=1)
    reader = hugectr.DataReaderParams(data_reader_type=hugectr.DataReaderType_t.Parquet,
                                      source=[str(parquet_data[0])], eval_source=str(parquet_data[1]),
                                      slot_size_array=SLOTS)
    model = hugectr.Model(solver, reader, hugectr.CreateOptimizer())
    model.add(hugectr.Input(label_dim=1, label_name="label", dense_dim=DENSE, dense_name="dense",
                            data_reader_sparse_param_array=[hugectr.DataReaderSparseParam("data1", 1, True,
                                                                                          len(SLOTS))]))
    model.add(hugectr.SparseEmbedding(embedding_type=hugectr.Embedding_t.DistributedSlotSparseEmbeddingHash,
                                      workspace_size_per_gpu_in_mb=1, embedding_vec_size=2, combiner="sum",
                                      sparse_embedding_name="emb", bottom_name="data1"))
    model.add(hugectr.DenseLayer(layer_type=L.InnerProduct, bottom_names=["dense"], top_names=["logit"],
                                 num_output=head))
    model.add(hugectr.DenseLayer(layer_type=loss, bottom_names=["logit", "label"], top_names=["loss"], **kw))
    model.compile()
    return model


def test_losses_and_l2_regularizer_match_torch(parquet_data):
    dense, sparse = _inputs(8)
    label = np.zeros((8, 1), np.float32)  # predict_batch / check_out_tensor feed zero labels
    model = _loss_model(parquet_data, L.BinaryCrossEntropyLoss, 1, use_regularizer=True,
                        regularizer_type=hugectr.Regularizer_t.L2, **{"lambda": 0.1})
    logit = torch.from_numpy(model.check_out_tensor("logit", dense=dense, sparse=sparse[:, :, 0]))
    w = torch.from_numpy(model.network.state_dict()["logit.weight"].numpy())
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logit, torch.from_numpy(label)) + \
        0.05 * (w * w).sum()
    assert model.check_out_tensor("loss", dense=dense, sparse=sparse[:, :, 0]) == pytest.approx(float(expected),
                                                                                                  rel=1e-5)
    np.testing.assert_allclose(model.predict_batch(dense, sparse[:, :, 0]), torch.sigmoid(logit).numpy(), rtol=1e-6)

    model = _loss_model(parquet_data, L.CrossEntropyLoss, 2)
    logit = torch.from_numpy(model.check_out_tensor("logit", dense=dense, sparse=sparse[:, :, 0]))
    expected = torch.nn.functional.cross_entropy(logit, torch.zeros(8, dtype=torch.long))
    assert model.check_out_tensor("loss", dense=dense, sparse=sparse[:, :, 0]) == pytest.approx(float(expected),
                                                                                                  rel=1e-5)
    np.testing.assert_allclose(model.predict_batch(dense, sparse[:, :, 0])[:, 0],
                               torch.softmax(logit, 1)[:, 1].numpy(), rtol=1e-5)
