"""Every ONNX mapping of luoshu.onnx against onnxruntime: one small graph per case, two batch sizes;
a mapping no case exercises fails the coverage test."""

from __future__ import annotations

import numpy as np
import pytest

import luoshu as ls
from luoshu import onnx as lonnx
from luoshu.nn import functional as F
from luoshu.nn.module import Module
from luoshu.serving.package import trace
from tests.onnx.test_export import _session

O = ls.ops


def _f(*shape):
    return lambda rng, b: rng.standard_normal((b, *shape)).astype(np.float32)


def _pos(*shape):
    return lambda rng, b: rng.uniform(0.5, 2.0, (b, *shape)).astype(np.float32)


def _ints(high, *shape):
    return lambda rng, b: rng.integers(0, high, (b, *shape))


W = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)  # a weight used by several cases
BIAS = np.random.default_rng(1).standard_normal(5).astype(np.float32)


def _w(a=W):
    return ls.tensor(a)


# label -> (fn(*inputs) -> tensor or tuple, [input makers])
CASES = {
    "unary": (
        lambda x: (
            O.abs(x)
            + O.neg(x)
            + O.relu(x)
            + O.sigmoid(x)
            + O.tanh(x)
            + O.exp(x)
            + O.sin(x)
            + O.cos(x)
            + O.erf(x)
            + O.sign(x)
            + F.silu(x)
        ),
        [_f(3, 4)],
    ),
    "unary_positive": (lambda x: O.log(x) + O.sqrt(x) + O.rsqrt(x) + O.log1p(x), [_pos(3, 4)]),
    "activations": (
        lambda x: (
            F.gelu(x)
            + F.gelu(x, approximate="tanh")
            + F.leaky_relu(x, 0.2)
            + F.elu(x, 0.7)
            + F.softplus(x * 8, beta=2.0, threshold=5.0)
        ),
        [_f(3, 4)],
    ),
    "binary": (
        lambda x, y: (
            O.add(x, y) * O.sub(x, y) / (O.maximum(x, y).abs() + 1.0) + O.minimum(x, y) + O.pow(x.abs() + 1.0, 1.5)
            + O.add_n(x, y, x * y)
        ),
        [_f(3, 4), _f(3, 4)],
    ),
    "broadcast_and_scalars": (lambda x: (x * 2.5 - 1.0) / ls.tensor(np.ones(4, np.float32) * 3.0), [_f(3, 4)]),
    "compare_logical": (
        lambda x, y: (
            O.where(O.logical_or(O.logical_and(x > y, x >= 0.0), O.logical_xor(x < y, O.logical_not(x <= 0.5))), x, y)
            + O.cast(O.equal(x, x), "float32")
            + O.cast(O.not_equal(x, y), "float32")
        ),
        [_f(3, 4), _f(3, 4)],
    ),
    "clamp_cast": (
        lambda x: (
            O.clamp(x, -0.5, 0.5)
            + O.clamp(x, min=0.0)
            + O.clamp(x, max=0.1)
            + O.cast(O.cast(x * 10, "int64"), "float32")
        ),
        [_f(3, 4)],
    ),
    "linear_matmul": (
        lambda x, y: (
            F.linear(x, _w(), ls.tensor(BIAS)).sum(axis=-1, keepdims=True)
            + O.matmul(x, O.transpose(y, 1, 2)).mean(axis=-1, keepdims=True)
        ),
        [_f(3, 4), _f(3, 4)],
    ),
    "linear_2d": (
        lambda x: F.linear(x, _w()) + O.addmm(ls.tensor(BIAS), x, O.transpose(_w(), 0, 1), beta=0.5, alpha=2.0),
        [_f(4)],
    ),
    "einsum": (lambda x, y: O.einsum("bij,bkj->bik", x, y), [_f(3, 4), _f(2, 4)]),
    "reductions": (
        lambda x: O.stack(
            [
                O.sum(x, axis=(1, 2)),
                O.mean(x, axis=1).sum(axis=1),
                O.max(x, axis=2).min(axis=1),
                O.prod(x, axis=-1).sum(axis=1),
                O.logsumexp(x, axis=(1, 2)),
                O.var(x, axis=(1, 2)),
                O.std(x, axis=2).sum(axis=1),
                O.norm(x, axis=(1, 2)),
            ],
            axis=1,
        ),
        [_f(3, 4)],
    ),
    "full_reductions": (lambda x: O.sum(x) + O.mean(x) + O.max(x) + O.sum(x, axis=()), [_f(3, 4)]),
    "int_reductions": (lambda i: O.sum(i, axis=1) + O.cast(O.mean(i, axis=1), "int64"), [_ints(9, 5)]),
    "arg": (
        lambda x: (
            O.argmax(x, axis=1).sum(axis=1)
            + O.argmin(x, axis=2, keepdims=True).sum(axis=(1, 2))
            + O.argmax(O.reshape(x, (-1, 12)), axis=1)
        ),
        [_f(3, 4)],
    ),
    "softmax_cumsum": (lambda x: F.softmax(x, -1) + F.log_softmax(x, 1) + O.cumsum(x, axis=2), [_f(3, 4)]),
    "norms": (
        lambda x: (
            F.layer_norm(x, (4,), _w(np.arange(4, dtype=np.float32)), _w(np.ones(4, np.float32)))
            + F.layer_norm(x, (3, 4))
            + F.group_norm(x, 1)
        ),
        [_f(3, 4)],
    ),
    "group_norm": (
        lambda x: F.group_norm(x, 2, _w(np.arange(4, dtype=np.float32)), _w(np.ones(4, np.float32))),
        [_f(4, 3, 2)],
    ),
    "batch_norm": (
        lambda x: (
            F.batch_norm(
                x,
                _w(np.linspace(-1, 1, 3).astype(np.float32)),
                _w(np.linspace(0.5, 2, 3).astype(np.float32)),
                _w(np.arange(3, dtype=np.float32)),
                _w(np.ones(3, np.float32)),
            )
            + F.batch_norm(x, _w(np.zeros(3, np.float32)), _w(np.ones(3, np.float32)))
        ),
        [_f(3, 5, 5)],
    ),
    "attention": (
        lambda q, k, v: (
            F.scaled_dot_product_attention(q, k, v) + F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)
        ),
        [_f(2, 5, 4)] * 3,
    ),
    "attention_masks": (
        lambda q, k, v, m: (
            F.scaled_dot_product_attention(q, k, v, attn_mask=m > 0.0)
            + F.scaled_dot_product_attention(q, k, v, attn_mask=m)
        ),
        [_f(2, 5, 4)] * 3 + [_f(1, 5, 5)],
    ),
    "conv_pool": (
        lambda x: (
            F.max_pool2d(
                F.conv2d(
                    x,
                    _w(np.ones((4, 3, 3, 3), np.float32) * 0.1),
                    _w(np.arange(4, dtype=np.float32)),
                    padding=1,
                    stride=2,
                ),
                2,
            )
            + F.avg_pool2d(x, 3, stride=2, padding=1, ceil_mode=True, count_include_pad=False)[:, :1, :2, :2]
            + F.avg_pool2d(x, 2)[:, :1, :2, :2]
        ),
        [_f(3, 8, 8)],
    ),
    "conv_dilated_grouped": (
        lambda x: F.conv2d(x, _w(np.ones((6, 1, 3, 3), np.float32)), dilation=2, groups=3),
        [_f(3, 8, 8)],
    ),
    "conv1d": (lambda x: F.conv1d(x, _w(np.ones((2, 3, 3), np.float32)), padding=1), [_f(3, 7)]),
    "max_pool_padded": (lambda x: F.max_pool2d(x, 3, stride=2, padding=1, dilation=1), [_f(2, 7, 7)]),
    "adaptive_pool": (lambda x: F.adaptive_avg_pool2d(x, (2, 3)) + F.adaptive_avg_pool2d(x, 1), [_f(2, 4, 6)]),
    "shapes": (
        lambda x: (
            O.reshape(O.permute(O.unsqueeze(x, 1), 0, 3, 1, 2), (-1, 12))
            + O.reshape(O.squeeze(O.unsqueeze(x, -1), -1), (-1, 12))
        ),
        [_f(3, 4)],
    ),
    "squeeze_all": (lambda x: O.squeeze(x[:, :1, :1], axis=(1, 2)), [_f(3, 4)]),
    "split_concat_stack": (
        lambda x: (
            O.concat([*O.split(x, 3, axis=2)[::-1], *O.split(x, [1, 6], axis=2)], axis=2)[:, :, 3:10]
            + O.stack(O.split(x, 2, axis=1), axis=1).reshape((-1, 4, 7))
        ),
        [_f(4, 7)],
    ),
    "slice_flip": (
        lambda x: (
            x[:, 1:3, ::-1]
            + x[:, ::2, :].sum(axis=1, keepdims=True)
            + O.flip(x, (1, 2))[:, 1:3]
            + x[:, -3:-1, :]
            + x[:, 3:0:-2, :]
        ),
        [_f(4, 4)],
    ),
    "broadcast": (
        lambda x, y: O.broadcast_to(x[:, :1], (-1, 3, 4)) + O.reshape_like(y, x) + O.broadcast_like(x[:, :1], x),
        [_f(3, 4), _f(12)],
    ),
    "repeat_pad_tri": (
        lambda x: (
            O.repeat(x, 1, 2, 1)[:, :3]
            + O.pad(x, (1, 0, 0, 0), value=2.0)[:, :, 1:]
            + O.pad(x, (1, 1), mode="reflect")[:, :, 1:-1]
            + O.tril(x)
            + O.triu(x, 1)
        ),
        [_f(3, 4)],
    ),
    "pad_edge": (lambda x: O.pad(x, (2, 1, 1, 0), mode="replicate").sum(axis=(2, 3)), [_f(3, 4, 4)]),
    "embedding_gathers": (lambda i: F.embedding(i, _w()).sum(axis=1) + O.index_select(_w(), 0, i[:, 0]), [_ints(5, 3)]),
    "gather_elements": (lambda x, i: O.gather(x, 1, i), [_f(5, 4), _ints(5, 2, 4)]),
    "embedding_bag": (
        lambda i: (
            F.embedding_bag(i, _w(), mode="sum", padding_idx=4)
            + F.embedding_bag(i, _w(), mode="mean", padding_idx=4)
            + F.embedding_bag(i, _w(), mode="mean")
        ),
        [_ints(5, 3)],
    ),
    "one_hot_likes": (
        lambda i: (
            O.cast(F.one_hot(i, 6), "float32").sum(axis=1)
            + O.zeros_like(O.cast(i[:, :1], "float32"))
            + O.ones_like(O.cast(i[:, :1], "float32"))
            + O.full_like(O.cast(i[:, :1], "float32"), 2.5)
        ),
        [_ints(6, 3)],
    ),
    "creation": (
        lambda x: x + O.zeros(3, 4) + O.ones(3, 4) + O.full((3, 4), 0.5) + O.eye(3, 4) + O.cast(O.arange(4), "float32"),
        [_f(3, 4)],
    ),
}


