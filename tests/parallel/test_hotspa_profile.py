"""Profiling inputs of the strategy search: per-layer points on this machine, the fitted cost model,
`strategies="auto"` under a memory budget."""

from __future__ import annotations

import numpy as np
import pytest

import luoshu as ls
from luoshu.models.language import GPT2, GPTConfig
from luoshu.parallel import hotspa as H
from luoshu.parallel import hotspa_profile as P

BOUNDS = [256, 64, 16, 0]


@pytest.fixture(scope="module")
def profiled():
    ls.manual_seed(0)
    model = GPT2(GPTConfig(vocab_size=128, block_size=256, n_layer=2, n_head=4, n_embd=64))
    return model, P.profile(model, lengths=(16, 64, 256), batches=(1, 2), repeats=2)


def test_profile_measures_every_point_and_fits_the_cost_model(profiled):
    _, prof = profiled
    assert [(p["batch"], p["length"]) for p in prof.points] == [(b, s) for b in (1, 2) for s in (16, 64, 256)]
    assert prof.flops > 0 and prof.layer_overhead_s >= 0 and prof.activation_scale > 0
    act = {(p["batch"], p["length"]): p["activation_bytes"] for p in prof.points}
    for b in (1, 2):  # a block keeps more activations for longer and for more sequences
        assert act[(b, 16)] < act[(b, 64)] < act[(b, 256)]
    assert act[(2, 256)] > act[(1, 256)]
    # the fitted activation model is the cost model's formula scaled once: within 2x at the longest
    want = prof.activation_scale * H.layer_activation_bytes(prof.spec, 2, 256, 1, False, "none")
    assert 0.5 < act[(2, 256)] / want < 2.0


def _need(prof, st: str, length: int, world: int) -> float:
    cluster = P.cluster(prof, world)
    s = H.parse_strategy(st)
    return H.predict(prof.spec, cluster, s, [length] * s.dp).memory_bytes * prof.activation_scale


def test_auto_strategies_hold_each_bucket_in_the_budget(profiled):
    _, prof = profiled
    lengths = [256, 200, 60, 40, 30, 12, 10, 8, 6, 4]
    free = P.choose_strategies(prof, 4, BOUNDS, lengths)
    assert len(free) == 3 and all(H.parse_strategy(s).dp * H.parse_strategy(s).tp == 4 for s in free)
    budget = (_need(prof, "dp1,tp4,pp1", 256, 4) + _need(prof, "dp2,tp2,pp1", 256, 4)) / 2
    tight = P.choose_strategies(prof, 4, BOUNDS, lengths, memory=budget)
    assert tight[0] == "dp1,tp4,pp1"  # only tp4 holds the longest bucket
    for st, bound in zip(tight, BOUNDS):
        assert _need(prof, st, bound, 4) <= budget * (1 + 1e-9)
    with pytest.raises(ls.Error, match="no strategy holds a bucket of lengths up to 256"):
        P.choose_strategies(prof, 4, BOUNDS, lengths, memory=_need(prof, "dp1,tp4,pp1", 256, 4) * 0.5)


def test_hotspa_auto_in_one_process_trains(profiled):
    ls.manual_seed(0)
    model = GPT2(GPTConfig(vocab_size=128, block_size=256, n_layer=1, n_head=4, n_embd=32))
    hot = ls.parallel.HotSPa(model, "auto", BOUNDS)
    assert [str(m.sizes) for m in hot.meshes] == [str({"pp": 1, "dp": 1, "tp": 1})] * 3
    opt = ls.optim.SGD(model.parameters(), lr=0.1)
    rng = np.random.default_rng(0)
    batch = [rng.integers(0, 128, n) for n in (200, 50, 9, 5)]
    first = hot.step(batch, opt).loss
    assert hot.step(batch, opt).loss < first
    with pytest.raises(ls.Error, match="a list \\(one per bucket\\) or 'auto'"):
        ls.parallel.HotSPa(model, "fastest", BOUNDS)


