"""Evaluation metrics on NumPy arrays: accuracy, top-k accuracy, exact AUC, log loss, HR@K, NDCG@K, perplexity.

Each takes `(y_true, y_pred_or_score)` in scikit-learn's order and returns a Python float.
Ranking metrics break ties between equal scores by the lower column index first (a stable
descending sort), so they are deterministic; `auc` instead counts a tied pair as half, which
is the exact Mann-Whitney statistic.
"""

from __future__ import annotations

import numpy as np

from luoshu.core.errors import Error, ShapeError


class MetricError(Error, ValueError):
    """Values a metric cannot score: labels out of range, a single class for AUC, NaN scores, empty input."""


def _as_array(name: str, metric: str, value) -> np.ndarray:
    a = np.asarray(value)
    if a.size == 0:
        raise MetricError(f"{metric}: {name} is empty")
    if np.issubdtype(a.dtype, np.floating) and np.isnan(a).any():
        raise MetricError(f"{metric}: {name} contains NaN")
    return a


def _class_labels(metric: str, y_true: np.ndarray, num_classes: int) -> np.ndarray:
    if not (np.issubdtype(y_true.dtype, np.integer) or np.issubdtype(y_true.dtype, np.bool_)
            or np.all(np.mod(y_true, 1) == 0)):
        raise MetricError(f"{metric}: y_true must hold integer class labels; got dtype {y_true.dtype}")
    labels = y_true.astype(np.int64)
    if labels.min() < 0 or labels.max() >= num_classes:
        raise MetricError(f"{metric}: y_true labels must lie in [0, {num_classes}) for {num_classes} score columns; "
                          f"found [{labels.min()}, {labels.max()}]")
    return labels


def _scores_2d(metric: str, y_true: np.ndarray, y_score: np.ndarray) -> None:
    if y_score.ndim != 2 or y_true.shape != y_score.shape[:1]:
        raise ShapeError(f"{metric}: expected y_true of shape (N,) and y_score of shape (N, C); "
                         f"got {y_true.shape} and {y_score.shape}")


def _target_rank(y_score: np.ndarray, target: np.ndarray) -> np.ndarray:
    """0-based rank of column `target[i]` in row i under a stable descending sort."""
    s = y_score[np.arange(len(target)), target][:, None]
    columns = np.arange(y_score.shape[1])[None, :]
    return ((y_score > s) | ((y_score == s) & (columns < target[:, None]))).sum(axis=1)


def accuracy(y_true, y_pred) -> float:
    """Fraction of correct predictions; `y_pred` holds labels (same shape as `y_true`) or
    scores with one more, last axis (its argmax is the prediction)."""
    y_true, y_pred = _as_array("y_true", "accuracy", y_true), _as_array("y_pred", "accuracy", y_pred)
    if y_pred.ndim == y_true.ndim + 1 and y_pred.shape[:-1] == y_true.shape:
        y_pred = y_pred.argmax(axis=-1)
    if y_pred.shape != y_true.shape:
        raise ShapeError(f"accuracy: y_pred must have y_true's shape {y_true.shape} (labels) or "
                         f"{(*y_true.shape, 'C')} (scores); got {y_pred.shape}")
    return float(np.mean(y_true == y_pred))


def top_k_accuracy(y_true, y_score, k: int = 5) -> float:
    """Fraction of rows whose true class is among the `k` highest of its scores (N, C)."""
    y_true, y_score = _as_array("y_true", "top_k_accuracy", y_true), _as_array("y_score", "top_k_accuracy", y_score)
    _scores_2d("top_k_accuracy", y_true, y_score)
    if k < 1:
        raise MetricError(f"top_k_accuracy: k must be >= 1; got {k}")
    labels = _class_labels("top_k_accuracy", y_true, y_score.shape[1])
    return float(np.mean(_target_rank(y_score, labels) < k))


def auc(y_true, y_score) -> float:
    """Area under the ROC curve for binary labels (0/1 or bool), computed exactly from ranks
    (Mann-Whitney U with tied scores given their average rank)."""
    y_true, y_score = _as_array("y_true", "auc", y_true), _as_array("y_score", "auc", y_score)
    if y_true.shape != y_score.shape or y_true.ndim != 1:
        raise ShapeError(f"auc: y_true and y_score must be 1-D of the same length; got {y_true.shape} and "
                         f"{y_score.shape}")
    if not np.all((y_true == 0) | (y_true == 1)):
        raise MetricError(f"auc: y_true must be binary (0/1); found values {np.unique(y_true)[:10].tolist()}")
    positive = y_true.astype(bool)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise MetricError(f"auc: needs both classes in y_true; got {n_pos} positives and {n_neg} negatives")
    order = np.argsort(y_score, kind="mergesort")
    s = y_score[order]
    # tie groups: a run of equal scores at sorted positions [first, last] shares the average
    # 1-based rank (first + last) / 2 + 1; keep twice the rank so the sum stays an integer
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    ends = np.r_[starts[1:], len(s)] - 1
    group = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(s)]))
    twice_rank = (starts + ends + 2)[group]
    rank_sum_twice = int(twice_rank[positive[order]].sum())
    u_twice = rank_sum_twice - n_pos * (n_pos + 1)
    return u_twice / (2 * n_pos * n_neg)