class _Case(Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *xs):
        return self.fn(*xs)


def _traced(label):
    fn, makers = CASES[label]
    rng = np.random.default_rng(0)
    example = {f"in{i}": m(rng, 2) for i, m in enumerate(makers)}
    return trace(_Case(fn), example), makers


@pytest.mark.parametrize("label", list(CASES))
def test_mapping_matches_onnxruntime(label, tmp_path):
    model, makers = _traced(label)
    path = lonnx.export(model, tmp_path / f"{label}.onnx")
    session = _session(path)
    for batch in (1, 3):
        rng = np.random.default_rng(batch)
        feeds = {f"in{i}": m(rng, batch) for i, m in enumerate(makers)}
        want = list(model(feeds).values())
        got = session.run(None, feeds)
        for g, w in zip(got, want):
            assert g.shape == w.shape and g.dtype == w.dtype
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=label)


def test_every_mapping_is_exercised():
    used = {op.opdef.name for label in CASES for op in _traced(label)[0].ops}
    assert sorted(set(lonnx.MAPPINGS) - used) == []


def test_training_mode_and_random_ops_are_refused(tmp_path):
    def training_norm(x):
        return F.batch_norm(x, _w(np.zeros(3, np.float32)), _w(np.ones(3, np.float32)), training=True)

    with pytest.raises(lonnx.OnnxExportError, match="op 'batch_norm'.*inference-mode"):
        lonnx.export(_Case(training_norm), tmp_path / "a.onnx", example_inputs=np.zeros((2, 3, 4), np.float32))
    with pytest.raises(lonnx.OnnxExportError, match="'dropout'"):
        lonnx.export(
            _Case(lambda x: F.dropout(x, 0.5, True)), tmp_path / "b.onnx", example_inputs=np.zeros((2, 3), np.float32)
        )
