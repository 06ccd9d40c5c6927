"""HotSPa's cost model, simulator and layer-wise strategy search."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from luoshu.core.dstates import DStates
from luoshu.data import DataError, corpus_lengths
from luoshu.distributed.mesh import DeviceMesh
from luoshu.parallel import hotspa as H

CLUSTER8 = H.ClusterSpec(gpus_per_node=8, nodes=1, **H.A800)


@pytest.mark.parametrize("seed", range(12))
def test_layer_search_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    layers, options = int(rng.integers(3, 5)), int(rng.integers(3, 5))
    times = rng.uniform(1, 10, (layers, options)).tolist()
    memories = rng.integers(1, 8, (layers, options)).tolist()
    transition = rng.uniform(0, 3, (options, options)).tolist()
    budget = int(sum(min(m) for m in memories) + rng.integers(0, 6))  # tight: near the least that fits
    path, total = H.search_layers(times, memories, budget, transition)
    expected_path, expected = H.brute_force_layers(times, memories, budget, transition)
    assert total == pytest.approx(expected)
    assert sum(memories[i][c] for i, c in enumerate(path)) <= budget
    recomputed = sum(times[i][c] for i, c in enumerate(path)) + sum(transition[a][b] for a, b in zip(path, path[1:]))
    assert recomputed == pytest.approx(total)


def test_infeasible_budget_is_an_error_not_a_strategy():
    with pytest.raises(H.HotSPaError, match="no choice of options fits 2 layers"):
        H.search_layers([[1, 2], [1, 2]], [[5, 4], [5, 4]], 7)


def test_memory_model_orders_techniques():
    m, b, s = H.LLAMA_7B, 1, 8192
    plain = H.layer_activation_bytes(m, b, s, 4, False, "none")
    sp = H.layer_activation_bytes(m, b, s, 4, True, "none")
    full = H.layer_activation_bytes(m, b, s, 4, True, "full")
    assert full < sp < plain
    # Korthikanti et al.: with sequence parallelism activations divide exactly by tp
    assert H.layer_activation_bytes(m, b, s, 8, True, "none") * 8 == H.layer_activation_bytes(m, b, s, 1, True, "none")


def test_long_sequences_need_frugal_strategies_and_short_ones_run_fastest_in_dp():
    long = H.predict(H.LLAMA_7B, CLUSTER8, H.Strategy(8, 1, 1), [32768])
    assert not long.fits  # 7B under plain DP cannot hold a 32K sequence in 80 GB
    assert H.predict(H.LLAMA_7B, CLUSTER8, H.Strategy(1, 8, 1, sp=True), [32768]).fits
    short = [512] * 64
    dp = H.predict(H.LLAMA_7B, CLUSTER8, H.Strategy(4, 1, 2), short)
    tp = H.predict(H.LLAMA_7B, CLUSTER8, H.Strategy(1, 8, 1, sp=True), short)
    assert dp.fits and dp.time_s < tp.time_s


def test_simulator_reports_every_static_strategy_and_a_hot_switching_plan():
    lengths = corpus_lengths(256, "github", max_len=32768, seed=0)
    result = H.simulate(H.LLAMA_7B, CLUSTER8, lengths, [32768, 16384, 4096, 0])
    assert result["best_static"] is not None and result["best_static"].fits
    assert {p.strategy for p in result["static"]} >= {"dp8,tp1,pp1", "dp1,tp8,pp1,sp", "dp2,tp2,pp2,sp"}
    hot = result["hot_switch"]
    assert hot.memory_bytes <= CLUSTER8.memory and len(hot.parts["buckets"]) == 3
    assert sum(b["sequences"] for b in hot.parts["buckets"]) == len(lengths)
    assert result["speedup"] == pytest.approx(result["best_static"].time_s / hot.time_s)


def test_corpus_lengths_are_long_tailed():
    cc = corpus_lengths(20000, "commoncrawl", max_len=32768, seed=1)
    gh = corpus_lengths(20000, "github", max_len=32768, seed=1)
    assert np.median(cc) < 1000 < np.median(gh) < 2000
    assert (cc > 4096).mean() < 0.1 < (gh > 4096).mean() < 0.35
    assert cc.max() <= 32768 and gh.max() == 32768  # a thin tail to the maximum


def test_bad_input():
    with pytest.raises(DataError, match="strictly descending"):  # bucketize lives in luoshu.data
        H.bucketize([10, 20], [4096, 8192, 0])
    with pytest.raises(H.HotSPaError, match="unknown strategy"):
        H.parse_strategy("dp2,xp4")
    with pytest.raises(H.HotSPaError, match="covers 4 devices, the cluster has 8"):
        H.predict(H.LLAMA_7B, CLUSTER8, H.Strategy(2, 2, 1), [128])
    with pytest.raises(H.HotSPaError, match="needs .* GiB per device"):
        H.simulate(H.LLAMA_7B, CLUSTER8, [32768, 100], [32768, 4096, 0], strategies=["dp8", "dp8"])
    with pytest.raises(H.HotSPaError, match="2 buckets need as many strategies"):
        H.simulate(H.LLAMA_7B, CLUSTER8, [100], [32768, 4096, 0], strategies=["dp8"])
    assert H.parse_strategy("tp4,dp1,pp2") == H.Strategy(1, 4, 2)


@pytest.mark.parametrize(
    "text", ["dp2,tp2,pp1", "dp1,tp4,pp1,sp", "dp1,tp2,pp2,rc=full", "dp2,tp2,pp1,sp,rc=selective", "rc=full,pp2,dp2"]
)
def test_a_strategy_string_round_trips(text):
    st = H.parse_strategy(text)
    assert H.parse_strategy(str(st)) == st
    assert st.recompute == ("full" if "rc=full" in text else "selective" if "selective" in text else "none")


@pytest.mark.parametrize(
    "text,match",
    [
        ("dp2,xp2", "part 'xp2' is none of dpN, tpN, ppN"),
        ("dp2,tp0", "part 'tp0' is none of"),
        ("dp2,rc=attention", "part 'rc=attention': recompute must be rc= one of"),
        ("dp2,recompute", "part 'recompute' is none of"),
    ],
)
def test_an_unknown_strategy_part_is_named(text, match):
    with pytest.raises(H.HotSPaError, match=match):
        H.parse_strategy(text)
    with pytest.raises(H.HotSPaError, match="recompute must be one of"):
        H.Strategy(1, 1, 1, recompute="attention")


@pytest.mark.parametrize("seed", range(12))
def test_best_per_bucket_equals_brute_force_on_synthetic_costs(seed):
    """4-5 buckets, 5-6 candidates with tied model-state bytes, an unvisited (empty) bucket,
    candidates a bucket cannot take (inf), asymmetric switch costs: the DP's total is the brute
    force's minimum and its pick costs that total."""
    rng = np.random.default_rng(seed)
    buckets, k = 4 + seed % 2, 5 + seed % 2
    seconds = rng.uniform(1.0, 10.0, (buckets, k))
    seconds[rng.random((buckets, k)) < 0.2] = np.inf
    seconds[:, rng.integers(k)] = rng.uniform(1.0, 10.0, buckets)  # every bucket has a candidate
    switch = rng.uniform(0.0, 6.0, (k, k))
    np.fill_diagonal(switch, 0.0)
    once = rng.uniform(0.0, 3.0, k)
    frugality = rng.integers(1, 4, k).astype(float)  # ties: the first chosen of least bytes owns
    visited = [True] * buckets
    visited[seed % buckets] = seed % 3 != 0
    cost = lambda a, c: float(switch[a, c])  # noqa: E731
    pick, total = H.best_per_bucket(seconds.tolist(), cost, once.tolist(), frugality.tolist(), visited)
    _, expected = H.brute_force_buckets(seconds.tolist(), cost, once.tolist(), frugality.tolist(), visited)
    assert total == pytest.approx(expected, rel=1e-12)
    owner = min(pick, key=lambda c: frugality[c])
    again, prev = 0.0, owner
    for b, c in enumerate(pick):
        if visited[b]:
            again, prev = again + cost(prev, c) + seconds[b, c], c
    assert again + cost(prev, owner) + once[owner] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("seed", range(12))
