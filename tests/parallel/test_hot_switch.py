"""The hot-switch planner on hand-made layouts (one process): every needed slice arrives
exactly once from a rank that holds it, one message per pair, same-node senders first, the
destination shards rebuilt bitwise, never worse than first-come-first-served and equal to
the brute-force optimum on small cases."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest

from luoshu.core.dstates import DUPLICATE, DStates
from luoshu.parallel.hot_switch import (
    HotSwitchError,
    Layout,
    best_order,
    brute_force_max_send,
    plan_hot_switch,
    simulate,
)

SHAPE = (8, 12)


def mesh_layout(dp: int, tp: int, pp_stage: int = 0, ranks=None, split_dim: int = 1) -> Layout:
    """A Megatron-style weight layout: split over tp on `split_dim`, duplicated over dp
    (tp ranks adjacent, as DeviceMesh orders them)."""
    states = {}
    if dp > 1:
        states[DUPLICATE] = dp
    if tp > 1:
        states[split_dim] = tp
    order = tuple(k for k in (DUPLICATE, split_dim) if k in states)
    n = dp * tp
    return Layout(DStates(n, states, order), ranks if ranks is not None else range(n))


CASES = {
    "dp2tp2->tp4": (mesh_layout(2, 2), mesh_layout(1, 4)),
    "tp4->dp4": (mesh_layout(1, 4), mesh_layout(4, 1)),
    "dp4->dp2tp2": (mesh_layout(4, 1), mesh_layout(2, 2)),
    "tp2 on dim0 -> tp2 on dim1": (mesh_layout(2, 2, split_dim=0), mesh_layout(2, 2, split_dim=1)),
    # pp2*tp2 -> dp4: this stage's weight lives on ranks 2, 3 (the second stage), every rank needs it
    "pp2tp2->dp4": (mesh_layout(1, 2, ranks=(2, 3)), mesh_layout(4, 1)),
}


def _shards(layout: Layout, full: np.ndarray) -> dict[int, np.ndarray]:
    return {r: full[tuple(slice(a, b) for a, b in box)].copy() for r, box in layout.boxes(full.shape).items()}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("policy", ["balanced", "fcfs"])
def test_every_slice_arrives_once_from_an_owner_and_shards_are_exact(name, policy):
    source, destination = CASES[name]
    full = np.random.default_rng(0).standard_normal(SHAPE)
    plan = plan_hot_switch(SHAPE, 8, source, destination, node_size=2, policy=policy)
    src_boxes, dst_boxes = source.boxes(SHAPE), destination.boxes(SHAPE)
    pairs = [(m.sender, m.receiver) for m in plan.messages]
    assert len(pairs) == len(set(pairs)), "one message per (sender, receiver)"
    for m in plan.messages:
        assert m.sender != m.receiver
        for cell in m.slices:  # from a rank that holds it, to a rank that needs it
            assert all(s0 <= c0 and c1 <= s1 for (c0, c1), (s0, s1) in zip(cell, src_boxes[m.sender]))
            assert all(d0 <= c0 and c1 <= d1 for (c0, c1), (d0, d1) in zip(cell, dst_boxes[m.receiver]))
    # every element of every destination box is covered exactly once (local or received)
    for r, box in dst_boxes.items():
        count = np.zeros(SHAPE, int)
        for cell in plan.local.get(r, []) + [c for m in plan.messages if m.receiver == r for c in m.slices]:
            count[tuple(slice(a, b) for a, b in cell)] += 1
        inside = np.zeros(SHAPE, bool)
        inside[tuple(slice(a, b) for a, b in box)] = True
        assert (count[inside] == 1).all() and (count[~inside] == 0).all()
    out = simulate(plan, _shards(source, full))
    for r, shard in _shards(destination, full).items():
        np.testing.assert_array_equal(out[r], shard)


@pytest.mark.parametrize("name", list(CASES))
def test_balanced_is_never_worse_than_fcfs_and_optimal_on_small_cases(name):
    source, destination = CASES[name]
    balanced = plan_hot_switch(SHAPE, 4, source, destination, node_size=2)
    fcfs = plan_hot_switch(SHAPE, 4, source, destination, node_size=2, policy="fcfs")
    assert balanced.max_send_bytes <= fcfs.max_send_bytes
    assert balanced.inter_node_bytes <= fcfs.inter_node_bytes
    assert balanced.max_send_bytes == brute_force_max_send(SHAPE, 4, source, destination, node_size=2)


def test_same_node_owner_is_preferred():
    # Replicas on ranks 0 (node 0) and 2 (node 1); the halves go to ranks 1 (node 0) and 3 (node 1).
    source = mesh_layout(2, 1, ranks=(0, 2))
    destination = mesh_layout(1, 2, ranks=(1, 3))
    plan = plan_hot_switch(SHAPE, 4, source, destination, node_size=2)
    assert [(m.sender, m.receiver) for m in plan.messages] == [(0, 1), (2, 3)] and plan.inter_node_bytes == 0
    fcfs = plan_hot_switch(SHAPE, 4, source, destination, node_size=2, policy="fcfs")
    assert fcfs.inter_node_bytes == 4 * SHAPE[0] * SHAPE[1] // 2  # rank 0 sends rank 3 its half across nodes
    # tp4 -> dp4: a rank needs slices from both nodes; those on its node come from its node
    plan = plan_hot_switch(SHAPE, 4, mesh_layout(1, 4), mesh_layout(4, 1), node_size=2)
    for m in plan.messages:
        for cell in m.slices:
            owners = [r for r, b in mesh_layout(1, 4).boxes(SHAPE).items()
                      if all(b0 <= c0 and c1 <= b1 for (c0, c1), (b0, b1) in zip(cell, b))]
            if any(o // 2 == m.receiver // 2 for o in owners):
                assert m.sender // 2 == m.receiver // 2


def test_several_owners_spread_the_load():
    """Replicated sources: a receiver that already holds its part needs nothing; where a slice
    has several owners, the balanced planner spreads the sends over them."""
    source, destination = mesh_layout(4, 1), mesh_layout(1, 4)
    balanced = plan_hot_switch(SHAPE, 4, source, destination, node_size=4)
    fcfs = plan_hot_switch(SHAPE, 4, source, destination, node_size=4, policy="fcfs")
    assert balanced.total_bytes == 0 and fcfs.total_bytes == 0  # every rank already holds its part
    # dp2tp2 -> tp4 on one node: slices have two owners; balancing halves the busiest sender
    balanced = plan_hot_switch(SHAPE, 4, mesh_layout(2, 2), mesh_layout(1, 4, ranks=(4, 5, 6, 7)), node_size=8)
    fcfs = plan_hot_switch(SHAPE, 4, mesh_layout(2, 2), mesh_layout(1, 4, ranks=(4, 5, 6, 7)), node_size=8,
                           policy="fcfs")
    assert balanced.max_send_bytes * 2 == fcfs.max_send_bytes


def test_best_order_is_exact():
    costs = [[0, 5, 1], [5, 0, 1], [1, 1, 0]]
    path, total = best_order(costs, owner=0)
    assert path[0] == path[-1] == 0 and total == 7  # 0 -> 2 -> 1 -> 0 or 0 -> 1 -> 2 -> 0 both cost 7
    path, total = best_order([[0, 9, 1], [1, 0, 9], [9, 1, 0]], owner=0)
    assert path == [0, 2, 1, 0] and total == 3


def _orders_by_brute_force(costs, owner):
    """Every order tried, lexicographically (the reference `best_order` must agree with)."""
    others = [i for i in range(len(costs)) if i != owner]
    best = None
    for perm in itertools.permutations(others):
        path = [owner, *perm, owner]
        total = sum(costs[a][b] for a, b in zip(path[:-1], path[1:]))
        if best is None or total < best[1]:
            best = (path, total)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_best_order_equals_brute_force_on_asymmetric_costs(seed):
    rng = np.random.default_rng(seed)
    for n in range(1, 9):
        # small integers: many ties and zeros, where only the tie-break tells orders apart
        high = (2, 4, 1000)[seed % 3]
        costs = rng.integers(0, high, size=(n, n)).tolist()
        owner = int(rng.integers(n))
        assert best_order(costs, owner) == _orders_by_brute_force(costs, owner), (n, owner, costs)
    for n in range(2, 8):
        costs = rng.exponential(size=(n, n)).tolist()
        owner = int(rng.integers(n))
        path, total = best_order(costs, owner)
        ref_path, ref_total = _orders_by_brute_force(costs, owner)
        assert path == ref_path and total == pytest.approx(ref_total, rel=1e-12)
        assert sorted(path[:-1]) == list(range(n)) and path[0] == path[-1] == owner


def test_best_order_on_twelve_strategies_is_fast():
    rng = np.random.default_rng(12)
    n = 12
    costs = rng.integers(1, 100, size=(n, n)).tolist()
    start = time.perf_counter()
    path, total = best_order(costs, owner=5)
    assert time.perf_counter() - start < 10  # 11! = 4e7 orders would take minutes
    assert path[0] == path[-1] == 5 and sorted(path[:-1]) == list(range(n))
    assert total == sum(costs[a][b] for a, b in zip(path[:-1], path[1:]))
    # a known tour: cost 0 along 5 -> 6 -> ... -> 11 -> 0 -> ... -> 4 -> 5, 1000 elsewhere
    ring = [(5 + i) % n for i in range(n + 1)]
    costs = [[1000] * n for _ in range(n)]
    for a, b in zip(ring[:-1], ring[1:]):
        costs[a][b] = 0
    assert best_order(costs, owner=5) == (ring, 0)


def test_bad_input():
    with pytest.raises(HotSwitchError, match="does not split"):
        plan_hot_switch((7, 12), 4, mesh_layout(2, 2, split_dim=0), mesh_layout(1, 4))
    with pytest.raises(HotSwitchError, match="partial"):
        Layout(DStates(2, {-2: 2}), (0, 1))
    with pytest.raises(HotSwitchError, match="distinct ranks"):
        Layout(DStates(2, {DUPLICATE: 2}), (0, 0))
    with pytest.raises(HotSwitchError, match="policy"):
        plan_hot_switch(SHAPE, 4, mesh_layout(2, 2), mesh_layout(1, 4), policy="random")
    with pytest.raises(HotSwitchError, match="owner strategy"):
        best_order([[0]], owner=3)


@pytest.mark.dist
@pytest.mark.timeout(240)
def test_switches_on_four_processes(tmp_path):
    from tests.distributed.launcher import launch

    job = launch(4, "tests/parallel/hot_switch_script.py", str(tmp_path), timeout=200)
    assert job.returncode == 0, job.stderr[-3000:]
    full = np.random.default_rng(0).standard_normal(SHAPE)
    for rank in range(4):
        got = np.load(tmp_path / f"rank{rank}.npz")
        for name, (_, destination) in CASES.items():
            box = destination.boxes(SHAPE).get(rank)
            if box is not None:
                want = full[tuple(slice(a, b) for a, b in box)]
                np.testing.assert_array_equal(got[name], want, err_msg=name)
                np.testing.assert_array_equal(got[f"fused {name}"], want, err_msg=f"fused {name}")


@pytest.mark.parametrize("name", list(CASES))
def test_a_shared_load_balances_a_whole_model_switch(name):
    """Several tensors planned with one `load` spread their senders together: never a larger
    largest send than planning them one by one, strictly smaller where ties repeat (dp2tp2->tp4)."""
    source, destination = CASES[name]
    separate: dict[int, int] = {}
    shared: dict[int, int] = {}
    load: dict[int, int] = {}
    for _ in range(3):
        for r, b in plan_hot_switch(SHAPE, 8, source, destination, node_size=4).send_bytes().items():
            separate[r] = separate.get(r, 0) + b
        for r, b in plan_hot_switch(SHAPE, 8, source, destination, node_size=4, load=load).send_bytes().items():
            shared[r] = shared.get(r, 0) + b
    assert {r: b for r, b in load.items() if b} == shared  # the load is what the plans send
    assert max(shared.values(), default=0) <= max(separate.values(), default=0)
    if name == "dp2tp2->tp4":
        assert max(shared.values()) < max(separate.values())


def test_pp2_tp2_to_dp4_over_two_nodes():
    """A pp2·tp2 model (stage 0 on node 0's ranks 0, 1; stage 1 on node 1's ranks 2, 3; node_size 2)
    switched whole to dp4: each stage's weights reach every rank, the ranks of the stage's own node
    from that node; a weight both stages read (a tied table, duplicated over the stages) crosses no
    node; and the shared load sends no more than planning the tensors one by one."""
    full = np.random.default_rng(1).standard_normal(SHAPE)
    stage0, stage1 = mesh_layout(1, 2, ranks=(0, 1)), mesh_layout(1, 2, ranks=(2, 3))
    tied = mesh_layout(2, 2)  # duplicated over the two stages, split over each stage's tp pair
    dp4 = mesh_layout(4, 1)
    load: dict[int, int] = {}
    plans = [plan_hot_switch(SHAPE, 8, s, dp4, node_size=2, load=load) for s in (stage0, stage1, tied)]
    for plan, source in zip(plans, (stage0, stage1, tied)):
        out = simulate(plan, _shards(source, full))
        for r in range(4):
            np.testing.assert_array_equal(out[r], full)
    for plan, home in zip(plans[:2], (0, 1)):
        # the other node needs the whole weight; each of its ranks gets each half once, over the nodes
        assert plan.inter_node_bytes == 2 * full.size * 8
        for m in plan.messages:
            if m.receiver // 2 == home:
                assert m.sender // 2 == home  # the stage's own node: from a same-node holder
    assert plans[2].inter_node_bytes == 0
    one_by_one = [plan_hot_switch(SHAPE, 8, s, dp4, node_size=2) for s in (stage0, stage1, tied)]
    separate: dict[int, int] = {}
    for plan in one_by_one:
        for r, b in plan.send_bytes().items():
            separate[r] = separate.get(r, 0) + b
    assert max(load.values()) <= max(separate.values())
    # and back: dp4 -> each stage, nothing leaves a node (every rank holds the whole weight)
    for dest in (stage0, stage1, tied):
        assert plan_hot_switch(SHAPE, 8, dp4, dest, node_size=2).total_bytes == 0