def test_choose_static_takes_the_fastest_strategy_the_budget_holds(profiled):
    """`--parallel auto`'s search over 4 ranks: unbounded, the fastest candidate; with a budget
    between the candidates' needs, one that fits, and every faster candidate does not."""
    _, prof = profiled
    lengths = [256, 64, 40, 16, 16, 8]
    st, best, table = P.choose_static(prof, 4, lengths)
    assert {p.strategy for p in table} == {"dp4,tp1,pp1", "dp2,tp2,pp1", "dp1,tp4,pp1"}
    assert best.time_s == min(p.time_s for p in table) and str(st) == best.strategy
    needs = sorted(p.memory_bytes for p in table)
    assert needs[0] < needs[-1]
    budget = (needs[0] + needs[1]) / 2  # only the most frugal candidate fits
    st, best, table = P.choose_static(prof, 4, lengths, budget)
    assert best.memory_bytes <= budget
    assert all(p.memory_bytes > budget for p in table if p.time_s < best.time_s)
    assert best.memory_bytes == needs[0]
    with pytest.raises(H.HotSPaError, match=r"no strategy over 4 ranks .* they need dp4,tp1,pp1 .* MiB"):
        P.choose_static(prof, 4, lengths, needs[0] / 2)


NOISE = 0.10  # measured medians closer than this (relative), or with overlapping quartiles, are a tie


def _tied(a: np.ndarray, b: np.ndarray) -> bool:
    ma, mb = np.median(a), np.median(b)
    if abs(ma - mb) <= NOISE * min(ma, mb):
        return True
    qa, qb = np.percentile(a, [25, 75]), np.percentile(b, [25, 75])
    return qa[0] <= qb[1] and qb[0] <= qa[1]


def _busy_steps(busy: np.ndarray, cores: float) -> np.ndarray:
    """Each round's step in busy seconds (rounds x strategies x ranks -> rounds x strategies): the
    slowest rank's, or every rank's summed over the cores they share, whichever is longer (the
    cost model's step, `hotspa.predict`)."""
    return np.maximum(busy.max(axis=2), busy.sum(axis=2) / cores)


@pytest.mark.dist
@pytest.mark.slow
def test_the_profiled_cost_model_ranks_the_static_strategies_as_measured(tmp_path):
    """4 processes: the static strategies' measured steps (interleaved rounds) and the profiled
    cost model's predictions order them alike. The cost model predicts busy seconds (each rank's
    CPU time, its collectives' threads included, the ranks sharing the machine's cores), so the
    measured side is each round's ranks' busy seconds combined as the model combines them: a
    shared machine's wall clock also holds whatever else it runs at the time (reported, not
    ranked). A pair whose measured steps are within noise (medians within 10 %, or overlapping
    quartiles over the rounds) may come in either order; when every pair is, the test has
    nothing to check and skips (saying so)."""
    from tests.distributed.launcher import launch
    from tests.parallel import hotspa_rank as R

    out = tmp_path / "rank"
    proc = launch(4, "tests/parallel/hotspa_rank.py", "--out", str(out), timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = np.load(f"{out}.npz")
    wall, predicted = run["measured"], run["predicted"]
    measured = _busy_steps(run["busy"], float(run["cores"]))
    table = ", ".join(
        f"{s} measured {np.median(measured[:, k]) * 1e3:.0f} ms busy ({np.median(wall[:, k]) * 1e3:.0f} ms wall) "
        f"predicted {predicted[k] * 1e3:.0f} ms"
        for k, s in enumerate(R.STRATEGIES)
    ) + f"; load {run['load'][0]:.1f}"
    told_apart = 0
    for a in range(len(R.STRATEGIES)):
        for b in range(a + 1, len(R.STRATEGIES)):
            if _tied(measured[:, a], measured[:, b]):
                continue
            told_apart += 1
            faster = np.median(measured[:, a]) < np.median(measured[:, b])
            assert (predicted[a] < predicted[b]) == faster, f"{R.STRATEGIES[a]} vs {R.STRATEGIES[b]}: {table}"
    if not told_apart:  # nothing to check: every difference is within noise
        pytest.skip(f"every measured pair is within noise on this machine now: {table}")
