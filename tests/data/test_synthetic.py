"""Synthetic generators: CTR labels a simple model learns, power-law ids, long-tail sequences, copy task."""

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import OneHotEncoder

from luoshu.data import DataError, copy_task, pad_sequences, synthetic_ctr, synthetic_sequences

SLOTS = [5, 20, 50, 100] * 6 + [10, 10]


@pytest.mark.parametrize("dist", ["uniform", "power_law"])
def test_synthetic_ctr_is_learnable_by_logistic_regression(dist):
    data = synthetic_ctr(8000, slot_sizes=SLOTS, dist=dist, seed=0, return_probability=True)
    assert data["dense"].shape == (8000, 13) and data["sparse"].shape == (8000, 26)
    assert set(np.unique(data["label"])) == {0.0, 1.0}
    assert 0.2 < data["label"].mean() < 0.3  # ctr=0.25 by default
    features = sp.hstack([OneHotEncoder(handle_unknown="ignore").fit_transform(data["sparse"]),
                          np.log1p(data["dense"])]).tocsr()
    train, test = slice(0, 6000), slice(6000, None)
    model = LogisticRegression(C=0.5, max_iter=300).fit(features[train], data["label"][train])
    learned = roc_auc_score(data["label"][test], model.predict_proba(features[test])[:, 1])
    truth = roc_auc_score(data["label"][test], data["probability"][test])
    assert learned > 0.72 and truth > learned - 0.01 and truth < 0.95


def test_synthetic_ctr_is_deterministic_and_shares_truth_across_sizes():
    a = synthetic_ctr(300, slot_sizes=SLOTS, seed=4, return_probability=True)
    b = synthetic_ctr(300, slot_sizes=SLOTS, seed=4, return_probability=True)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    c = synthetic_ctr(300, slot_sizes=SLOTS, seed=5)
    assert not np.array_equal(a["sparse"], c["sparse"])
    # the hidden model does not depend on num_samples: same features → same probability
    big = synthetic_ctr(600, slot_sizes=SLOTS, seed=4, return_probability=True)
    np.testing.assert_allclose(big["probability"][:300][np.all(big["sparse"][:300] == a["sparse"], axis=1)],
                               a["probability"][np.all(big["sparse"][:300] == a["sparse"], axis=1)], rtol=1e-6)


def test_power_law_ids_are_skewed_and_in_range():
    data = synthetic_ctr(20000, dense_dim=2, slot_sizes=[1000, 2**40], dist="power_law", alpha=1.2, seed=1)
    ids = data["sparse"][:, 0]
    assert ids.min() >= 0 and ids.max() < 1000
    counts = np.bincount(ids, minlength=1000)
    p = np.arange(1, 1001.0) ** -1.2
    assert counts[0] / 20000 == pytest.approx(p[0] / p.sum(), rel=0.1)
    assert counts[:10].sum() > 0.5 * 20000  # the ten hottest ids take most of the traffic
    big = data["sparse"][:, 1]
    assert big.min() >= 0 and big.max() < 2**40 and 0.15 < (big == 0).mean() < 0.25  # exact: 0.18
    uniform = synthetic_ctr(20000, dense_dim=2, slot_sizes=[1000], seed=1)["sparse"][:, 0]
    assert np.bincount(uniform, minlength=1000).max() < 60
    with pytest.raises(DataError, match="dist must be"):
        synthetic_ctr(10, dist="zipf")


def test_missing_values():
    data = synthetic_ctr(2000, slot_sizes=SLOTS, missing_rate=0.3, seed=0)
    assert 0.25 < np.isnan(data["dense"]).mean() < 0.35 and 0.25 < (data["sparse"] == -1).mean() < 0.35


def test_long_tail_sequences():
    seqs = synthetic_sequences(4000, vocab=1000, min_len=4, max_len=512, seed=0, num_special=3)
    lengths = np.array([len(s) for s in seqs])
    assert lengths.min() >= 4 and lengths.max() <= 512
    assert np.median(lengths) < 20 and lengths.max() > 200  # many short, a few very long
    tokens = np.concatenate(seqs)
    assert tokens.min() >= 3 and tokens.max() < 1000 and tokens.dtype == np.int64
    assert np.bincount(tokens)[3] > np.bincount(tokens)[500:].mean() * 50  # Zipf: id 3 is the commonest
    again = synthetic_sequences(4000, vocab=1000, min_len=4, max_len=512, seed=0, num_special=3)
    assert all(np.array_equal(a, b) for a, b in zip(seqs, again))
    for dist in ("uniform", "lognormal"):
        lengths = [len(s) for s in synthetic_sequences(500, 50, 8, 64, dist=dist, seed=1)]
        assert min(lengths) >= 8 and max(lengths) <= 64
    with pytest.raises(DataError, match="min_len <= max_len"):
        synthetic_sequences(3, 10, min_len=5, max_len=4)


@pytest.mark.parametrize("reverse", [False, True])
def test_copy_task_and_padding(reverse):
    pairs = copy_task(20, vocab=30, min_len=2, max_len=10, reverse=reverse, seed=0)
    for inputs, targets in pairs:
        n = (len(inputs) + 1 - 1) // 2  # sequence = n source + sep + n answer tokens
        source = inputs[:n]
        assert inputs[n] == 1 and source.min() >= 2
        answer = targets[n:]
        np.testing.assert_array_equal(answer, source[::-1] if reverse else source)
        assert (targets[:n] == -100).all()
    batch, lengths = pad_sequences([p[0] for p in pairs], pad_id=0)
    assert batch.shape == (20, lengths.max())
    np.testing.assert_array_equal(batch[3, :lengths[3]], pairs[3][0])
    assert (batch[3, lengths[3]:] == 0).all()
    assert pad_sequences([np.arange(5)], length=3)[0].tolist() == [[0, 1, 2]]
