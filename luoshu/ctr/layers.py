"""The dense layers and losses of HugeCTR's `Layer_t`, built as luoshu ops and modules.

`build_layer(builder, index, layer, inputs)` checks a layer's inputs (count, ranks, sizes),
creates its parameters on first use (`builder.module`) and returns its output tensors.
Every check names the layer (index, type, top names) and the field at fault. Shapes follow
HugeCTR's layer book: InnerProduct works on the last axis, Reshape turns (batch, slots, vec)
into (batch·slots·vec / leading_dim, leading_dim), FmOrder2 reduces (batch, slots·k) to
(batch, k), Interaction gives DLRM's dense vector, the strictly lower triangle of the
(features + 1)² dot products and one zero pad column, and the losses fuse the sigmoid or
softmax.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from luoshu import ops
from luoshu.core.errors import Error
from luoshu.core.tensor import make_constant
from luoshu.ctr.config import Activation_t, CTRError, DenseLayer, Initializer_t, Layer_t, Regularizer_t
from luoshu.models.recommendation import CrossNetwork
from luoshu.nn import functional as F
from luoshu.nn import init
from luoshu.nn.layers import Linear, empty_parameter
from luoshu.nn.module import Module
from luoshu.nn.norm import BatchNorm1d, LayerNorm


class Builder:
    """What a layer builder needs: the network that owns parameters, and train or eval mode."""

    def __init__(self, network: Module, training: bool):
        self.network, self.training = network, training

    def module(self, name: str, factory: Callable[[], Module]) -> Module:
        existing = self.network._modules.get(name)
        if existing is None:
            existing = factory()
            self.network.add_module(name, existing)
        return existing


def _init_param(p, kind: Initializer_t, fan_in: int, fan_out: int, default: Callable | None = None) -> None:
    """HugeCTR's initializers: Uniform ±1/sqrt(fan_in), Xavier normal / uniform, Zero; Default keeps
    the layer's own (torch-style) initialisation unless `default` says otherwise."""
    if kind is Initializer_t.Default:
        if default is not None:
            default(p)
    elif kind is Initializer_t.Zero:
        init.zeros_(p)
    elif kind is Initializer_t.Uniform:
        bound = 1 / math.sqrt(max(fan_in, 1))
        init.uniform_(p, -bound, bound)
    elif kind is Initializer_t.XavierUniform:
        bound = math.sqrt(6 / max(fan_in + fan_out, 1))
        init.uniform_(p, -bound, bound)
    elif kind is Initializer_t.XavierNorm:
        init.normal_(p, 0.0, math.sqrt(2 / max(fan_in + fan_out, 1)))


class _Where:
    def __init__(self, index: int, layer: DenseLayer, kind: Layer_t):
        self.text = f"layer {index} ({kind.name} -> {', '.join(layer.top_names) or '?'})"

    def fail(self, msg: str) -> CTRError:
        return CTRError(f"{self.text}: {msg}")


def _shape(x) -> tuple:
    return tuple(x.shape)


def _count(where, names, xs, n=None, at_least=None):
    if n is not None and len(xs) != n:
        raise where.fail(f"bottom_names: expected {n} input(s), found {len(xs)} {names}")
    if at_least is not None and len(xs) < at_least:
        raise where.fail(f"bottom_names: expected at least {at_least} inputs, found {len(xs)} {names}")


def _same_shapes(where, names, xs):
    shapes = [_shape(x)[1:] for x in xs]
    if len(set(shapes)) > 1:
        raise where.fail("shape mismatch between bottom_names " + ", ".join(
            f"{n} {('batch',) + s}" for n, s in zip(names, shapes)) + "; they must have the same shape")


def _linear(b, name, where, x, n_out, p, relu=False):
    n_in = _shape(x)[-1]
    def make():
        m = Linear(n_in, n_out)
        _init_param(m.weight, p["weight_init_type"], n_in, n_out)
        _init_param(m.bias, p["bias_init_type"], n_in, n_out)
        return m
    m = b.module(name, make)
    if m.in_features != n_in:
        raise where.fail(f"input has {n_in} features, the layer was built for {m.in_features}")
    y = m(x)
    return ops.relu(y) if relu else y


class LowRankCross(Module):
    """DCN v2 cross layers with W = U V of rank `projection_dim`: x ← x0 ⊙ (U V x + b) + x."""

    def __init__(self, dim: int, num_layers: int, rank: int):
        super().__init__()
        self.num_layers = num_layers
        for i in range(num_layers):
            setattr(self, f"v{i}", Linear(dim, rank, bias=False))
            setattr(self, f"u{i}", Linear(rank, dim))

    def forward(self, x0):
        x = x0
        for i in range(self.num_layers):
            x = x0 * getattr(self, f"u{i}")(getattr(self, f"v{i}")(x)) + x
        return x


