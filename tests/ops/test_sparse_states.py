"""The distributed-states rules of luoshu/ops/sparse.py: feature dimensions may be split,
node and edge rows may not, partial inputs pass only through linear ops."""

from __future__ import annotations

import pytest

import luoshu as ls
from luoshu.core.dstates import DStates

get = ls.core.get_opdef
DUP = DStates.duplicate(2)
COLS = DStates(2, {1: 2})
ROWS = DStates(2, {0: 2})
PARTIAL = DStates(2, {-2: 2})


def test_spmm_keeps_a_feature_split_and_partial_sums():
    spmm = get("spmm")
    assert spmm.deduce_states([DUP] * 7 + [COLS], transpose=False) == [COLS]
    assert spmm.deduce_states([None] * 7 + [PARTIAL], transpose=True) == [PARTIAL]
    with pytest.raises(ls.Error, match="node/edge dimension 0"):
        spmm.deduce_states([None] * 7 + [ROWS], transpose=False)
    with pytest.raises(ls.Error, match="needs input 6"):
        spmm.deduce_states([None] * 6 + [ROWS, DUP], transpose=False)


def test_scatter_and_softmax_rules():
    scatter, softmax, sddmm = get("scatter_reduce"), get("segment_softmax"), get("sddmm")
    assert scatter.deduce_states([COLS, None], reduce="max", num_segments=3) == [COLS]
    assert scatter.deduce_states([PARTIAL, None], reduce="mean", num_segments=3) == [PARTIAL]
    with pytest.raises(ls.Error, match="must not be partial"):
        scatter.deduce_states([PARTIAL, None], reduce="max", num_segments=3)
    assert softmax.deduce_states([COLS, None, None], num_segments=None) == [COLS]
    with pytest.raises(ls.Error, match="must not be partial"):
        softmax.deduce_states([PARTIAL, None], num_segments=3)
    assert sddmm.deduce_states([None] * 6 + [DUP, DUP]) == [DUP]
    with pytest.raises(ls.Error, match="partial dot products"):
        sddmm.deduce_states([None] * 6 + [COLS, COLS])
