"""Distributed states carried by the IR, and the default deduction rule."""

import pytest

import luoshu as ls
from luoshu.core.dstates import DUPLICATE, PARTIAL


def test_dstates_validates_counts_and_order():
    ds = ls.DStates(4, {0: 2, DUPLICATE: 2})
    assert ds.get(0) == 2 and ds.get(1) == 1 and ds.order == (-1, 0)
    assert ls.DStates.duplicate(4).is_pure_duplicate()
    with pytest.raises(ls.Error, match="multiply to 4"):
        ls.DStates(4, {0: 3})
    with pytest.raises(ls.Error, match="order"):
        ls.DStates(4, {0: 2, PARTIAL: 2}, order=(0, 1))
    with pytest.raises(ls.Error, match="distinct"):
        ls.DeviceGroup([0, 0])


def test_default_rule_needs_duplicates_and_elementwise_keeps_splits():
    relu = ls.core.get_opdef("relu")
    split = ls.DStates(2, {0: 2})
    assert relu.deduce_states([split]) == [split]
    with pytest.raises(ls.Error, match="matmul.*no distributed-states rule"):
        ls.core.get_opdef("matmul").deduce_states([split, None])
    dup = ls.DStates.duplicate(2)
    assert ls.core.get_opdef("matmul").deduce_states([dup, dup]) == [dup]


def test_tensors_carry_an_empty_states_list():
    assert ls.tensor([1.0]).ds == []
