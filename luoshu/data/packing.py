"""Length buckets and sequence packing for mixed-length language-model batches (HotSPa's data path).

A step's global batch of variable-length sequences is split into buckets by descending
`bucket_bounds` (`bucketize`, `bucket_batch`), and inside a bucket the sequences are packed
(`pack_sequences`): concatenated into rows of a fixed token budget instead of padded one by
one to the bucket's bound. Each packed row carries per-token segment ids (1, 2, ... for the
sequences of the row, 0 for padding), positions that restart at 0 with every sequence, and
next-token labels that never cross a sequence boundary. Fed to GPT-2 or LLaMA as
`model(tokens, positions=positions, segment_ids=segment_ids)` (a block-diagonal causal
attention mask), a packed row computes exactly what its sequences would one by one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from luoshu.data.errors import DataError

IGNORE_INDEX = -100  # the label the language-model losses skip (torch's cross_entropy default)


def _check_bounds(bounds: Sequence[int]) -> list[int]:
    try:
        bounds = [int(b) for b in bounds]
    except (TypeError, ValueError):
        raise DataError(f"bucket bounds must be integers, found {bounds!r}") from None
    if not bounds or bounds[-1] != 0 or any(a <= b for a, b in zip(bounds[:-1], bounds[1:])):
        raise DataError(f"bucket bounds must be strictly descending and end with 0, found {list(bounds)}")
    return bounds


def _bucket_of(n: int, bounds: list[int]) -> int:
    return next((k for k in range(len(bounds) - 1) if n > bounds[k + 1]), len(bounds) - 2)


def bucketize(lengths: Sequence[int], bounds: Sequence[int]) -> list[list[int]]:
    """Lengths grouped by descending `bounds` (the last bound is 0): bucket i takes lengths
    in (bounds[i+1], bounds[i]]; the first also takes anything longer."""
    bounds = _check_bounds(bounds)
    buckets: list[list[int]] = [[] for _ in bounds[:-1]]
    for n in lengths:
        buckets[_bucket_of(int(n), bounds)].append(int(n))
    return buckets


@dataclass
class PackedRows:
    """Sequences packed into rows of `budget` tokens.

    tokens, segment_ids, positions, labels: (rows, budget) int64 arrays. `placement[i]` is
    (row, start, length) of the i-th input sequence, so `tokens[row, start:start + length]`
    is that sequence."""

    tokens: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray
    labels: np.ndarray
    placement: np.ndarray

    @property
    def budget(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def num_rows(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens."""
        return int(self.placement[:, 2].sum()) if len(self.placement) else 0

    def sequence(self, values: np.ndarray, i: int) -> np.ndarray:
        """The part of a per-token (rows, budget, ...) array `values` (logits, losses) that belongs
        to input sequence `i`."""
        row, start, length = (int(v) for v in self.placement[i])
        return values[row, start : start + length]


def pack_sequences(
    sequences: Sequence[np.ndarray], budget: int, pad_id: int = 0, ignore_index: int = IGNORE_INDEX
) -> PackedRows:
    """Packs 1-D token sequences into rows of `budget` tokens, first-fit in order of decreasing
    length (ties in input order; few rows, deterministic). Padding fills each row's tail with
    `pad_id`, segment id 0, position 0 and label `ignore_index`; the label of a sequence's last
    token is `ignore_index` too (its next token is another sequence's)."""
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget <= 0:
        raise DataError(f"pack_sequences: the row budget must be a positive int, found {budget!r}")
    seqs = []
    for i, s in enumerate(sequences):
        a = np.asarray(s)
        if a.ndim != 1 or a.size == 0 or not np.issubdtype(a.dtype, np.integer):
            raise DataError(
                f"pack_sequences: sequence {i} must be a non-empty 1-D array of token ids, found "
                f"shape {a.shape} of {a.dtype}"
            )
        if a.size > budget:
            raise DataError(f"pack_sequences: sequence {i} has {a.size} tokens, more than the row budget of {budget}")
        seqs.append(a.astype(np.int64, copy=False))
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    free: list[int] = []  # tokens left in each row
    placement = np.zeros((len(seqs), 3), np.int64)
    for i in order:
        n = len(seqs[i])
        row = next((r for r, left in enumerate(free) if left >= n), None)
        if row is None:
            row = len(free)
            free.append(budget)
        placement[i] = (row, budget - free[row], n)
        free[row] -= n
    rows = len(free)
    tokens = np.full((rows, budget), pad_id, np.int64)
    segment_ids = np.zeros((rows, budget), np.int64)
    positions = np.zeros((rows, budget), np.int64)
    labels = np.full((rows, budget), ignore_index, np.int64)
    segments_in_row = np.zeros(rows, np.int64)
    for i in sorted(range(len(seqs)), key=lambda i: (placement[i, 0], placement[i, 1])):
        row, start, n = (int(v) for v in placement[i])
        segments_in_row[row] += 1
        tokens[row, start : start + n] = seqs[i]
        segment_ids[row, start : start + n] = segments_in_row[row]
        positions[row, start : start + n] = np.arange(n)
        labels[row, start : start + n - 1] = seqs[i][1:]
    return PackedRows(tokens, segment_ids, positions, labels, placement)


@dataclass
class BucketGroup:
    """One length bucket of a step's batch: its bound, which sequences of the batch it took
    (`indices`, in batch order), and those sequences packed into rows."""

    bound: int
    indices: np.ndarray
    rows: PackedRows

    @property
    def tokens(self) -> int:
        """Real tokens in the group (what HotSPa reports per group)."""
        return self.rows.num_tokens


def bucket_batch(
    sequences: Sequence[np.ndarray],
    bucket_bounds: Sequence[int],
    row_tokens: int | Sequence[int] | None = None,
    pad_id: int = 0,
    ignore_index: int = IGNORE_INDEX,
) -> list[BucketGroup]:
    """A step's global batch split into one group per bucket of `bucket_bounds` (descending,
    ending with 0; see `bucketize`), each group's sequences packed into rows of `row_tokens`
    tokens (one int for all buckets or one per bucket; default: the bucket's bound). A sequence
    longer than its bucket's row budget (one longer than the first bound, say) is refused with
    its index. Empty buckets give groups without rows."""
    bounds = _check_bounds(bucket_bounds)
    count = len(bounds) - 1
    if row_tokens is None:
        budgets = bounds[:-1]
    elif isinstance(row_tokens, (int, np.integer)):
        budgets = [int(row_tokens)] * count
    else:
        budgets = [int(b) for b in row_tokens]
        if len(budgets) != count:
            raise DataError(f"bucket_batch: row_tokens needs one budget per bucket ({count}), found {len(budgets)}")
    members: list[list[int]] = [[] for _ in range(count)]
    for i, s in enumerate(sequences):
        members[_bucket_of(len(s), bounds)].append(i)
    groups = []
    for k, idx in enumerate(members):
        for i in idx:
            if len(sequences[i]) > budgets[k]:
                raise DataError(
                    f"bucket_batch: sequence {i} has {len(sequences[i])} tokens, more than the row "
                    f"budget of {budgets[k]} of its bucket (bound {bounds[k]})"
                )
        rows = pack_sequences([sequences[i] for i in idx], budgets[k], pad_id, ignore_index)
        groups.append(BucketGroup(bounds[k], np.asarray(idx, np.int64), rows))
    return groups


__all__ = ["BucketGroup", "IGNORE_INDEX", "PackedRows", "bucket_batch", "bucketize", "pack_sequences"]
