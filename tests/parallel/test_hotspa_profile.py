"""Profiling inputs of the strategy search: per-layer points on this machine, the fitted cost model,
`strategies="auto"` under a memory budget."""

from __future__ import annotations

import dataclasses
import itertools

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


PIPELINE_SEQS = [256] * 8  # 8 full rows: 4 a replica under dp2·pp2, 8 under dp1·tp2·pp2; 2 micro-batches each


def test_a_pipeline_stage_overhead_adds_its_seconds_per_micro_batch_on_the_critical_path(profiled):
    """A profile whose pipeline stages take o more seconds per micro-batch (`stage_overhead_s`, per tp)
    predicts each pipeline strategy's step (HotSPa's runtime: pp micro-batches a replica, 1F1B)
    longer by o times the m + pp - 1 micro-batch slots of the critical path (no cores bound here),
    and every rank busier by o per micro-batch; pp = 1 strategies do not change."""
    _, prof = profiled
    base = dataclasses.replace(prof, cores=None, stage_overhead_s=())
    over = {1: 0.004, 2: 0.007}
    charged = dataclasses.replace(base, stage_overhead_s=tuple(over.items()))
    names = ["dp4,tp1,pp1", "dp2,tp2,pp1", "dp2,tp1,pp2", "dp1,tp2,pp2"]
    seqs = [np.zeros(n, np.int64) for n in PIPELINE_SEQS]
    before, after = P.predict_static(base, seqs, names, 256), P.predict_static(charged, seqs, names, 256)
    for name in names:
        st = H.parse_strategy(name)
        m = st.pp if st.pp > 1 else 0  # each replica's rows (4 or 8) in pp micro-batches
        want = over[st.tp] * (m + st.pp - 1) if st.pp > 1 else 0.0
        assert after[name] - before[name] == pytest.approx(want, rel=1e-9, abs=1e-12), name
        parts = [H.predict(p.spec, P.cluster(p, 4), st, PIPELINE_SEQS, 256, st.pp).parts["run_busy"]
                 for p in (base, charged)]
        assert parts[1] - parts[0] == pytest.approx(4 * m * over[st.tp] if st.pp > 1 else 0.0, abs=1e-12), name


def test_a_pipelines_rows_are_padded_to_a_multiple_of_its_micro_batches(profiled):
    """HotSPa's runtime pads a pipeline replica's rows to a multiple of its micro-batches (rows
    without targets that run through the kernels all the same): 3 rows in 2 micro-batches cost
    the stage what 4 do; a pp = 1 strategy runs its 3 rows as they are."""
    _, prof = profiled
    cl = P.cluster(prof, 4)
    stage = [H.pipeline_stage_time(prof.spec, cl, H.Strategy(2, 1, 2), [[256]] * n, 256, 2)[0] for n in (3, 4)]
    assert stage[0] == pytest.approx(stage[1], rel=1e-12)
    flat = [H.pipeline_stage_time(prof.spec, cl, H.Strategy(4, 1, 1), [[256]] * n, 256, 1)[0] for n in (3, 4)]
    assert flat[0] < flat[1]