def test_best_per_bucket_tour_equals_brute_force_on_synthetic_costs(seed):
    """The runtime's step (switches a function of the owner and the set of strategies visited):
    the DP's total is the brute force's minimum over every combination and its pick costs it."""
    rng = np.random.default_rng(100 + seed)
    buckets, k = 4 + seed % 2, 5 + seed % 2
    seconds = rng.uniform(1.0, 10.0, (buckets, k))
    seconds[rng.random((buckets, k)) < 0.2] = np.inf
    seconds[:, rng.integers(k)] = rng.uniform(1.0, 10.0, buckets)
    there = rng.uniform(0.0, 6.0, (k, k))  # asymmetric: parameters along a path, gradients back
    np.fill_diagonal(there, 0.0)
    once = rng.uniform(0.0, 3.0, k)
    frugality = rng.integers(1, 4, k).astype(float)
    visited = [True] * buckets
    visited[seed % buckets] = seed % 3 != 0

    def tour(o, used):  # the cheapest path from o through the others, each one's gradients back to o
        others = sorted(used - {o})
        paths = [sum(there[a, b] for a, b in zip((o, *p), p)) for p in itertools.permutations(others)]
        return min(paths) + sum(there[c, o] for c in others)

    args = (seconds.tolist(), tour, once.tolist(), frugality.tolist(), visited)
    pick, total = H.best_per_bucket_tour(*args)
    _, expected = H.brute_force_buckets_tour(*args)
    assert total == pytest.approx(expected, rel=1e-12)
    owner = min(pick, key=lambda c: frugality[c])
    used = frozenset(c for b, c in enumerate(pick) if visited[b])
    again = sum(seconds[b, c] for b, c in enumerate(pick) if visited[b]) + tour(owner, used) + once[owner]
    assert again == pytest.approx(expected, rel=1e-12)


