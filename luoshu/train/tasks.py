"""What each kind of model takes and is scored by (`TASKS`): placeholders, forward, loss, eval metrics;
BERT's masked-LM objective as a batch transform."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from luoshu import ops
from luoshu.core import Tensor, placeholder
from luoshu.metrics import accuracy, auc, hit_rate_at_k, log_loss, ndcg_at_k, perplexity
from luoshu.models import BertForPreTraining
from luoshu.nn import functional as F
from luoshu.nn.module import Module
from luoshu.train.errors import TrainConfigError


class Task:
    """What a kind of model takes and is scored by. `inputs` names the batch arrays the model reads
    (in call order), `target` the label array; `metrics` are the eval columns (the first is reported)."""

    inputs: tuple[str, ...] = ()
    target: str = "label"
    metrics: tuple[str, ...] = ()

    def placeholders(self, arrays: dict[str, np.ndarray], device: str) -> dict:
        out = {}
        for key in (*self.inputs, self.target):
            a = arrays[key]
            shape = (None, *a.shape[1:])
            dtype = "int64" if np.issubdtype(a.dtype, np.integer) and key != "image" else "float32"
            out[key] = placeholder(key, shape, dtype, device)
        return out

    def forward(self, model: Module, feeds: dict) -> Tensor:
        out = model(*(feeds[k] for k in self.inputs))
        return out[0] if isinstance(out, tuple) else out  # BERT: (mlm_logits, nsp_logits)

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(output, target)

    def evaluate(self, predict: Callable[[dict], np.ndarray], data: dict[str, np.ndarray],
                 batch_size: int) -> dict[str, float]:
        raise NotImplementedError


def _batched(data: dict[str, np.ndarray], batch_size: int):
    n = len(next(iter(data.values())))
    for start in range(0, n, batch_size):
        yield {k: v[start:start + batch_size] for k, v in data.items()}


class ImageTask(Task):
    inputs, metrics = ("image",), ("accuracy", "eval_loss")

    def evaluate(self, predict: Callable[[dict], np.ndarray], data: dict[str, np.ndarray],
                 batch_size: int) -> dict[str, float]:
        logits = np.concatenate([predict(b) for b in _batched(data, batch_size)])
        labels = data["label"]
        return {"accuracy": accuracy(labels, logits),
                "eval_loss": log_loss(labels, _softmax(logits))}


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


class SequenceTask(ImageTask):
    inputs = ("tokens",)


class CTRTask(Task):
    inputs, metrics = ("dense", "sparse"), ("auc", "log_loss")

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(output, target)

    def evaluate(self, predict: Callable[[dict], np.ndarray], data: dict[str, np.ndarray],
                 batch_size: int) -> dict[str, float]:
        logits = np.concatenate([predict(b) for b in _batched(data, batch_size)]).astype(np.float64)
        prob = 1 / (1 + np.exp(-logits))
        return {"auc": auc(data["label"], logits), "log_loss": log_loss(data["label"], prob)}


class RatingTask(CTRTask):
    """Implicit-feedback ranking: the eval data holds (users, candidates) grids, held-out item in column 0."""

    inputs, metrics = ("user", "item"), ("hr@10", "ndcg@10")

    def placeholders(self, arrays: dict[str, np.ndarray], device: str) -> dict:
        return {"user": placeholder("user", (None,), "int64", device),
                "item": placeholder("item", (None,), "int64", device),
                "label": placeholder("label", (None,), "float32", device)}

    def evaluate(self, predict: Callable[[dict], np.ndarray], data: dict[str, np.ndarray],
                 batch_size: int) -> dict[str, float]:
        users, items = data["user"], data["item"]
        rows = max(1, batch_size // items.shape[1])
        scores = np.concatenate([predict({"user": users[s:s + rows].reshape(-1), "item": items[s:s + rows]
                                          .reshape(-1)}).reshape(-1, items.shape[1])
                                 for s in range(0, len(users), rows)])
        held_out = np.zeros(len(scores), np.int64)
        return {"hr@10": hit_rate_at_k(held_out, scores, 10),
                "ndcg@10": ndcg_at_k(held_out, scores, 10)}


def _token_metrics(predict, data, batch_size, inputs, target) -> dict[str, float]:
    """Perplexity and token accuracy over the scored (not ignored) target tokens, batch by batch."""
    log_ppl, correct, count = 0.0, 0, 0
    for batch in _batched(data, batch_size):
        logits = predict(batch)
        targets = batch[target]
        keep = targets != -100
        n = int(keep.sum())
        if n == 0:
            continue
        log_ppl += math.log(perplexity(targets, logits, ignore_index=-100)) * n
        correct += int((logits.argmax(-1)[keep] == targets[keep]).sum())
        count += n
    if count == 0:
        raise TrainConfigError("the eval data has no scored tokens")
    return {"perplexity": math.exp(log_ppl / count), "token_accuracy": correct / count}


class LMTask(Task):
    """Next-token prediction; targets of -100 (padding, prompts) are not scored."""

    inputs, target, metrics = ("tokens",), "targets", ("perplexity", "token_accuracy")

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        vocab = output.shape[-1]
        return F.cross_entropy(ops.reshape(output, (-1, vocab)), ops.reshape(target, (-1,)), ignore_index=-100)

    def evaluate(self, predict: Callable[[dict], np.ndarray], data: dict[str, np.ndarray],
                 batch_size: int) -> dict[str, float]:
        return _token_metrics(predict, data, batch_size, self.inputs, self.target)


class Seq2SeqTask(LMTask):
    inputs, target, metrics = ("src", "tgt_in"), "tgt_out", ("token_accuracy", "perplexity")


TASKS: dict[str, Task] = {"image": ImageTask(), "sequence": SequenceTask(), "ctr": CTRTask(),
                          "rating": RatingTask(), "lm": LMTask(), "seq2seq": Seq2SeqTask()}


# --- BERT: masked language modelling ------------------------------------------------------------------

def is_masked_lm(model_class: type) -> bool:
    """Whether a zoo model of the "lm" task learns by masked-LM (BERT) rather than next-token prediction."""
    return issubclass(model_class, BertForPreTraining)


def masked_lm(mask_id: int) -> Callable:
    """BERT's masked-LM objective over a token batch: 15% of positions are scored; of those, 80% are
    replaced by [MASK] (`mask_id`), 10% by a random token and 10% kept."""
    def transform(batch, rng, train):
        tokens = batch["tokens"]
        chosen = rng.random(tokens.shape) < 0.15
        chosen.reshape(-1)[0] |= not chosen.any()  # a batch with nothing to score would give a NaN loss
        draw = rng.random(tokens.shape)
        inputs = np.where(chosen & (draw < 0.8), mask_id, tokens)
        inputs = np.where(chosen & (draw >= 0.8) & (draw < 0.9), rng.integers(0, mask_id, tokens.shape), inputs)
        return {**batch, "tokens": inputs.astype(np.int64), "targets": np.where(chosen, tokens, -100)}
    return transform

