"""luoshu/data/packing.py: length buckets, packed rows and their bad input.

The models' side (a packed row trains as its sequences one by one) is in
tests/models/test_varlen.py."""

import numpy as np
import pytest

import luoshu as ls
from luoshu import data


def _sequences(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 50, n) for n in lengths]


def test_packed_rows_hold_every_sequence_once_with_reset_positions_and_in_sequence_labels():
    lengths = [9, 2, 5, 16, 1, 7, 3, 8, 4]
    seqs = _sequences(lengths)
    p = data.pack_sequences(seqs, budget=16, pad_id=0)
    assert p.tokens.shape == (p.num_rows, 16) and p.num_tokens == sum(lengths)
    assert p.num_rows == int(np.ceil(sum(lengths) / 16))  # first-fit decreasing reaches the bound here
    covered = np.zeros_like(p.tokens, bool)
    for i, s in enumerate(seqs):
        row, start, n = p.placement[i]
        assert n == len(s)
        assert not covered[row, start : start + n].any()  # no two sequences overlap
        covered[row, start : start + n] = True
        np.testing.assert_array_equal(p.sequence(p.tokens, i), s)
        np.testing.assert_array_equal(p.sequence(p.positions, i), np.arange(n))
        seg = p.sequence(p.segment_ids, i)
        assert seg.min() == seg.max() >= 1
        np.testing.assert_array_equal(p.sequence(p.labels, i), np.append(s[1:], -100))
    # Padding: segment 0, position 0, pad token, no label; segment ids are unique within a row.
    assert (p.tokens[~covered] == 0).all() and (p.segment_ids[~covered] == 0).all()
    assert (p.positions[~covered] == 0).all() and (p.labels[~covered] == -100).all()
    for row in range(p.num_rows):
        ids = [p.segment_ids[row, p.placement[i, 1]] for i in range(len(seqs)) if p.placement[i, 0] == row]
        assert sorted(ids) == list(range(1, len(ids) + 1))


def test_bucketize_and_bucket_batch_follow_descending_bounds():
    lengths = data.corpus_lengths(200, "github", max_len=2048, seed=1)
    bounds = [1024, 256, 64, 0]
    buckets = data.bucketize(lengths, bounds)
    assert sorted(sum(buckets, [])) == sorted(lengths.tolist())
    for k, bucket in enumerate(buckets):
        lower = bounds[k + 1]
        assert all(n > lower and (k == 0 or n <= bounds[k]) for n in bucket)
    seqs = _sequences(lengths, seed=2)
    groups = data.bucket_batch(seqs, bounds, row_tokens=2048)
    assert [g.bound for g in groups] == bounds[:-1]
    assert [len(g.indices) for g in groups] == [len(b) for b in buckets]
    assert [g.tokens for g in groups] == [sum(b) for b in buckets]  # tokens per group
    assert sorted(np.concatenate([g.indices for g in groups]).tolist()) == list(range(len(seqs)))
    for g in groups:
        for j, i in enumerate(g.indices):
            np.testing.assert_array_equal(g.rows.sequence(g.rows.tokens, j), seqs[i])
    # By default a bucket's rows are as long as its bound.
    short = data.bucket_batch(_sequences([3, 30, 5, 12]), [32, 8, 0])
    assert [g.rows.budget for g in short] == [32, 8]
    assert [g.indices.tolist() for g in short] == [[1, 3], [0, 2]]


def test_empty_input_packs_into_no_rows():
    p = data.pack_sequences([], budget=8)
    assert p.num_rows == 0 and p.tokens.shape == (0, 8) and p.num_tokens == 0
    groups = data.bucket_batch(_sequences([3]), [16, 8, 0])
    assert groups[0].rows.num_rows == 0 and groups[0].tokens == 0 and groups[1].tokens == 3


@pytest.mark.parametrize("bounds", [[4096, 8192, 0], [8192, 4096], [8192, 8192, 0], []])
def test_bounds_not_strictly_descending_to_zero_are_refused(bounds):
    with pytest.raises(ls.Error, match="strictly descending and end with 0"):
        data.bucketize([10, 20], bounds)
    with pytest.raises(data.DataError, match="strictly descending and end with 0"):
        data.bucket_batch(_sequences([10, 20]), bounds)


def test_a_sequence_longer_than_its_row_budget_is_named():
    with pytest.raises(data.DataError, match="sequence 2 has 17 tokens, more than the row budget of 16"):
        data.pack_sequences(_sequences([3, 5, 17]), budget=16)
    # The first bucket takes sequences longer than its bound; its rows cannot hold them.
    with pytest.raises(data.DataError, match=r"sequence 1 has 40 tokens.*budget of 32 of its bucket \(bound 32\)"):
        data.bucket_batch(_sequences([3, 40]), [32, 8, 0])
    with pytest.raises(data.DataError, match="one budget per bucket"):
        data.bucket_batch(_sequences([3]), [32, 8, 0], row_tokens=[32])
    with pytest.raises(data.DataError, match="positive int"):
        data.pack_sequences(_sequences([3]), budget=0)
    with pytest.raises(data.DataError, match="sequence 0 must be a non-empty 1-D array"):
        data.pack_sequences([np.zeros((2, 2), np.int64)], budget=8)