def test_runtime_switches_follow_the_best_order_one_way_and_gradients_back():
    """`runtime_switches_time`: parameters from the owner along the cheapest path (no way back),
    every other strategy's gradients back to the owner; the order of `visited` does not matter."""
    cluster = H.ClusterSpec(4, 1, 1e12, 1e9, 1e9, 1e12, switch_overhead=1e-3, switch_message_overhead=1e-4,
                            value_bytes=4)
    spec = H.ModelSpec(layers=2, hidden=64, heads=4, vocab=256)
    tp4, tp2, tp1 = (H.parse_strategy(s) for s in ("dp1,tp4", "dp2,tp2", "dp4,tp1"))
    one = lambda a, b: H.runtime_switch_time(spec, cluster, a, b)  # noqa: E731
    assert one(tp4, tp4) == 0.0 and one(tp1, tp4) == pytest.approx(1e-3)  # split from duplicated: local copies
    # duplicated from split: every rank sends its quarter of every tensor to the 3 others, receives theirs
    quarter = 4 * (spec.layers * spec.layer_params - 2 * spec.layers * spec.hidden + 2 * spec.vocab * spec.hidden) / 4
    assert H.runtime_switch_plan(spec, cluster, tp4, tp1) == (pytest.approx(3 * quarter, rel=0.02), 6)
    assert one(tp4, tp1) == pytest.approx(1e-3 + 6e-4 + H.runtime_switch_bytes(spec, cluster, tp4, tp1) / 1e9)
    paths = [one(tp4, tp2) + one(tp2, tp1), one(tp4, tp1) + one(tp1, tp2)]
    expected = min(paths) + one(tp2, tp4) + one(tp1, tp4)
    for visited in ([tp4, tp2, tp1], [tp1, tp2, tp4, tp2]):
        assert H.runtime_switches_time(spec, cluster, tp4, visited) == pytest.approx(expected)
    assert H.runtime_switches_time(spec, cluster, tp4, [tp4]) == 0.0


def test_runtime_layouts_are_the_runtimes_own_over_a_pipelines_stages():
    """`runtime_layouts` (the cost model's) lay a weight out as `hotspa_runtime._world_layout` does
    (the runtime's): the same boxes on the same ranks, for every stage set of dp·tp·pp meshes."""
    from luoshu.parallel.hotspa_runtime import _world_layout

    shape = (8, 12)
    for dp, tp, pp in ((1, 2, 2), (2, 1, 2), (1, 1, 4), (2, 2, 1), (1, 4, 2)):
        mesh = DeviceMesh(dp=dp, tp=tp, pp=pp, world_size=dp * tp * pp, rank=0)
        st = H.Strategy(dp, tp, pp)
        for stages in ([0], [pp - 1], sorted({0, pp - 1})):
            col, row = H.runtime_layouts(st, stages)
            for dim, layout in ((0, col), (1, row)):
                ds = DStates(tp, {dim: tp}) if tp > 1 else DStates(1, {})
                assert layout.boxes(shape) == _world_layout(ds, mesh, stages).boxes(shape), (dp, tp, pp, stages)