def _multicross(b, name, where, x, p):
    n, layers, rank = _shape(x)[-1], p["num_layers"], p["projection_dim"]
    if len(_shape(x)) != 2:
        raise where.fail(f"input must be (batch, features), found {('batch',) + _shape(x)[1:]}")
    if not isinstance(layers, int) or layers < 1:
        raise where.fail(f"num_layers: expected a positive integer, found {layers!r}")
    def make():
        if rank:
            return LowRankCross(n, layers, rank)
        m = CrossNetwork(n, layers, "v1")
        for i in range(layers):
            _init_param(getattr(m, f"weight{i}"), p["weight_init_type"], n, 1)
            _init_param(getattr(m, f"bias{i}"), p["bias_init_type"], n, 1)
        return m
    return b.module(name, make)(x)


class _WeightMultiply(Module):
    def __init__(self, slots: int, vec: int, kind: Initializer_t):
        super().__init__()
        self.weight = empty_parameter((slots, vec))
        _init_param(self.weight, kind, slots, vec, default=lambda w: init.xavier_uniform_(w))

    def forward(self, x):
        return ops.reshape(ops.unsqueeze(x, 2) * self.weight, (-1, self.weight.shape[0] * self.weight.shape[1]))


def _interaction(where, names, xs):
    _count(where, names, xs, n=2)
    dense, emb = xs
    if len(_shape(dense)) != 2 or len(_shape(emb)) != 3 or _shape(dense)[1] != _shape(emb)[2]:
        raise where.fail(f"shape mismatch: Interaction takes (batch, d) and (batch, features, d), found "
                         f"{names[0]} {('batch',) + _shape(dense)[1:]} and {names[1]} {('batch',) + _shape(emb)[1:]}")
    n = _shape(emb)[1] + 1
    feats = ops.concat([ops.unsqueeze(dense, 1), emb], axis=1)
    dots = ops.reshape(ops.matmul(feats, ops.transpose(feats, 1, 2)), (-1, n * n))
    rows, cols = np.tril_indices(n, k=-1)
    lower = ops.index_select(dots, 1, _index_tensor(rows * n + cols))
    pad = ops.zeros_like(ops.index_select(dense, 1, _index_tensor(np.zeros(1, np.int64))))
    return ops.concat([dense, lower, pad], axis=1)


def _index_tensor(values: np.ndarray):
    return make_constant(np.asarray(values, dtype=np.int64))


def _regularizer(p, dense_weights) -> object | None:
    if not p["use_regularizer"] or not p["lambda"] or not dense_weights:
        return None
    lam = float(p["lambda"])
    if p["regularizer_type"] is Regularizer_t.L1:
        return lam * sum((ops.sum(ops.abs(w)) for w in dense_weights[1:]), ops.sum(ops.abs(dense_weights[0])))
    return 0.5 * lam * sum((ops.sum(w * w) for w in dense_weights[1:]), ops.sum(dense_weights[0] * dense_weights[0]))


