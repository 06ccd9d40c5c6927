"""Loss operators: cross entropy and nll (fused kernels), mse, l1, smooth l1, binary cross entropy.

Cross entropy and nll run as one fused kernel each way (softmax minus the smoothed target
in the backward). The others are composites of elementwise ops and reductions: their
kernels are memory-bound and tiny next to the model, and as composites they get second
order gradients for free.
"""

from __future__ import annotations

import torch

from luoshu.core import dtypes
from luoshu.core.errors import DTypeError, OpError
from luoshu.core.op import OpDef, apply, register
from luoshu.core.shapes import same_dim
from luoshu.core.tensor import TensorMeta
from luoshu.ops import _states
from luoshu.ops._states import Candidate, dup, split
from luoshu.ops._util import gradient_by_recompute

aten = torch.ops.aten

_REDUCTIONS = ("mean", "sum", "none")


def _check_reduction(name: str, reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise OpError(f"{name}: reduction must be one of {_REDUCTIONS}, found {reduction!r}")


def _class_target_shape(opdef, inputs):
    """(N, C, d1, ...) logits with (N, d1, ...) class indices, or same-shape probabilities."""
    x, target = inputs[0], inputs[1]
    if x.ndim < 1:
        raise opdef.shape_error(inputs, "input must have a class dimension")
    soft = dtypes.is_floating(target.dtype)
    if soft:
        ok = target.ndim == x.ndim and all(same_dim(a, b) for a, b in zip(x.shape, target.shape))
        rule = "soft-label target must have the input's shape"
    else:
        batch = x.shape[:1] + x.shape[2:] if x.ndim > 1 else ()
        ok = target.ndim == len(batch) and all(same_dim(a, b) for a, b in zip(batch, target.shape))
        rule = "class-index target must have the input's shape without the class dim (dim 1)"
    if not ok:
        raise opdef.shape_error(inputs, rule)
    if len(inputs) == 3:
        c = x.shape[1] if x.ndim > 1 else x.shape[0]
        if inputs[2].ndim != 1 or not same_dim(inputs[2].shape[0], c):
            raise opdef.shape_error(inputs, f"class weights must be ({c},)")
    return soft


def _loss_meta(x, target_shape, reduction, soft):
    if reduction != "none":
        return TensorMeta((), x.dtype)
    return TensorMeta(target_shape[:1] + target_shape[2:] if soft else target_shape, x.dtype)


_ATEN_REDUCTION = {"none": 0, "mean": 1, "sum": 2}


def _vocab_parallel_ok(io, attrs, n: int, inputs: int) -> bool:
    """2-D logits with a class count the group divides, integer targets, no class weights or smoothing."""
    logits, target = io.inputs[0], io.inputs[1]
    return (inputs == 2 and len(logits) == 2 and len(target) == 1 and _states.divisible(logits[1], n)
            and not attrs["label_smoothing"])


def _vocab_parallel_cross_entropy(x, target, attrs, shard):
    """Cross entropy of (N, C/n) logit blocks (Megatron's vocabulary-parallel loss): the row max
    (a max all-reduce) and the sum of exponentials are combined over the group, then the
    target's log-probability from the member that owns it; the full (N, C) logits never exist
    on one member."""
    from luoshu.ops import comm

    classes = x.shape[1]
    # the rows' maxima over the group only stabilise the exponentials (logp does not depend on
    # them); the backward is cross_entropy_backward's own localize, from logp
    shifted = x - comm.all_reduce(apply("max", x, axis=1, keepdims=True), reduce="max", group=shard.group)
    total = comm.all_reduce(apply("sum", apply("exp", shifted), axis=1, keepdims=True), group=shard.group)
    logp = shifted - apply("log", total)
    local = target - shard.index * classes
    inside = apply("logical_and", local >= 0, local < classes)
    safe = apply("unsqueeze", apply("where", inside, local, 0), axis=1)
    picked = apply("reshape", apply("gather", logp, safe, axis=1), shape=(-1,))
    picked = comm.all_reduce(picked * apply("cast", inside, dtype=x.dtype), group=shard.group)
    valid = apply("cast", target != attrs["ignore_index"], dtype=x.dtype)
    losses = -picked * valid
    total_weight = apply("sum", valid)
    if attrs["reduction"] == "mean":
        return apply("sum", losses) / total_weight, logp, total_weight
    if attrs["reduction"] == "sum":
        return apply("sum", losses), logp, total_weight
    return losses, logp, apply("zeros_like", total_weight)


def _fast_path(x, target, label_smoothing) -> bool:
    """2-D logits, class indices, no smoothing: torch's own nll kernels apply."""
    return x.ndim == 2 and not target.is_floating_point() and not label_smoothing


@register
class CrossEntropy(OpDef):
    """torch.nn.functional.cross_entropy: class indices or probabilities, weights,
    ignore_index, label smoothing, any reduction; inputs (logits, target[, weight]).

    Outputs (loss, log_softmax(logits), total_weight): the backward reuses the
    log-probabilities instead of recomputing them, as torch's own kernels do.
    """

    name = "cross_entropy"
    attrs = {"ignore_index": -100, "reduction": "mean", "label_smoothing": 0.0}
    autocast = "fp32"

    def deduce_states(self, input_ds, _io=None, **attrs):
        """Vocabulary-parallel: (N, C) logits split on the class dim, targets duplicate -> the
        loss duplicate, the log-probabilities split (see `localize`: the full logits never
        gather)."""
        n = _states.group_size(input_ds)
        if n is None or n == 1 or _io is None:
            return super().deduce_states(input_ds)
        cands = [Candidate((dup(n),) * len(input_ds), (dup(n), dup(n), dup(n)))]
        if _vocab_parallel_ok(_io, attrs, n, len(input_ds)):
            cands.append(Candidate((split(n, 1), dup(n)), (dup(n), split(n, 1), dup(n))))
        return _states.choose(self.name, cands, input_ds)

    def localize(self, inputs, attrs, input_ds, output_ds, shard):
        if _states.split_dim(input_ds[0]) != 1:
            return apply(self.name, *inputs, **attrs)
        return _vocab_parallel_cross_entropy(inputs[0], inputs[1], attrs, shard)

    def infer(self, inputs, ignore_index, reduction, label_smoothing):
        _check_reduction(self.name, reduction)
        if not 0.0 <= label_smoothing <= 1.0:
            raise OpError(f"cross_entropy: label_smoothing must be in [0, 1], found {label_smoothing}")
        x = inputs[0]
        if not dtypes.is_floating(x.dtype):
            raise DTypeError(f"cross_entropy: input must be floating point, found {x.dtype}")
        soft = _class_target_shape(self, inputs)
        return [_loss_meta(x, inputs[1].shape, reduction, soft), TensorMeta(x.shape, x.dtype),
                TensorMeta((), x.dtype)]

    @staticmethod
    def compute(x, target, weight=None, *, ignore_index, reduction, label_smoothing):
        class_dim = 1 if x.ndim > 1 else 0
        logp = torch.log_softmax(x, class_dim)
        if _fast_path(x, target, label_smoothing):
            loss, total_weight = aten.nll_loss_forward(logp, target, weight, _ATEN_REDUCTION[reduction],
                                                       ignore_index)
            return loss, logp, total_weight
        if target.is_floating_point() and target.dtype != x.dtype:
            target = target.to(x.dtype)
        loss = torch.nn.functional.cross_entropy(x, target, weight, ignore_index=ignore_index,
                                                 reduction=reduction, label_smoothing=label_smoothing)
        return loss, logp, x.new_zeros(())

    def gradient(self, op, grads):
        target = op.inputs[1]
        logp, total_weight = op.outputs[1], op.outputs[2]
        rest = [None] * (len(op.inputs) - 2)
        grad_x = grad_target = None
        if grads[0] is not None:
            out = apply("cross_entropy_backward", grads[0], logp, target, total_weight, *op.inputs[2:], **op.attrs)
            grad_x, grad_target = (out[0], out[1]) if dtypes.is_floating(target.dtype) else (out, None)
        if grads[1] is not None:  # the saved log-probabilities are used by a second-order gradient
            via_logp = apply("log_softmax_backward", grads[1], logp, axis=1 if logp.ndim > 1 else 0)
            grad_x = via_logp if grad_x is None else grad_x + via_logp
        return [grad_x, grad_target] + rest


def _class_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """A per-class vector shaped to broadcast over dim 1 of an ndim-rank input."""
    return t.reshape((1, -1) + (1,) * (ndim - 2)) if ndim > 1 else t


@register
class CrossEntropyBackward(OpDef):
    """d(cross_entropy)/d(logits) — and d/d(target) for soft labels — from the saved
    log-probabilities; inputs (grad, logp, target, total_weight[, weight])."""

    name = "cross_entropy_backward"
    attrs = CrossEntropy.attrs

    def deduce_states(self, input_ds, _io=None, **attrs):
        """(g, logp, target, total_weight): log-probabilities split on the class dim give the
        gradient split alike."""
        n = _states.group_size(input_ds)
        if n is None or n == 1 or _io is None:
            return super().deduce_states(input_ds)
        cands = [Candidate((dup(n),) * len(input_ds), (dup(n),))]
        io = _states.OpIO(_io.inputs[1:], _io.outputs)
        if _vocab_parallel_ok(io, attrs, n, len(input_ds) - 2):
            cands.append(Candidate((dup(n), split(n, 1), dup(n), dup(n)), (split(n, 1),)))
        return _states.choose(self.name, cands, input_ds)

    def localize(self, inputs, attrs, input_ds, output_ds, shard):
        if _states.split_dim(input_ds[1]) != 1:
            return apply(self.name, *inputs, **attrs)
        g, logp, target, total_weight = inputs
        classes = logp.shape[1]
        local = target - shard.index * classes
        inside = apply("logical_and", local >= 0, local < classes)
        safe = apply("where", inside, local, 0)
        onehot = apply("cast", apply("one_hot", safe, num_classes=classes), dtype=logp.dtype)
        onehot = onehot * apply("unsqueeze", apply("cast", inside, dtype=logp.dtype), axis=1)
        valid = apply("cast", target != attrs["ignore_index"], dtype=logp.dtype)
        grad = (apply("exp", logp) - onehot) * apply("unsqueeze", valid, axis=1)
        if attrs["reduction"] == "mean":
            grad = grad / total_weight
        scale = apply("unsqueeze", g, axis=1) if attrs["reduction"] == "none" else g
        return grad * scale

    def infer(self, inputs, ignore_index, reduction, label_smoothing):
        logp, target = inputs[1], inputs[2]
        meta = TensorMeta(logp.shape, logp.dtype)
        return [meta, TensorMeta(target.shape, logp.dtype)] if dtypes.is_floating(target.dtype) else meta

    @staticmethod
    def compute(g, logp, target, total_weight, weight=None, *, ignore_index, reduction, label_smoothing):
        if _fast_path(logp, target, label_smoothing):
            # (softmax - onehot(target)) * c per row, c = the row's weight times g (over the total
            # weight for a mean), written into the one logits-sized buffer the result needs:
            # aten's nll_loss_backward + _log_softmax_backward_data allocate a second one (the
            # nll gradient), which was the peak of a language model's step.
            valid = target != ignore_index
            safe = torch.where(valid, target, torch.zeros_like(target))
            w_t = valid.to(logp.dtype) if weight is None else weight.to(logp.dtype)[safe]
            scale = g / total_weight if reduction == "mean" else g
            c = torch.where(valid, w_t * scale, torch.zeros((), dtype=logp.dtype, device=logp.device)).unsqueeze(1)
            grad = torch.exp(logp).mul_(c)
            return grad.scatter_add_(1, safe.unsqueeze(1), -c)
        class_dim = 1 if logp.ndim > 1 else 0
        num_classes = logp.shape[class_dim]
        p = logp.exp()
        w = None if weight is None else _class_view(weight.to(logp.dtype), logp.ndim)
        eps = label_smoothing
        if target.is_floating_point():
            q = target.to(logp.dtype)
            if eps:
                q = q * (1 - eps) + eps / num_classes
            wq = q if w is None else q * w
            grad = p * wq.sum(class_dim, keepdim=True) - wq
            grad_target = -logp if w is None else -logp * w
            if eps:
                grad_target = grad_target * (1 - eps)
            if reduction == "mean":
                n = logp.numel() // num_classes
                grad, grad_target = grad / n, grad_target / n
            scale = g.unsqueeze(class_dim) if reduction == "none" else g
            return grad * scale, grad_target * scale
        valid = target != ignore_index
        safe = torch.where(valid, target, torch.zeros_like(target))
        onehot = torch.zeros_like(logp).scatter_(class_dim, safe.unsqueeze(class_dim), 1.0)
        if w is None:
            grad = p - onehot * (1 - eps)
            if eps:
                grad = grad - eps / num_classes
            sample_weight = valid.to(logp.dtype)
        else:
            w_t = weight.to(logp.dtype)[safe] * valid
            grad = (p - onehot) * (w_t.unsqueeze(class_dim) * (1 - eps))
            if eps:
                grad = grad + (p * w.sum() - w) * (eps / num_classes)
            sample_weight = w_t
        grad = grad * valid.unsqueeze(class_dim)
        if reduction == "mean":
            grad = grad / sample_weight.sum()
        scale = g.unsqueeze(class_dim) if reduction == "none" else g
        return grad * scale

    def gradient(self, op, grads):
        # log_softmax(logp) == logp, so the loss as a function of the saved log-probabilities is the loss
        # itself: recompute it from primitives at z = logp and differentiate its vjp once more.
        a = op.attrs
        soft = dtypes.is_floating(op.inputs[2].dtype)
        return gradient_by_recompute(op, grads, lambda z, target, _, weight=None: _cross_entropy_composite(
            z, target, weight, **a), [1, 2] if soft else [1])


@register
class NllLoss(OpDef):
    """torch.nn.functional.nll_loss over log-probabilities (N, C, d1, ...)."""

    name = "nll_loss"
    attrs = {"ignore_index": -100, "reduction": "mean"}
    autocast = "fp32"

    def infer(self, inputs, ignore_index, reduction):
        _check_reduction(self.name, reduction)
        if _class_target_shape(self, inputs):
            raise DTypeError(f"nll_loss: target must hold class indices, found {inputs[1].dtype}")
        return _loss_meta(inputs[0], inputs[1].shape, reduction, False)

    @staticmethod
    def compute(logp, target, weight=None, *, ignore_index, reduction):
        return torch.nn.functional.nll_loss(logp, target, weight, ignore_index=ignore_index, reduction=reduction)

    def gradient(self, op, grads):
        return [apply("nll_loss_backward", grads[0], *op.inputs, **op.attrs)] + [None] * (len(op.inputs) - 1)


@register
class NllLossBackward(OpDef):
    name = "nll_loss_backward"
    attrs = NllLoss.attrs

    def infer(self, inputs, ignore_index, reduction):
        return TensorMeta(inputs[1].shape, inputs[1].dtype)

    @staticmethod
    def compute(g, logp, target, weight=None, *, ignore_index, reduction):
        class_dim = 1 if logp.ndim > 1 else 0
        valid = target != ignore_index
        safe = torch.where(valid, target, torch.zeros_like(target))
        w_t = valid.to(logp.dtype) if weight is None else weight.to(logp.dtype)[safe] * valid
        grad = torch.zeros_like(logp).scatter_(class_dim, safe.unsqueeze(class_dim), -w_t.unsqueeze(class_dim))
        if reduction == "mean":
            grad = grad / w_t.sum()
        return grad * (g.unsqueeze(class_dim) if reduction == "none" else g)

    def gradient(self, op, grads):
        """Linear in g and constant in the log-probabilities (nll is linear in them): d/dg is nll_loss
        of gg itself, d/dlogp is zero."""
        gg, = grads
        _, logp, *rest = op.inputs
        return [apply("nll_loss", gg, *rest, **op.attrs)] + [None] * (len(op.inputs) - 1)


def _cross_entropy_composite(z, target, weight, ignore_index, reduction, label_smoothing):
    """cross_entropy from primitives (log_softmax, one_hot, sums), for second-order gradients only."""
    class_dim = 1 if z.ndim > 1 else 0
    num_classes = z.shape[class_dim]
    if num_classes is None:
        raise OpError("cross_entropy: second-order gradients need the number of classes known when the graph "
                      "is built")
    logq = apply("log_softmax", z, axis=class_dim)
    w = None if weight is None else (apply("reshape", weight, shape=(1, -1) + (1,) * (z.ndim - 2)) if z.ndim > 1
                                     else weight)
    eps = label_smoothing
    if dtypes.is_floating(target.dtype):
        q = target if target.dtype == z.dtype else apply("cast", target, dtype=z.dtype)
        if eps:
            q = q * (1 - eps) + eps / num_classes
        loss = -apply("sum", (q if w is None else q * w) * logq, axis=class_dim)
        if reduction == "mean":
            return apply("sum", loss) / float(max(1, _numel(z.shape) // num_classes))
        return apply("sum", loss) if reduction == "sum" else loss
    valid = target != ignore_index
    safe = apply("where", valid, target, 0)
    onehot = apply("cast", apply("one_hot", safe, num_classes=num_classes), dtype=z.dtype)
    if z.ndim > 2:  # one_hot puts the classes last; the logits have them at dim 1
        onehot = apply("permute", onehot, axes=(0, z.ndim - 1, *range(1, z.ndim - 1)))
    validf = apply("cast", valid, dtype=z.dtype)
    picked = onehot if w is None else onehot * w
    loss = -apply("sum", picked * logq, axis=class_dim) * validf
    if eps:
        smooth = -apply("sum", logq if w is None else logq * w, axis=class_dim) * validf / float(num_classes)
        loss = loss * (1 - eps) + smooth * eps
    if reduction == "mean":
        sample_weight = validf if w is None else apply("sum", picked, axis=class_dim) * validf
        return apply("sum", loss) / apply("sum", sample_weight)
    return apply("sum", loss) if reduction == "sum" else loss


def _numel(shape) -> int:
    n = 1
    for d in shape:
        if d is None:
            raise OpError("cross_entropy: second-order gradients need the input shape known when the graph is built")
        n *= d
    return n


# --- public functions (PyTorch's names and arguments) ------------------------------------
def cross_entropy(input, target, weight=None, ignore_index: int = -100, reduction: str = "mean",
                  label_smoothing: float = 0.0):
    inputs = (input, target) if weight is None else (input, target, weight)
    return apply("cross_entropy", *inputs, ignore_index=ignore_index, reduction=reduction,
                 label_smoothing=float(label_smoothing))[0]


def nll_loss(input, target, weight=None, ignore_index: int = -100, reduction: str = "mean"):
    inputs = (input, target) if weight is None else (input, target, weight)
    return apply("nll_loss", *inputs, ignore_index=ignore_index, reduction=reduction)


def _reduce(loss, reduction: str, name: str):
    _check_reduction(name, reduction)
    if reduction == "mean":
        return apply("mean", loss)
    if reduction == "sum":
        return apply("sum", loss)
    return loss


def mse_loss(input, target, reduction: str = "mean"):
    d = input - target
    return _reduce(d * d, reduction, "mse_loss")


def l1_loss(input, target, reduction: str = "mean"):
    return _reduce(apply("abs", input - target), reduction, "l1_loss")


def smooth_l1_loss(input, target, reduction: str = "mean", beta: float = 1.0):
    d = apply("abs", input - target)
    if beta == 0:
        return _reduce(d, reduction, "smooth_l1_loss")
    loss = apply("where", d < beta, d * d * (0.5 / beta), d - 0.5 * beta)
    return _reduce(loss, reduction, "smooth_l1_loss")


def binary_cross_entropy(input, target, weight=None, reduction: str = "mean"):
    """On probabilities; logs are clamped at -100 as torch does, so p = 0 or 1 stays finite."""
    log_p = apply("clamp", apply("log", input), min=-100.0)
    log_q = apply("clamp", apply("log", 1.0 - input), min=-100.0)
    loss = -(target * log_p + (1.0 - target) * log_q)
    if weight is not None:
        loss = loss * weight
    return _reduce(loss, reduction, "binary_cross_entropy")


def binary_cross_entropy_with_logits(input, target, weight=None, reduction: str = "mean", pos_weight=None):
    """Stable in the logits: log(1 + e^-|x|) + max(-x, 0) never overflows."""
    softplus_neg = apply("log1p", apply("exp", -apply("abs", input))) + apply("relu", -input)
    if pos_weight is None:
        loss = (1.0 - target) * input + softplus_neg
    else:
        loss = (1.0 - target) * input + (1.0 + (pos_weight - 1.0) * target) * softplus_neg
    if weight is not None:
        loss = loss * weight
    return _reduce(loss, reduction, "binary_cross_entropy_with_logits")


__all__ = ["binary_cross_entropy", "binary_cross_entropy_with_logits", "cross_entropy", "l1_loss", "mse_loss",
           "nll_loss", "smooth_l1_loss"]