def test_a_pipelines_runtime_switch_sends_each_stages_layers_from_its_ranks():
    """dp1·pp2 -> dp2 on 2 ranks (worked by hand): each rank holds its stage's layer and both the
    tables (the first and the last stage read them), so each sends its layer's weights to the other,
    one message each way; back, every rank already holds what its stage reads: nothing is sent."""
    cluster = H.ClusterSpec(2, 1, 1e12, 1e9, 1e9, 1e12, value_bytes=4)
    spec = H.ModelSpec(layers=2, hidden=64, heads=4, vocab=256)
    pp2, dp2 = H.parse_strategy("dp1,pp2"), H.parse_strategy("dp2")
    layer = 4 * (4 * spec.hidden**2 + 3 * spec.hidden * spec.ffn_dim)
    assert H.layer_stages(spec, 2) == [0, 1] and H.layer_stages(H.ModelSpec(5, 64, 4, 256), 2) == [0, 0, 0, 1, 1]
    assert H.runtime_switch_plan(spec, cluster, pp2, dp2) == (layer, 2)
    assert H.runtime_switch_plan(spec, cluster, dp2, pp2) == (0, 0)
    # dp1·tp2·pp2 -> dp4: a stage's two ranks each hold half its layer (the only copy), which the three
    # other ranks need; the tables' halves are on both stages, each sent once to the rank lacking it.
    # Each rank sends to and receives from all three others
    four = dataclasses.replace(cluster, gpus_per_node=4)
    table_half = spec.vocab * spec.hidden * 4
    assert H.runtime_switch_plan(spec, four, H.parse_strategy("dp1,tp2,pp2"), H.parse_strategy("dp4")) == (
        3 * layer // 2 + table_half, 6)


def test_runtime_simulation_picks_the_brute_force_optimum_of_its_hot_step():
    """`simulate(..., runtime=True)`'s choice per bucket costs what the least `_hot_step` over every
    combination of the candidates that fit costs, with the runtime's per-bucket gradient syncs
    and its switches (an overhead large enough that the fastest strategy per bucket, switches
    ignored, is not the optimum), the long bucket kept off the strategies that need most memory."""
    spec = H.ModelSpec(layers=2, hidden=64, heads=4, vocab=256, flash_attention=False)
    cluster = H.ClusterSpec(4, 1, 2e9, 1e9, 1e9, float("inf"), mfu=1.0, latency=((2, 1e-3), (4, 1.5e-3)),
                            layer_collectives=10, run_collectives=3, update_seconds=2e-9, value_bytes=4,
                            cores=2.0, switch_overhead=0.05)
    options = [H.parse_strategy(s) for s in ("dp4,tp1", "dp2,tp2", "dp1,tp4", "dp2,tp2,sp", "dp1,tp4,sp")]
    lengths = [512, 400, 130, 100, 90, 30, 20, 12, 8, 6, 5, 4]
    bounds = [512, 128, 32, 0]
    buckets = H.bucketize(lengths, bounds)
    need = {str(st): H.predict(spec, cluster, st, buckets[0], bounds[0], 1).memory_bytes for st in options}
    cluster = dataclasses.replace(cluster, memory=(need["dp1,tp4,pp1"] + need["dp2,tp2,pp1"]) / 2)
    result = H.simulate(spec, cluster, lengths, bounds, options=options, candidates=len(options), runtime=True)

    def step(chosen):
        return H._hot_step(spec, cluster, list(chosen), buckets, bounds[:-1], None, runtime=True)[0]

    def fits(chosen):
        return all(H.predict(spec, cluster, st, seqs, b).fits for st, seqs, b in zip(chosen, buckets, bounds))

    combos = [c for c in itertools.product(options, repeat=len(buckets)) if fits(c)]
    best = min(step(c) for c in combos)
    assert step(result["chosen"]) == pytest.approx(best, rel=1e-12)
    assert result["hot_switch"].time_s == pytest.approx(best, rel=1e-12)
    alone = min(combos, key=lambda c: sum(H.predict(spec, cluster, st, seqs, b, 1).time_s
                                          for st, seqs, b in zip(c, buckets, bounds)))
    assert step(alone) > best * 1.01  # the switches change the choice