def test_the_stage_overhead_is_the_profiled_pipeline_runs_excess_over_the_cost_models_stage(profiled):
    """`_stage_overheads` recovers a known per-micro-batch excess from pipeline runs timed as the cost
    model's stage (its layers' share of the profiled plan and its messages) plus that excess, and
    clamps a run faster than the model at 0."""
    _, prof = profiled
    cl = P.cluster(prof, 4)
    runs = []
    for tp, extra in ((1, 0.003), (2, -1.0)):
        st = H.Strategy(4 // (2 * tp), tp, 2)
        pts = []
        for b, s_len in ((1, 64), (2, 64), (2, 256)):
            m = min(2, b)
            t_stage, p2p, _ = H.pipeline_stage_time(prof.spec, cl, st, [[s_len]] * b, s_len, m)
            pts.append((b, s_len, m, t_stage + p2p + m * extra))
        runs.append((tp, tuple(pts)))
    fitted = dict(P._stage_overheads(prof, tuple(runs), 4))
    assert fitted[1] == pytest.approx(0.003, rel=1e-9)
    assert fitted[2] == 0.0


def _need(prof, st: str, length: int, world: int) -> float:
    cluster = P.cluster(prof, world)
    s = H.parse_strategy(st)
    return H.predict(prof.spec, cluster, s, [length] * s.dp).memory_bytes * prof.activation_scale


LENGTHS = [256, 200, 60, 40, 30, 12, 10, 8, 6, 4]


def _bucket_needs(prof, world: int, memory: float = float("inf")) -> list[dict]:
    """Per bucket of LENGTHS, each candidate's prediction as the search makes it: packed to the
    bound, as the runtime runs it (a pipeline's micro-batches)."""
    cl = P.cluster(prof, world, memory)
    return [
        {str(st): H.predict(prof.spec, cl, st, seqs, bound, st.pp) for st in P.variants(world, prof.spec)}
        for seqs, bound in zip(H.bucketize(LENGTHS, BOUNDS), BOUNDS)
    ]


def _step(prof, world: int, memory: float, chosen) -> float:
    """The runtime's hot step (`_hot_step(..., runtime=True)`) of bucket i of LENGTHS under chosen[i]."""
    cl = P.cluster(prof, world, memory)
    return H._hot_step(prof.spec, cl, [H.parse_strategy(str(s)) for s in chosen], H.bucketize(LENGTHS, BOUNDS),
                       BOUNDS[:-1], None, runtime=True)[0]


def _brute_force(prof, world: int, memory: float) -> tuple[list[str], float]:
    """The least runtime hot step over every per-bucket assignment of the candidates that fit."""
    needs = _bucket_needs(prof, world, memory)
    options = [[n for n, p in need.items() if p.fits] for need in needs]
    best = min(itertools.product(*options), key=lambda c: _step(prof, world, memory, c))
    return list(best), _step(prof, world, memory, best)


def test_auto_candidates_are_every_runnable_strategy_with_sp_and_recompute(profiled):
    _, prof = profiled
    names = {str(st) for st in P.variants(4, prof.spec)}
    # (dp, tp, pp): dp4, dp2·pp2 (3 recompute options each), dp2·tp2, dp1·tp2·pp2, dp1·tp4 (also with sp)
    assert len(names) == 2 * 3 + 3 * (2 * 3)
    assert {"dp4,tp1,pp1", "dp4,tp1,pp1,rc=full", "dp2,tp2,pp1,sp,rc=selective", "dp1,tp4,pp1,sp",
            "dp2,tp1,pp2,rc=selective", "dp1,tp2,pp2,sp,rc=full"} <= names
    assert "dp4,tp1,pp1,sp" not in names and not any(",pp4" in n for n in names)  # 2 blocks: at most 2 stages
    assert {str(st) for st in P.runnable(4, prof.spec)} == {"dp4,tp1,pp1", "dp2,tp2,pp1", "dp1,tp4,pp1"}
    assert all(H.parse_strategy(n) == st for n, st in zip(map(str, P.variants(4, prof.spec)), P.variants(4, prof.spec)))


def test_auto_choice_is_the_brute_force_optimum_and_a_tight_budget_recomputes_the_long_bucket(profiled):
    _, prof = profiled
    free = P.choose_strategies(prof, 4, BOUNDS, LENGTHS)
    # a budget no plain strategy holds the long bucket in, but a recompute / sp variant does (the
    # predicted bytes are the formula's, so which candidates fit does not depend on the timings)
    needs = _bucket_needs(prof, 4)
    plain_least = min(p.memory_bytes for n, p in needs[0].items() if "rc=" not in n and ",sp" not in n)
    units = 0.99 * plain_least
    assert min(p.memory_bytes for p in needs[0].values()) < units
    budget = units * prof.activation_scale  # in this machine's bytes
    tight = P.choose_strategies(prof, 4, BOUNDS, LENGTHS, memory=budget)
    first = H.parse_strategy(tight[0])
    assert first.sp or first.recompute != "none", tight  # the long bucket recomputes (or splits its sequence)
    for st, need in zip(tight, _bucket_needs(prof, 4, budget)):
        assert need[st].fits
    for memory, chosen in ((float("inf"), free), (budget, tight)):
        best, seconds = _brute_force(prof, 4, memory)
        assert _step(prof, 4, memory, chosen) == pytest.approx(seconds, rel=1e-12), (chosen, best)
    # without a budget recompute only costs time; sp may tie with plain tp in the model's time
    assert all(H.parse_strategy(st).recompute == "none" for st in free), free


def test_auto_over_8_ranks_takes_a_pipeline_where_only_one_holds_the_long_bucket(profiled):
    """8 ranks, 4 heads, 2 blocks: only dp1·tp4·pp2 (a pipeline of two tp4 stages) holds an eighth of
    the model states per rank; under a budget no pp = 1 candidate holds the long bucket in, the choice
    runs it as a pipeline, and it is the least runtime hot step over every per-bucket assignment."""
    _, prof = profiled
    needs = _bucket_needs(prof, 8)
    flat = min(p.memory_bytes for n, p in needs[0].items() if ",pp1" in n)
    piped = min(p.memory_bytes for n, p in needs[0].items() if ",pp1" not in n)
    assert piped < flat
    budget = (piped + flat) / 2 * prof.activation_scale
    chosen = P.choose_strategies(prof, 8, BOUNDS, LENGTHS, memory=budget)
    assert H.parse_strategy(chosen[0]).pp == 2, chosen
    for st, need in zip(chosen, _bucket_needs(prof, 8, budget)):
        assert need[st].fits
    best, seconds = _brute_force(prof, 8, budget)
    assert _step(prof, 8, budget, chosen) == pytest.approx(seconds, rel=1e-12), (chosen, best)


def test_auto_with_a_budget_nothing_holds_names_the_bucket_and_the_least_need(profiled):
    _, prof = profiled
    least = min(p.memory_bytes for p in _bucket_needs(prof, 4)[0].values()) * prof.activation_scale
    with pytest.raises(ls.Error, match=r"bucket \(64, 256\] \(sequences up to 256 tokens\)") as err:
        P.choose_strategies(prof, 4, BOUNDS, LENGTHS, memory=least * 0.9)
    assert f"the least it needs is {least / 2**20:.2f} MiB" in str(err.value)
    P.choose_strategies(prof, 4, BOUNDS, LENGTHS, memory=least * 1.001)  # just enough: a choice


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


def test_hotspa_auto_under_a_budget_recomputes_the_long_bucket_and_trains():
    """One process: a memory_budget that no plain strategy holds the longest bucket in (by the
    profiled bytes nor by the cost model's own, which HotSPa checks) makes "auto" recompute there."""
    ls.manual_seed(0)
    model = GPT2(GPTConfig(vocab_size=128, block_size=256, n_layer=1, n_head=4, n_embd=32))
    prof = P.profile(model, repeats=1)
    cl = P.cluster(prof, 1)
    need = {st.recompute: H.predict(prof.spec, cl, st, [256], 256).memory_bytes for st in P.variants(1, prof.spec)}
    scales = (1.0, prof.activation_scale)
    budget = 1.01 * max(need["full"] * k for k in scales)
    assert budget < min(need["none"] * k for k in scales)
    hot = ls.parallel.HotSPa(model, "auto", BOUNDS, memory_budget=budget)
    assert hot.recompute[0] != "none", hot.recompute
    opt = ls.optim.SGD(model.parameters(), lr=0.1)
    rng = np.random.default_rng(0)
    batch = [rng.integers(0, 128, n) for n in (200, 50, 9, 5)]
    first = hot.step(batch, opt).loss
    assert hot.step(batch, opt).loss < first


def test_choose_static_takes_the_fastest_strategy_the_budget_holds(profiled):
    """`--parallel auto`'s search over 4 ranks: unbounded, the fastest candidate; with a budget
    between the candidates' needs, one that fits, and every faster candidate does not."""
    _, prof = profiled
    lengths = [256, 64, 40, 16, 16, 8]
    st, best, table = P.choose_static(prof, 4, lengths)
    assert {p.strategy for p in table} == {"dp4,tp1,pp1", "dp2,tp2,pp1", "dp1,tp4,pp1", "dp2,tp1,pp2", "dp1,tp2,pp2"}
    cl = P.cluster(prof, 4)
    for p in table:  # predicted as the runtime runs each (rows of the longest sequence, a pipeline's micro-batches)
        s = H.parse_strategy(p.strategy)
        assert p.time_s == H.predict(prof.spec, cl, s, lengths, 256, s.pp).time_s
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
    """4 processes: the static strategies' measured steps (interleaved rounds), pipelines included
    (dp2·pp2, dp1·tp2·pp2: their stages' per-micro-batch overhead profiled from a real pipeline),
    and the profiled cost model's predictions order them alike. The cost model predicts busy seconds (each rank's
    CPU time, its collectives' threads included, the ranks sharing the machine's cores), so the
    measured side is each round's ranks' busy seconds combined as the model combines them: a
    shared machine's wall clock also holds whatever else it runs at the time (reported, not
    ranked). A pair whose measured steps are within noise (medians within 10 %, or overlapping
    quartiles over the rounds) may come in either order; when every pair is, the test has
    nothing to check and skips (saying so)."""
    from tests.distributed.launcher import launch
    from tests.parallel import hotspa_rank as R

    out = tmp_path / "rank"
    proc = launch(4, "tests/parallel/hotspa_rank.py", "--out", str(out), timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = np.load(f"{out}.npz")
    # the profile timed a real pp = 2 pipeline under tp 1 and 2 (dp2·pp2, dp1·tp2·pp2) at every point
    assert sorted(set(run["pipeline_runs"][:, 0].astype(int))) == [1, 2]
    overhead = run["stage_overhead"]
    assert sorted(overhead[:, 0].astype(int).tolist()) == [1, 2] and (overhead[:, 1] >= 0).all()
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


@pytest.mark.dist
@pytest.mark.slow
def test_auto_chosen_recompute_set_on_4_processes_matches_one_process(tmp_path):
    """The set `strategies="auto"` picks over 4 ranks under a budget that no plain strategy holds
    the long bucket in (so it recomputes or splits the sequence there) trains GPT-2 in float64 as
    one process does (`hotspa_train.reference`)."""
    from tests.distributed.launcher import launch
    from tests.parallel import hotspa_train as T

    prof = P.profile(T.build("gpt2"), lengths=(6, 12, 32), batches=(1, 2), repeats=1)
    lengths = [len(s) for s in next(T.batches())]
    cl = P.cluster(prof, 4)
    seqs = H.bucketize(lengths, T.BOUNDS)[0]
    needs = {str(st): H.predict(prof.spec, cl, st, seqs, T.BOUNDS[0]).memory_bytes for st in P.variants(4, prof.spec)}
    plain = min(v for n, v in needs.items() if "sp" not in n and "rc=" not in n)
    budget = (min(needs.values()) + plain) / 2 * prof.activation_scale
    chosen = P.choose_strategies(prof, 4, T.BOUNDS, lengths, memory=budget)
    assert any(H.parse_strategy(s).sp or H.parse_strategy(s).recompute != "none" for s in chosen), chosen
    out = tmp_path / "auto"
    proc = launch(4, "tests/parallel/hotspa_train.py", "--models", "gpt2", "--strategies", ";".join(chosen),
                  "--out", str(out), timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref_losses, ref_params = T.reference("gpt2")
    for r in range(4):
        run = np.load(f"{out}.gpt2.rank{r}.npz")
        np.testing.assert_allclose(run["losses"], ref_losses, rtol=0, atol=1e-6, err_msg=str(chosen))
        for pname, value in ref_params.items():
            np.testing.assert_allclose(run[pname], value, rtol=0, atol=1e-6, err_msg=f"{chosen} {pname}")


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.timeout(900)  # two (or a profiling) 4-process jobs on shared cores
def test_auto_on_4_processes_takes_a_pipeline_for_the_long_bucket_and_matches_one_process(tmp_path):
    """GPT-2 with 2 heads over 4 ranks (tp at most 2): only a pipeline (dp1·tp2·pp2, dp2·pp2)
    holds a quarter of the model states per rank. The job itself runs `strategies="auto"` (its own
    profile, the runtime's hot step) under a `memory_budget` that no pp = 1 candidate holds the long
    bucket in; the bucket runs as a pipeline, and the training is one process's (float64, 1e-6)."""
    from tests.distributed.launcher import launch
    from tests.parallel import hotspa_train as T

    # the activation bytes the job's profile fits are measured, not timed: this profile's scale is its
    prof = P.profile(T.build("gpt2", heads=2), repeats=1)
    lengths = [len(s) for s in next(T.batches())]
    cl = P.cluster(prof, 4)
    seqs = H.bucketize(lengths, T.BOUNDS)[0]
    # HotSPa's auto holds the choice in the profiled bytes and in the cost model's own: the larger need
    scale = max(prof.activation_scale, 1.0)
    needs = {str(st): H.predict(prof.spec, cl, st, seqs, T.BOUNDS[0], st.pp).memory_bytes * scale
             for st in P.variants(4, prof.spec)}
    flat = min(v for n, v in needs.items() if ",pp1" in n)
    piped = min(v for n, v in needs.items() if ",pp1" not in n)
    assert piped < flat
    out = tmp_path / "auto"
    proc = launch(4, "tests/parallel/hotspa_train.py", "--models", "gpt2", "--heads", "2", "--strategies", "auto",
                  "--budget", repr((piped + flat) / 2), "--out", str(out), timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref_losses, ref_params = T.reference("gpt2", heads=2)
    chosen = None
    for r in range(4):
        run = np.load(f"{out}.gpt2.rank{r}.npz")
        names = [f"{s} rc={c}" for s, c in zip(run["strategies"], run["recompute"])]
        assert chosen is None or names == chosen  # every rank chose alike
        chosen = names
        assert H.parse_strategy(str(run["strategies"][0])).pp == 2, chosen
        assert (run["tokens"] > 0).all()  # every bucket ran under its strategy
        np.testing.assert_allclose(run["losses"], ref_losses, rtol=0, atol=1e-6, err_msg=str(chosen))
        for pname, value in ref_params.items():
            np.testing.assert_allclose(run[pname], value, rtol=0, atol=1e-6, err_msg=f"{chosen} {pname}")