def build_layer(b: Builder, index: int, layer: DenseLayer, kind: Layer_t, p: dict, xs: list,
                dense_weights: Callable[[], list]) -> tuple[list, dict]:
    """Builds one dense layer; returns its outputs and, for a loss, {"loss", "prediction", "label"}."""
    where = _Where(index, layer, kind)
    names = layer.bottom_names
    name = "_".join(layer.top_names) or f"layer{index}"
    name = "".join(c if c.isalnum() or c == "_" else "_" for c in name)
    K = Layer_t
    try:
        if kind in (K.InnerProduct, K.FusedInnerProduct):
            _count(where, names, xs, n=1)
            n_out = p["num_output"]
            if not isinstance(n_out, int) or n_out < 1:
                raise where.fail(f"num_output: expected a positive integer, found {n_out!r}")
            return [_linear(b, name, where, xs[0], n_out, p, relu=kind is K.FusedInnerProduct)], {}
        if kind is K.MLP:
            _count(where, names, xs, at_least=1)
            outs = list(p["num_outputs"])
            if not outs:
                raise where.fail("num_outputs: expected a list of layer sizes, found none")
            acts = list(p["activations"]) or [p["act_type"]] * len(outs)
            if len(acts) != len(outs):
                raise where.fail(f"activations: expected {len(outs)} entries, found {len(acts)}")
            x = xs[0]
            for i, (n_out, act) in enumerate(zip(outs, acts)):
                x = _linear(b, f"{name}_{i}", where, x, n_out, p, relu=act is Activation_t.Relu)
            return [x], {}
        if kind in (K.ReLU, K.Sigmoid, K.ELU, K.Softmax):
            _count(where, names, xs, n=1)
            x = xs[0]
            return [{K.ReLU: ops.relu, K.Sigmoid: ops.sigmoid, K.Softmax: lambda t: F.softmax(t, -1),
                     K.ELU: lambda t: ops.elu(t, p["elu_alpha"])}[kind](x)], {}
        if kind is K.Dropout:
            _count(where, names, xs, n=1)
            rate = p["dropout_rate"]
            if not 0 <= rate < 1:
                raise where.fail(f"dropout_rate: expected a value in [0, 1), found {rate!r}")
            return [F.dropout(xs[0], rate, b.training) if rate else xs[0]], {}
        if kind is K.Concat:
            _count(where, names, xs, at_least=1)
            axis, rank = p["axis"], len(_shape(xs[0]))
            if not 1 <= axis < rank:
                raise where.fail(f"axis: expected 1 <= axis < {rank}, found {axis}")
            for n, x in zip(names, xs):
                s, s0 = _shape(x), _shape(xs[0])
                if len(s) != rank or s[1:axis] + s[axis + 1:] != s0[1:axis] + s0[axis + 1:]:
                    raise where.fail(f"shape mismatch: {n} is {('batch',) + s[1:]}, {names[0]} is "
                                     f"{('batch',) + s0[1:]}; all but axis {axis} must agree")
            return [ops.concat(xs, axis=axis) if len(xs) > 1 else xs[0]], {}
        if kind is K.Reshape:
            _count(where, names, xs, n=1)
            x = xs[0]
            if p["selected"]:
                slots = [int(s) for s in p["selected_slots"]]
                if len(_shape(x)) != 3 or not slots or max(slots) >= _shape(x)[1] or min(slots) < 0:
                    raise where.fail(f"selected_slots: expected slots of a (batch, slots, vec) input, found "
                                     f"{slots} for {('batch',) + _shape(x)[1:]}")
                x = ops.index_select(x, 1, _index_tensor(np.array(slots)))
            per_sample = int(np.prod(_shape(x)[1:]))
            lead = p["leading_dim"] or per_sample
            step = p["time_step"]
            # rows may regroup across the batch (DeepFM: (batch·slots, 10) back to (batch, slots·10))
            if (per_sample % lead and lead % per_sample) or (step and per_sample % (lead * step)):
                raise where.fail(f"leading_dim: {lead}{f' x time_step {step}' if step else ''} must divide the "
                                 f"{per_sample} values per sample of {names[0]} {('batch',) + _shape(xs[0])[1:]}")
            return [ops.reshape(x, (-1, step, lead) if step else (-1, lead))], {}
        if kind is K.Slice:
            _count(where, names, xs, n=1)
            ranges = [tuple(r) for r in p["ranges"]]
            width = _shape(xs[0])[-1]
            if len(ranges) != len(layer.top_names):
                raise where.fail(f"ranges: {len(ranges)} range(s) for {len(layer.top_names)} top_names")
            for r in ranges:
                if len(r) != 2 or not 0 <= r[0] < r[1] <= width:
                    raise where.fail(f"ranges: {r} is not a range [a, b) within the last dimension ({width})")
            return [xs[0][..., a:c] for a, c in ranges], {}
        if kind is K.MultiCross:
            _count(where, names, xs, n=1)
            return [_multicross(b, name, where, xs[0], p)], {}
        if kind is K.FmOrder2:
            _count(where, names, xs, n=1)
            k, width = p["out_dim"], _shape(xs[0])[-1]
            if not isinstance(k, int) or k < 1 or width % k or len(_shape(xs[0])) != 2:
                raise where.fail(f"out_dim: {k!r} must be a positive divisor of the (batch, slots * out_dim) "
                                 f"input's {width} features")
            v = ops.reshape(xs[0], (-1, width // k, k))
            summed = ops.sum(v, axis=1)
            return [0.5 * (summed * summed - ops.sum(v * v, axis=1))], {}
        if kind is K.WeightMultiply:
            _count(where, names, xs, n=1)
            dims = list(p["weight_dims"])
            if len(dims) != 2 or _shape(xs[0])[1:] != (dims[0],):
                raise where.fail(f"weight_dims: {dims} must be [slot_dim, vec_dim] with slot_dim the input's "
                                 f"{_shape(xs[0])[1:]} features")
            return [b.module(name, lambda: _WeightMultiply(dims[0], dims[1], p["weight_init_type"]))(xs[0])], {}
        if kind in (K.DotProduct, K.ElementwiseMultiply, K.Add, K.Sub):
            if kind in (K.ElementwiseMultiply, K.Sub):
                _count(where, names, xs, n=2)
            else:
                _count(where, names, xs, at_least=2)
            _same_shapes(where, names, xs)
            out = xs[0]
            for x in xs[1:]:
                out = out - x if kind is K.Sub else (out + x if kind is K.Add else out * x)
            return [out], {}
        if kind in (K.ReduceSum, K.ReduceMean):
            _count(where, names, xs, n=1)
            axis, rank = p["axis"], len(_shape(xs[0]))
            if not 0 <= axis < rank:
                raise where.fail(f"axis: expected 0 <= axis < {rank}, found {axis}")
            fn = ops.sum if kind is K.ReduceSum else ops.mean
            return [fn(xs[0], axis=axis, keepdims=True)], {}
        if kind is K.Interaction:
            out = _interaction(where, names, xs)
            return [out] * len(layer.top_names), {}
        if kind is K.BatchNorm:
            _count(where, names, xs, n=1)
            n = _shape(xs[0])[1]
            def make():
                m = BatchNorm1d(n, eps=p["eps"], momentum=p["factor"])
                _init_param(m.weight, p["gamma_init_type"], n, n)
                _init_param(m.bias, p["beta_init_type"], n, n)
                return m
            m = b.module(name, make)
            m.train(b.training)
            return [m(xs[0])], {}
        if kind is K.LayerNorm:
            _count(where, names, xs, n=1)
            n = _shape(xs[0])[-1]
            def make():
                m = LayerNorm(n, eps=p["eps"])
                _init_param(m.weight, p["gamma_init_type"], n, n)
                _init_param(m.bias, p["beta_init_type"], n, n)
                return m
            return [b.module(name, make)(xs[0])], {}
        if kind in (K.BinaryCrossEntropyLoss, K.CrossEntropyLoss, K.MultiCrossEntropyLoss):
            _count(where, names, xs, n=2)
            logits, label = xs
            ls, ys = _shape(logits), _shape(label)
            if kind is K.BinaryCrossEntropyLoss:
                if ls[1:] != (1,) or ys[1:] != (1,):
                    raise where.fail(f"shape mismatch: BinaryCrossEntropyLoss takes (batch, 1) logits and labels, "
                                     f"found {names[0]} {('batch',) + ls[1:]} and {names[1]} {('batch',) + ys[1:]}")
                loss = F.binary_cross_entropy_with_logits(logits, label)
                prediction = ops.sigmoid(logits)
            elif kind is K.CrossEntropyLoss:
                if ls[1:] != (2,) or ys[1:] not in ((1,), (2,)):
                    raise where.fail(f"shape mismatch: CrossEntropyLoss takes (batch, 2) logits and (batch, 1) class "
                                     f"labels, found {names[0]} {('batch',) + ls[1:]} and {names[1]} "
                                     f"{('batch',) + ys[1:]}")
                target = ops.argmax(label, axis=1) if ys[1:] == (2,) else ops.cast(ops.reshape(label, (-1,)), "int64")
                loss = F.cross_entropy(logits, target)
                prediction = F.softmax(logits, -1)[:, 1:2]
                label = ops.cast(ops.unsqueeze(target, 1), "float32")
            else:
                if ls[1:] != ys[1:] or len(ls) != 2:
                    raise where.fail(f"shape mismatch: MultiCrossEntropyLoss takes (batch, n) logits and labels, "
                                     f"found {names[0]} {('batch',) + ls[1:]} and {names[1]} {('batch',) + ys[1:]}")
                weights = list(p["target_weight_vec"]) or [1.0] * ls[1]
                if len(weights) != ls[1]:
                    raise where.fail(f"target_weight_vec: expected {ls[1]} weights, found {len(weights)}")
                per = F.binary_cross_entropy_with_logits(logits, label, reduction="none")
                loss = ops.mean(per * _index_tensor_f(weights))
                prediction = ops.sigmoid(logits)
            reg = _regularizer(p, dense_weights())
            if reg is not None:
                loss = loss + reg
            return [loss], {"loss": loss, "prediction": prediction, "label": label}
    except CTRError:
        raise
    except Error as exc:  # an op's own shape / dtype rule, re-raised naming the layer
        raise where.fail(f"bottom_names {names}: {exc}") from None
    raise where.fail("not built")  # unreachable: resolved() admits only SUPPORTED_LAYERS


def _index_tensor_f(values):
    return make_constant(np.asarray(values, dtype=np.float32))
