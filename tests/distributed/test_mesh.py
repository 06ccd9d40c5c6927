"""DeviceMesh: Megatron's rank order, the groups of every axis, batch shares and bad sizes."""

from __future__ import annotations

import pytest

import luoshu as ls
from luoshu.distributed import DeviceMesh


def test_tp_ranks_are_adjacent_then_dp_then_pp():
    mesh = DeviceMesh(dp=2, tp=2, pp=2, world_size=8, rank=5)
    assert mesh.coordinate() == {"pp": 1, "dp": 0, "tp": 1}
    assert mesh.group("tp").ranks == (4, 5)
    assert mesh.group("dp").ranks == (5, 7)
    assert mesh.group("pp").ranks == (1, 5)
    assert [g.ranks for g in mesh.groups("tp")] == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert [g.ranks for g in mesh.groups("dp")] == [(0, 2), (1, 3), (4, 6), (5, 7)]
    assert [g.ranks for g in mesh.groups("pp")] == [(0, 4), (1, 5), (2, 6), (3, 7)]
    for r in range(8):
        assert mesh.rank_of(**mesh.coordinate(r)) == r


def test_groups_are_cached():
    mesh = DeviceMesh(dp=2, tp=2, world_size=4, rank=3)
    assert mesh.group("tp") is mesh.group("tp")
    assert mesh.process_group("tp") is None  # one process: collectives are identities


def test_batch_slice_is_the_dp_share():
    assert DeviceMesh(dp=2, tp=2, world_size=4, rank=3).batch_slice(8) == slice(4, 8)
    assert DeviceMesh(dp=2, tp=2, world_size=4, rank=1).batch_slice(8) == slice(0, 4)
    with pytest.raises(ls.Error, match="global batch of 7 rows does not split over dp=2"):
        DeviceMesh(dp=2, world_size=2).batch_slice(7)


def test_bad_sizes_name_them():
    with pytest.raises(
        ls.Error,
        match=r"DeviceMesh\(dp=2, tp=2, pp=2\): dp \* tp \* pp = 8 must equal the world "
        "size 4",
    ):
        DeviceMesh(dp=2, tp=2, pp=2, world_size=4)
    with pytest.raises(ls.Error, match="tp must be a positive int, found 0"):
        DeviceMesh(tp=0, world_size=1)
    with pytest.raises(ls.Error, match="unknown axis 'ep'"):
        DeviceMesh(world_size=1).group("ep")
    assert DeviceMesh().world_size == 1  # the job's own world (one process here)