def log_loss(y_true, y_prob, eps: float | None = None) -> float:
    """Mean negative log-likelihood. Binary: `y_prob` (N,) is P(label 1) for 0/1 labels.
    Multi-class: `y_prob` (N, C) holds class probabilities for integer labels. Probabilities
    are clipped to [eps, 1 - eps] (eps: the dtype's machine epsilon by default, as scikit-learn)."""
    y_true, y_prob = _as_array("y_true", "log_loss", y_true), _as_array("y_prob", "log_loss", y_prob)
    if eps is None:
        eps = np.finfo(y_prob.dtype if np.issubdtype(y_prob.dtype, np.floating) else np.float64).eps
    if y_prob.ndim == 1:
        if y_true.shape != y_prob.shape:
            raise ShapeError(f"log_loss: binary y_true and y_prob must have the same shape; got {y_true.shape} and "
                             f"{y_prob.shape}")
        if not np.all((y_true == 0) | (y_true == 1)):
            raise MetricError("log_loss: binary y_true must hold 0/1 labels")
        p = np.clip(y_prob.astype(np.float64), eps, 1 - eps)
        return float(-np.mean(np.where(y_true == 1, np.log(p), np.log1p(-p))))
    _scores_2d("log_loss", y_true, y_prob)
    labels = _class_labels("log_loss", y_true, y_prob.shape[1])
    p = np.clip(y_prob[np.arange(len(labels)), labels].astype(np.float64), eps, 1 - eps)
    return float(-np.mean(np.log(p)))


def _ranking_inputs(metric: str, y_true, y_score, k: int) -> tuple[np.ndarray, np.ndarray]:
    y_true, y_score = _as_array("y_true", metric, y_true), _as_array("y_score", metric, y_score)
    if k < 1:
        raise MetricError(f"{metric}: k must be >= 1; got {k}")
    if y_score.ndim != 2 or y_true.shape not in (y_score.shape[:1], y_score.shape):
        raise ShapeError(f"{metric}: expected y_score (N, C) with y_true (N,) target columns or (N, C) "
                         f"relevances; got y_true {y_true.shape}, y_score {y_score.shape}")
    return y_true, y_score


def hit_rate_at_k(y_true, y_score, k: int = 10) -> float:
    """HR@K: the fraction of rows (users) with a relevant item among their `k` top-scored
    candidates. `y_true` is the column of each row's one held-out item (N,), as in the
    leave-one-out protocol, or a relevance matrix (N, C) where > 0 means relevant."""
    y_true, y_score = _ranking_inputs("hit_rate_at_k", y_true, y_score, k)
    if y_true.ndim == 1:
        return float(np.mean(_target_rank(y_score, _class_labels("hit_rate_at_k", y_true, y_score.shape[1])) < k))
    top = np.argsort(-y_score, axis=1, kind="stable")[:, :k]
    return float(np.mean((np.take_along_axis(y_true, top, axis=1) > 0).any(axis=1)))


def ndcg_at_k(y_true, y_score, k: int = 10) -> float:
    """NDCG@K with linear gains (as scikit-learn's `ndcg_score`), averaged over rows.
    `y_true` is a non-negative relevance matrix (N, C) or each row's one relevant column (N,);
    rows with no relevant item score 0."""
    y_true, y_score = _ranking_inputs("ndcg_at_k", y_true, y_score, k)
    if y_true.ndim == 1:
        rank = _target_rank(y_score, _class_labels("ndcg_at_k", y_true, y_score.shape[1]))
        return float(np.mean(np.where(rank < k, 1 / np.log2(rank + 2.0), 0.0)))
    if (y_true < 0).any():
        raise MetricError("ndcg_at_k: relevances in y_true must be non-negative")
    rel = y_true.astype(np.float64)
    k = min(k, rel.shape[1])
    discount = 1 / np.log2(np.arange(k) + 2.0)
    top = np.argsort(-y_score, axis=1, kind="stable")[:, :k]
    dcg = np.take_along_axis(rel, top, axis=1) @ discount
    ideal = -np.sort(-rel, axis=1)[:, :k] @ discount
    return float(np.mean(np.divide(dcg, ideal, out=np.zeros_like(dcg), where=ideal > 0)))


def perplexity(y_true, y_pred, from_logits: bool = True, ignore_index: int | None = None) -> float:
    """exp(mean token negative log-likelihood). `y_true` holds token ids (any shape S), `y_pred`
    logits (or probabilities with `from_logits=False`) of shape S + (V,); tokens equal to
    `ignore_index` (e.g. padding) are left out."""
    y_true, y_pred = _as_array("y_true", "perplexity", y_true), _as_array("y_pred", "perplexity", y_pred)
    if y_pred.shape[:-1] != y_true.shape:
        raise ShapeError(f"perplexity: y_pred must have shape y_true.shape + (vocab,) = {(*y_true.shape, 'V')}; "
                         f"got y_true {y_true.shape}, y_pred {y_pred.shape}")
    targets = y_true.reshape(-1).astype(np.int64)
    scores = y_pred.reshape(-1, y_pred.shape[-1]).astype(np.float64)
    keep = targets != ignore_index if ignore_index is not None else np.ones(len(targets), bool)
    if not keep.any():
        raise MetricError("perplexity: every token is ignore_index; nothing to score")
    targets, scores = targets[keep], scores[keep]
    _class_labels("perplexity", targets, scores.shape[1])
    if from_logits:
        top = scores.max(axis=1, keepdims=True)
        log_z = np.log(np.exp(scores - top).sum(axis=1)) + top[:, 0]
        nll = log_z - scores[np.arange(len(targets)), targets]
    else:
        nll = -np.log(np.clip(scores[np.arange(len(targets)), targets], np.finfo(np.float64).tiny, None))
    return float(np.exp(nll.mean()))
