"""Metrics against scikit-learn, torch and hand computation."""

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from luoshu.core.errors import Error, ShapeError
from luoshu.metrics import (
    MetricError,
    accuracy,
    auc,
    hit_rate_at_k,
    log_loss,
    ndcg_at_k,
    perplexity,
    top_k_accuracy,
)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_accuracy_from_labels_and_scores(rng):
    y = rng.integers(0, 4, 50)
    scores = rng.random((50, 4))
    assert accuracy(y, scores) == pytest.approx(skm.accuracy_score(y, scores.argmax(1)))
    assert accuracy([1, 2, 3], [1, 0, 3]) == pytest.approx(2 / 3)
    with pytest.raises(ShapeError, match=r"accuracy: y_pred must have y_true's shape \(3,\)"):
        accuracy([1, 2, 3], [1, 2])


@pytest.mark.parametrize("k", [1, 2, 3])
def test_top_k_accuracy_vs_sklearn(rng, k):
    y = rng.integers(0, 5, 200)
    scores = rng.random((200, 5))
    assert top_k_accuracy(y, scores, k) == pytest.approx(skm.top_k_accuracy_score(y, scores, k=k, labels=range(5)))
    with pytest.raises(MetricError, match=r"labels must lie in \[0, 5\)"):
        top_k_accuracy([7], scores[:1], k)


def test_auc_vs_sklearn_with_and_without_ties(rng):
    y = rng.integers(0, 2, 500)
    score = rng.random(500) + 0.3 * y
    assert auc(y, score) == pytest.approx(skm.roc_auc_score(y, score), abs=1e-12)
    tied = np.round(score * 4) / 4  # few distinct values: many ties
    assert auc(y, tied) == pytest.approx(skm.roc_auc_score(y, tied), abs=1e-12)
    assert auc(y.astype(bool), np.zeros(500)) == 0.5
    assert auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75  # by hand: 3 of 4 pairs ordered
    assert auc([0, 1], [0.3, 0.3]) == 0.5


def test_auc_errors():
    with pytest.raises(MetricError, match="needs both classes in y_true; got 3 positives and 0 negatives") as info:
        auc([1, 1, 1], [0.1, 0.2, 0.3])
    assert isinstance(info.value, Error)
    with pytest.raises(ShapeError, match=r"auc: .*got \(3,\) and \(2,\)"):
        auc([0, 1, 1], [0.1, 0.2])
    with pytest.raises(MetricError, match="binary"):
        auc([0, 2], [0.1, 0.2])
    with pytest.raises(MetricError, match="NaN"):
        auc([0, 1], [0.1, np.nan])


def test_log_loss_vs_sklearn(rng):
    y = rng.integers(0, 2, 100)
    p = rng.uniform(0.01, 0.99, 100)
    assert log_loss(y, p) == pytest.approx(skm.log_loss(y, p), rel=1e-12)
    y3 = rng.integers(0, 3, 100)
    logits = rng.normal(size=(100, 3))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert log_loss(y3, probs) == pytest.approx(skm.log_loss(y3, probs, labels=[0, 1, 2]), rel=1e-12)
    assert np.isfinite(log_loss([1, 0], [0.0, 1.0]))  # clipped
    with pytest.raises(ShapeError, match="log_loss"):
        log_loss(y3, probs[:5])


def test_hit_rate_at_k_by_hand():
    scores = np.array([[0.9, 0.1, 0.5, 0.3],   # held-out item 2 is ranked 2nd
                       [0.2, 0.8, 0.7, 0.9],   # item 0 ranked 4th
                       [0.4, 0.4, 0.1, 0.0]])  # item 1 ties item 0: lower index first, so 2nd
    held_out = np.array([2, 0, 1])
    assert hit_rate_at_k(held_out, scores, 1) == 0
    assert hit_rate_at_k(held_out, scores, 2) == pytest.approx(2 / 3)
    assert hit_rate_at_k(held_out, scores, 4) == 1
    relevance = np.zeros_like(scores)
    relevance[np.arange(3), held_out] = 1
    for k in (1, 2, 3, 4):
        assert hit_rate_at_k(relevance, scores, k) == hit_rate_at_k(held_out, scores, k)
    with pytest.raises(ShapeError, match=r"hit_rate_at_k: .*y_true \(2,\), y_score \(3, 4\)"):
        hit_rate_at_k([0, 1], scores, 2)


@pytest.mark.parametrize("k", [1, 3, 10])
def test_ndcg_vs_sklearn(rng, k):
    relevance = rng.integers(0, 4, (30, 8))
    relevance[0] = 0  # a row with nothing relevant scores 0, as in scikit-learn
    scores = rng.random((30, 8))
    assert ndcg_at_k(relevance, scores, k) == pytest.approx(skm.ndcg_score(relevance, scores, k=k), rel=1e-12)
    held_out = rng.integers(0, 8, 30)
    one_hot = np.eye(8)[held_out]
    assert ndcg_at_k(held_out, scores, k) == pytest.approx(skm.ndcg_score(one_hot, scores, k=k), rel=1e-12)


def test_perplexity_vs_torch_cross_entropy(rng):
    logits = rng.normal(size=(2, 5, 11)) * 3
    tokens = rng.integers(0, 11, (2, 5))
    tokens[1, 3:] = -100
    ref = torch.nn.functional.cross_entropy(torch.from_numpy(logits).reshape(-1, 11),
                                            torch.from_numpy(tokens).reshape(-1), ignore_index=-100)
    assert perplexity(tokens, logits, ignore_index=-100) == pytest.approx(float(torch.exp(ref)), rel=1e-10)
    probs = np.full((4, 10), 0.1)
    assert perplexity(np.arange(4), probs, from_logits=False) == pytest.approx(10.0)
    with pytest.raises(ShapeError, match=r"perplexity: .*got y_true \(2, 5\), y_pred \(2, 4, 11\)"):
        perplexity(tokens, logits[:, :4])
    with pytest.raises(MetricError, match="every token is ignore_index"):
        perplexity(np.full(3, -100), np.zeros((3, 4)), ignore_index=-100)
