"""The layer-wise strategy search (`luoshu.parallel.layerwise`): exact against brute force (the stage
program and the real recompute option set of a model), a tight budget recomputes some layers and
the plan's measured peak fits what the cost model assumed, an infeasible budget names the least
memory needed, recompute changes no number, and the pipeline split is searched too."""

from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pytest

import luoshu as ls
from luoshu.models.language import GPT2, GPTConfig
from luoshu.parallel import hotspa as H
from luoshu.parallel import hotspa_profile as P
from luoshu.parallel import layerwise as LW
from tests.distributed.launcher import launch

ROWS, ROW_LEN = 4, 32
LENGTHS = [32, 30, 24, 20, 12, 9, 5, 3]


def _model(n_layer: int = 3, dtype: str = "float32"):
    ls.manual_seed(3)
    model = GPT2(GPTConfig(vocab_size=32, block_size=ROW_LEN, n_layer=n_layer, n_head=4, n_embd=16))
    return model.to(dtype=dtype)


def _profile(model) -> P.Profile:
    """Fixed rates (no timing): every run and every rank finds the same plan."""
    return P.Profile(H.model_spec(model), flops=2e9, layer_overhead_s=1e-5)


@pytest.fixture(scope="module")
def measured():
    model = _model()
    return model, LW.measure_layers(model, ROWS, ROW_LEN)


def test_the_stage_program_equals_brute_force_over_every_split_and_choice():
    rng = np.random.default_rng(0)
    for trial in range(12):
        layers, pp = int(rng.integers(2, 6)), int(rng.integers(1, 4))
        if layers < pp:
            continue
        seconds = rng.uniform(1, 3, (layers, 3)).round(3).tolist()
        saved = [rng.integers(1, 9, (layers, 3)).tolist() for _ in range(pp)]
        extra = rng.integers(0, 6, 3).tolist()
        budgets = rng.integers(8, 30, pp).tolist()
        fixed = rng.uniform(0, 2, pp).tolist()
        try:
            expected = LW.brute_force_stages(seconds, saved, extra, budgets, fixed)
        except ls.Error:
            with pytest.raises(H.HotSPaError, match="no split of"):
                LW.search_stages(seconds, saved, extra, budgets, fixed)
            continue
        starts, choices, slowest = LW.search_stages(seconds, saved, extra, budgets, fixed)
        assert slowest == pytest.approx(expected), trial
        # the returned split and choices reach that time and fit every stage
        ends = starts[1:] + [layers]
        assert starts[0] == 0 and all(a < b for a, b in zip(starts, ends))
        worst = 0.0
        for s, (i, j) in enumerate(zip(starts, ends)):
            span = range(i, j)
            memory = sum(saved[s][k][choices[k]] for k in span) + sum(extra[c] for c in {choices[k] for k in span})
            assert memory <= budgets[s]
            worst = max(worst, sum(seconds[k][choices[k]] for k in span) + fixed[s])
        assert worst == pytest.approx(slowest)


def _brute_force_plan(prof, model, mem, budget: float) -> float:
    """The least predicted step time over every per-layer recompute choice of dp1,tp1,pp1 whose
    predicted peak (the module's formula, in bytes) fits the budget."""
    spec = prof.spec
    cl = P.cluster(prof, 1)
    per_block, outside = LW._held(model, 1)
    seconds = {c: H.layer_time(spec, cl, ROWS, ROW_LEN, 1, False, c) for c in LW.RECOMPUTE}
    base = H.predict(spec, cl, H.Strategy(1, 1, 1), LENGTHS, ROW_LEN, micro_batches=1).time_s
    best = math.inf
    for pick in itertools.product(LW.RECOMPUTE, repeat=spec.layers):
        peak = 16 * (outside + sum(per_block)) + mem.outside + sum(mem.saved[c] for c in pick)
        peak += sum(mem.extra[c] for c in set(pick))
        if peak <= budget:
            best = min(best, base + sum(seconds[c] - seconds["none"] for c in pick))
    return best


def test_the_plan_equals_brute_force_with_the_real_option_set(measured):
    model, mem = measured
    prof = _profile(model)
    free = LW.plan_for(prof, model, H.Strategy(1, 1, 1), ROWS, ROW_LEN, LENGTHS, math.inf, lambda r: mem)
    assert free.recompute == ["none"] * 3
    assert mem.saved["full"] < mem.saved["selective"] < mem.saved["none"]  # what recompute is for
    for fraction in (1.0, 0.95, 0.9, 0.8, 0.7, 0.6):
        budget = float(int(free.memory_bytes * fraction) // 4 * 4)
        expected = _brute_force_plan(prof, model, mem, budget)
        # memory units of 4 bytes: every byte count is a multiple, so the program is exact in bytes
        plan = LW.plan_for(prof, model, H.Strategy(1, 1, 1), ROWS, ROW_LEN, LENGTHS, budget, lambda r: mem,
                           resolution=int(budget) // 4)
        if math.isinf(expected):
            assert not isinstance(plan, LW.LayerPlan), fraction
            continue
        assert isinstance(plan, LW.LayerPlan), fraction
        assert plan.time_s == pytest.approx(expected, rel=1e-12), fraction
        assert plan.memory_bytes <= budget


def _peak(model, choices) -> int:
    """The measured peak activation bytes of the model's HotSPa training graph with `choices` applied."""
    LW.apply_plan(model, choices)
    g, fetches, phs, _ = P._lm_graph(model)
    return int(g.memory(fetches, P._lm_feeds(phs, 32, ROWS, ROW_LEN, np.random.default_rng(0))).peak_activations)


def test_a_tight_budget_recomputes_some_layers_and_the_measured_peak_fits(measured):
    model, mem = measured
    prof = _profile(model)
    free, _ = LW.search_plan(prof, model, 1, ROWS, ROW_LEN, LENGTHS, measured=lambda r: mem)
    assert free.recompute == ["none"] * 3
    least = LW.plan_for(prof, model, H.Strategy(1, 1, 1), ROWS, ROW_LEN, LENGTHS, 1.0, lambda r: mem)
    seen = set()
    for fraction in (0.1, 0.3, 0.5, 0.7, 0.9):
        budget = least + (free.memory_bytes - least) * fraction
        plan, _ = LW.search_plan(prof, model, 1, ROWS, ROW_LEN, LENGTHS, budget, measured=lambda r: mem)
        assert plan.memory_bytes <= budget
        assert any(c != "none" for c in plan.recompute), fraction
        seen.add(tuple(plan.recompute))
        peak = _peak(_model(), plan.recompute)
        # the plan's own accounting against what the cost model assumed
        assert peak <= plan.parts["predicted_activation_bytes"], (plan.recompute, peak)
        assert peak + plan.parts["predicted_state_bytes"] <= budget
    assert any(len(set(choices)) > 1 for choices in seen), seen  # some plans recompute only some layers


def test_an_infeasible_budget_names_the_least_memory_needed(measured):
    model, mem = measured
    prof = _profile(model)
    with pytest.raises(H.HotSPaError, match="the least memory needed is") as info:
        LW.search_plan(prof, model, 1, ROWS, ROW_LEN, LENGTHS, 2**16, measured=lambda r: mem)
    least = float(re.search(r"the least memory needed is ([\d.]+) MiB", str(info.value)).group(1)) * 2**20
    assert "dp1,tp1,pp1" in str(info.value)
    plan, _ = LW.search_plan(prof, model, 1, ROWS, ROW_LEN, LENGTHS, least * 1.02, measured=lambda r: mem)
    assert plan.recompute == ["full"] * 3  # the least is every layer fully recomputed
    with pytest.raises(H.HotSPaError):
        LW.search_plan(prof, model, 1, ROWS, ROW_LEN, LENGTHS, least * 0.98, measured=lambda r: mem)


def test_recompute_per_layer_changes_no_number():
    """One process, float64: HotSPa steps of a model with mixed recompute marks equal those of
    the plain model (the recomputed activations are the forward's)."""
    rng = np.random.default_rng(1)
    batch = [rng.integers(0, 32, n) for n in (32, 20, 11, 7, 4, 3)]
    runs = []
    for choices in (["none"] * 3, ["selective", "full", "none"]):
        model = LW.apply_plan(_model(dtype="float64"), choices)
        hot = ls.parallel.HotSPa(model, ["dp1,tp1,pp1"], [ROW_LEN, 0])
        opt = ls.optim.AdamW(model.parameters(), lr=1e-2)
        runs.append([hot.step(batch, opt).loss for _ in range(3)])
    np.testing.assert_allclose(runs[1], runs[0], rtol=0, atol=1e-12)


def test_apply_plan_marks_exactly_the_chosen_blocks():
    model = _model()
    model.h[0]._recompute = True  # an old mark is cleared
    LW.apply_plan(model, ["none", "selective", "full"])
    assert not model.h[0].__dict__.get("_recompute") and not model.h[0].attn.__dict__.get("_recompute")
    assert model.h[1].attn.__dict__.get("_recompute") and not model.h[1].__dict__.get("_recompute")
    assert model.h[2].__dict__.get("_recompute")
    with pytest.raises(H.HotSPaError, match="one of"):
        LW.apply_plan(model, ["none", "some", "full"])
    with pytest.raises(H.HotSPaError, match="3 blocks need as many"):
        LW.apply_plan(model, ["none"])


def test_candidates_cover_sequence_parallelism_and_pipelines(measured):
    """Four ranks: sp per strategy (it holds fewer activation bytes than the same tp without it)
    and, with `pipeline=True`, pp > 1 with the split searched (a valid first layer per stage)."""
    model, mem = measured
    prof = _profile(model)
    best, table = LW.search_plan(prof, model, 4, 4, ROW_LEN, LENGTHS * 2, measured=lambda r: mem, pipeline=True)
    plans = {p.text: p for _, p, _ in table}
    wanted = {"dp4,tp1,pp1", "dp2,tp2,pp1", "dp2,tp2,pp1,sp", "dp1,tp4,pp1,sp", "dp2,tp1,pp2", "dp1,tp2,pp2,sp"}
    assert wanted <= set(plans)
    for tp in (2, 4):
        plain, sp = plans[f"dp{4 // tp},tp{tp},pp1"], plans[f"dp{4 // tp},tp{tp},pp1,sp"]
        assert sp.parts["predicted_activation_bytes"] < plain.parts["predicted_activation_bytes"]
        assert sp.time_s == plain.time_s  # the same bytes, moved as all-gathers and reduce-scatters
    for p in plans.values():
        assert len(p.stages) == p.strategy.pp and p.stages[0] == 0 and p.stages == sorted(set(p.stages))
        assert p.stages[-1] < 3 and len(p.recompute) == 3
    assert best.time_s == min(p.time_s for p in plans.values())


def test_pipeline_stages_balance_the_head_and_hotspa_takes_them_only_for_pipelines():
    """A large vocabulary makes the last stage's head cost layers: the cost model's split gives that
    stage fewer blocks than the parameter-count balance (3 and 3 of 6), and the slowest stage is
    no slower than under any other split of the same predicted times."""
    ls.manual_seed(0)
    model = GPT2(GPTConfig(vocab_size=50000, block_size=64, n_layer=6, n_head=4, n_embd=32))
    st = H.Strategy(1, 2, 2)
    names = LW.pipeline_stages(model, st, 64)
    assert names[0] == "h.0" and int(names[1].split(".")[1]) > 3
    cl = P.cluster(P.Profile(H.model_spec(model), flops=1e12), 4)
    layer = H.layer_time(H.model_spec(model), cl, 2, 64, 2, False, "none")  # a replica's 2 rows (one per micro-batch)
    head = 6.0 * 2 * 64 * 32 * 50000 / 2 / cl.flops

    def slowest(k: int) -> float:
        return max(k * layer, (6 - k) * layer + head)

    assert slowest(int(names[1].split(".")[1])) == pytest.approx(min(slowest(k) for k in range(1, 6)))
    with pytest.raises(H.HotSPaError, match=r"stages names strategies \[0\], which are not pipeline strategies"):
        ls.parallel.HotSPa(_model(), ["dp1,tp1,pp1"], [ROW_LEN, 0], stages={0: ["h.0"]})


@pytest.mark.dist
@pytest.mark.slow
def test_a_searched_plan_on_4_processes_matches_one_process(tmp_path):
    """float64, 4 processes: a plan the search picks under a budget that makes it recompute (and
    run sequence parallel) trains to the one-process reference's losses and parameters."""
    from tests.parallel import hotspa_train as T

    out = tmp_path / "lw"
    proc = launch(4, "tests/parallel/layerwise_train.py", "--out", str(out), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref_losses, ref_params = T.reference("gpt2")
    for rank in range(4):
        run = np.load(f"{out}.rank{rank}.npz")
        assert any(str(c) != "none" for c in run["recompute"]), run["recompute"]
        np.testing.assert_allclose(run["losses"], ref_losses, rtol=0, atol=1e-6)
        for name, value in ref_params.items():
            np.testing.assert_allclose(run[name], value, rtol=0, atol=1e-6, err_msg=name)


# --- per-block (tp, sp, recompute) -----------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
def test_the_stage_program_with_groups_and_transitions_equals_brute_force(seed):
    """Options in groups (a (tp, sp) each): a stage's memory is Σ saved plus its largest segment's Σ
    extras of the options it uses, consecutive layers pay the transition; tight budgets, pipeline splits."""
    rng = np.random.default_rng(100 + seed)
    checked = 0
    for _ in range(8):
        layers, k, pp = int(rng.integers(3, 5)), int(rng.integers(3, 5)), int(rng.integers(1, 3))
        seconds = rng.uniform(1, 3, (layers, k)).round(3).tolist()
        saved = [rng.integers(1, 9, (layers, k)).tolist() for _ in range(pp)]
        extra = rng.integers(0, 6, k).tolist()
        groups = rng.integers(0, 2, k).tolist()
        transition = rng.uniform(0, 1.5, (k, k)).round(3)
        for c in range(k):  # within a group no re-batch
            for d in range(k):
                if groups[c] == groups[d]:
                    transition[c, d] = 0.0
        transition = transition.tolist()
        budgets = rng.integers(6, 4 * layers, pp).tolist()
        fixed = rng.uniform(0, 2, pp).tolist()
        try:
            expected = LW.brute_force_stages(seconds, saved, extra, budgets, fixed, groups, transition)
        except ls.Error:
            with pytest.raises(H.HotSPaError, match="no split of"):
                LW.search_stages(seconds, saved, extra, budgets, fixed, groups, transition)
            continue
        starts, choices, slowest = LW.search_stages(seconds, saved, extra, budgets, fixed, groups, transition)
        assert slowest == pytest.approx(expected)
        ends = starts[1:] + [layers]
        worst = 0.0
        for s, (i, j) in enumerate(zip(starts, ends)):
            picks = choices[i:j]
            assert sum(saved[s][i + n][c] for n, c in enumerate(picks)) + LW.stage_charge(picks, extra, groups) \
                <= budgets[s]
            moves = sum(transition[a][b] for a, b in zip(picks, picks[1:]))
            worst = max(worst, sum(seconds[i + n][c] for n, c in enumerate(picks)) + moves + fixed[s])
        assert worst == pytest.approx(slowest)
        checked += 1
    assert checked


def test_segment_charges_add_within_a_segment_and_take_the_largest_across():
    extra, groups = [5, 3, 4, 1], [0, 0, 1, 1]
    assert LW.stage_charge([0, 1, 0], extra, groups) == 8  # one segment: 5 + 3
    assert LW.stage_charge([0, 2, 3, 1], extra, groups) == 5  # segments {0}, {2, 3}, {1}: max(5, 5, 3)
    assert LW.stage_charge([1, 2, 1], extra, groups) == 4  # {1}, {2}, {1}: separate plans


def test_rebatch_bytes_and_transition_time_are_the_planners_plan():
    """Hand-computed row re-batches over 4 ranks (rank = replica·tp + member): from tp1 (each rank a
    row) to tp2 each rank lacks one row of its replica's two; to tp4 each rank sends its row to the
    3 others; tp2 to tp4: each rank receives the other replica's 2 rows, the 4 senders balanced;
    to a smaller tp (sub-blocks of rows a rank holds) nothing moves."""
    row = 8 * 16 * 4  # row_len 8, width 16, fp32
    cases = {(1, 2): 1, (1, 4): 3, (2, 4): 2, (2, 1): 0, (4, 1): 0, (4, 2): 0, (2, 2): 0}
    for (src, dst), rows in cases.items():
        assert H.rebatch_bytes(4, 8, 16, 4, src, dst, 4) == rows * row, (src, dst)
    assert H.rebatch_bytes(3, 8, 16, 4, 1, 2, 4) == row  # padded to 4 rows (a multiple of dp 4 and 2)
    with pytest.raises(H.HotSPaError, match="tp 3 does not divide the world of 4"):
        H.rebatch_bytes(4, 8, 16, 4, 1, 3, 4)
    spec = H.ModelSpec(layers=3, hidden=16, heads=4, vocab=32)
    cl = H.ClusterSpec(4, 1, 1e12, 1e9, 1e8, 2**30, latency=((2, 1e-4), (4, 2e-4)), value_bytes=4)
    assert H.transition_time(spec, cl, 4, 8, (1, False), (2, False)) == pytest.approx(1e-4 + row / 1e9)
    assert H.transition_time(spec, cl, 4, 8, (1, False), (4, False)) == pytest.approx(1e-4 + 3 * row / 1e9)
    # forward 2 rows from the other replica; the gradient back to tp2 is local (each rank holds every row)
    assert H.transition_time(spec, cl, 4, 8, (2, False), (4, False)) == pytest.approx(1e-4 + 2 * row / 1e9)
    assert H.transition_time(spec, cl, 4, 8, (2, True), (2, True)) == 0.0
    # sp -> no sp inside tp2: the all-gather of a replica's 2 rows (half of them sent by each member)
    gather = 1e-4 + 0.5 * 2 * row / 1e9
    assert H.transition_time(spec, cl, 4, 8, (2, True), (2, False)) == pytest.approx(gather)
    assert H.transition_time(spec, cl, 4, 8, (2, False), (2, True)) == pytest.approx(gather)  # the gradient's
    # two nodes of 2: rank 0's rows 2 and 3 for tp4 come over the slower links
    two_nodes = H.ClusterSpec(2, 2, 1e12, 1e9, 1e8, 2**30, latency=((2, 1e-4), (4, 2e-4)), value_bytes=4)
    assert H.transition_time(spec, two_nodes, 4, 8, (1, False), (4, False)) == pytest.approx(1e-4 + 3 * row / 1e8)


def _latency_profile(model) -> P.Profile:
    """Fixed rates with costly collectives: tensor parallelism is slow, so only memory makes it worth it."""
    return P.Profile(H.model_spec(model), flops=2e9, layer_overhead_s=1e-5, latency=((2, 1e-3), (4, 2e-3)))


def _brute_force_mixed(mo, budget: float, resolution: int = 2048) -> float:
    """The least time over every per-block option of `mixed_options`, memory in the search's units."""
    unit = max(budget / resolution, 1.0)
    saved = [[math.ceil(b / unit) for b in row] for row in mo.saved]
    extra = [math.ceil(b / unit) for b in mo.extra]
    best = math.inf
    for pick in itertools.product(range(len(mo.options)), repeat=len(mo.seconds)):
        if sum(saved[i][c] for i, c in enumerate(pick)) + LW.stage_charge(pick, extra, mo.groups) > budget // unit:
            continue
        moves = sum(mo.transition[a][b] for a, b in zip(pick, pick[1:]))
        best = min(best, sum(mo.seconds[i][c] for i, c in enumerate(pick)) + moves)
    return best


def test_a_mixed_plan_equals_brute_force_and_wins_only_under_a_tight_budget(measured):
    model, mem = measured
    prof = _latency_profile(model)
    lengths = LENGTHS * 2
    free, table = LW.search_plan(prof, model, 4, 4, ROW_LEN, lengths, measured=lambda r: mem, mixed_tp=True)
    assert not free.mixed and free.text == "dp4,tp1,pp1"  # uniform wins without a budget: tp only costs
    assert table[-1][0] is None and table[-1][1].text == "dp4,tp1,pp1"  # the per-block search agrees
    mo = LW.mixed_options(prof, model, 4, 4, ROW_LEN, lengths, lambda r, st: mem)
    assert {o[:2] for o in mo.options} == {(1, False), (2, False), (2, True), (4, False), (4, True)}
    least = min(n["least_bytes"] for _, _, n in table)
    most = max(n["free_bytes"] for _, _, n in table)
    won = 0
    for fraction in (0.14, 0.3, 0.47, 0.8):
        budget = least + (most - least) * fraction
        best, table = LW.search_plan(prof, model, 4, 4, ROW_LEN, lengths, budget, measured=lambda r: mem,
                                     mixed_tp=True)
        mixed = table[-1][1]
        assert mixed.time_s == pytest.approx(_brute_force_mixed(mo, budget), rel=1e-12), fraction
        assert mixed.memory_bytes <= budget and best.memory_bytes <= budget
        uniform = min(p.time_s for st, p, _ in table if st is not None and isinstance(p, LW.LayerPlan))
        if best.mixed:
            assert len(set(zip(best.tp, best.sp))) > 1 and best.time_s < uniform
            assert best.text.startswith("tp[") and best.as_dict()["tp"] == list(best.tp)
            assert best.stages == [0] and len(best.recompute) == 3
            won += 1
        else:
            assert best.time_s == uniform
    assert won  # some tight budget is met faster by blocks of different tp


def test_mixed_tp_false_searches_uniform_plans_only(measured):
    model, mem = measured
    prof = _latency_profile(model)
    best, table = LW.search_plan(prof, model, 4, 4, ROW_LEN, LENGTHS * 2, 300_000, measured=lambda r: mem)
    assert all(st is not None for st, _, _ in table)
    assert best.tp == (best.strategy.tp,) * 3 and best.sp == (best.strategy.sp,) * 3
    assert best.as_dict()["strategy"] == best.text == str(best.strategy).split(",rc")[0]


def test_an_infeasible_budget_names_the_least_memory_with_mixed_tp(measured):
    model, mem = measured
    prof = _latency_profile(model)
    with pytest.raises(H.HotSPaError, match="the least memory needed is") as info:
        LW.search_plan(prof, model, 4, 4, ROW_LEN, LENGTHS * 2, 2**16, measured=lambda r: mem, mixed_tp=True)
    assert "mixed tp" in str(info.value)
    least = float(re.search(r"the least memory needed is ([\d.]+) MiB", str(info.value)).group(1)) * 2**20
    plan, _ = LW.search_plan(prof, model, 4, 4, ROW_LEN, LENGTHS * 2, least * 1.02, measured=lambda r: mem,
                             mixed_tp=True)
    assert plan.memory_bytes <= least * 1.02
    with pytest.raises(H.HotSPaError):
        LW.search_plan(prof, model, 4, 4, ROW_LEN, LENGTHS * 2, least * 0.98, measured=lambda r: mem, mixed_tp=True)


# --- per-block tp inside pipeline stages -------------------------------------------------------------------
def _brute_force_mixed_stages(mo, budget: float, resolution: int = 2048) -> float:
    """The least slowest-stage time over every split of the blocks into `mo.pp` stages and every
    per-block option, each stage's Σ bytes plus its largest segment charge within the budget (units)."""
    unit = max(budget / resolution, 1.0)
    units = budget // unit
    layers, best = len(mo.seconds), math.inf
    for inner in itertools.combinations(range(1, layers), mo.pp - 1):
        bounds = [0, *inner, layers]
        for pick in itertools.product(range(len(mo.options)), repeat=layers):
            worst = 0.0
            for s in range(mo.pp):
                span = range(bounds[s], bounds[s + 1])
                picks = [pick[i] for i in span]
                need = sum(math.ceil(mo.stage_saved[s][i][pick[i]] / unit) for i in span)
                need += LW.stage_charge(picks, [math.ceil(b / unit) for b in mo.extra], mo.groups)
                if need > units:
                    worst = math.inf
                    break
                moves = sum(mo.transition[a][b] for a, b in zip(picks, picks[1:]))
                worst = max(worst, sum(mo.seconds[i][pick[i]] for i in span) + moves)
            best = min(best, worst)
    return best


def test_per_block_plans_inside_two_pipeline_stages_equal_brute_force(measured):
    """World 4, pp 2: each stage's 2 ranks run its blocks under tp 1 or 2 (sp where 2) and each recompute
    option; the split and the options (3 blocks, 9 options, 2 splits) equal brute force at every budget."""
    model, mem = measured
    prof = _latency_profile(model)
    lengths = LENGTHS * 2
    mo = LW.mixed_options(prof, model, 4, 4, ROW_LEN, lengths, lambda r, st: mem, pp=2)
    assert {o[:2] for o in mo.options} == {(1, False), (2, False), (2, True)}  # tp divides a stage's 2 ranks
    assert mo.pp == 2 and len(mo.stage_saved) == 2
    free, table = LW.search_plan(prof, model, 4, 4, ROW_LEN, lengths, measured=lambda r: mem, mixed_tp=True,
                                 pipeline=True)
    rows = [(p, n) for st, p, n in table if st is None]
    assert [n["pp"] for _, n in rows] == [1, 2]  # every pp dividing the world that 3 blocks can fill
    least = min(n["least_bytes"] for _, _, n in table)
    most = max(n["free_bytes"] for _, _, n in table)
    for fraction in (0.05, 0.14, 0.3, 0.8, 2.0):
        budget = least + (most - least) * fraction
        best, table = LW.search_plan(prof, model, 4, 4, ROW_LEN, lengths, budget, measured=lambda r: mem,
                                     mixed_tp=True, pipeline=True)
        (plan,) = [p for st, p, n in table if st is None and n["pp"] == 2]
        assert plan.time_s == pytest.approx(_brute_force_mixed_stages(mo, budget), rel=1e-12), fraction
        assert plan.memory_bytes <= budget and len(plan.stages) == 2 and plan.stages[0] == 0
        # the plan's own numbers: its slowest stage's time and its stages' bytes
        picks = [mo.options.index((t, v, c)) for t, v, c in zip(plan.tp, plan.sp, plan.recompute)]
        ends = plan.stages[1:] + [3]
        times = [sum(mo.seconds[i][picks[i]] for i in range(a, b))
                 + sum(mo.transition[x][y] for x, y in zip(picks[a:b], picks[a + 1:b]))
                 for a, b in zip(plan.stages, ends)]
        assert max(times) == pytest.approx(plan.time_s, rel=1e-12)
        assert plan.parts["predicted_stage_bytes"] == pytest.approx(
            [sum(mo.stage_saved[s][i][picks[i]] for i in range(a, b)) + mo.charge(picks[a:b])
             for s, (a, b) in enumerate(zip(plan.stages, ends))])
        if plan.mixed:
            assert plan.pp == 2 and plan.text.startswith("pp2,tp[") and plan.as_dict()["pp"] == 2
        else:  # one (tp, sp) throughout: the uniform pipeline strategy, its split the searched one
            assert plan.strategy.pp == 2 and plan.strategy.tp == plan.tp[0]
        assert best.time_s <= plan.time_s or not plan.mixed
    with pytest.raises(H.HotSPaError, match="mixed tp pp2"):
        LW.search_plan(prof, model, 4, 4, ROW_LEN, lengths, 2**16, measured=lambda r: mem, mixed_tp=True,
                       pipeline=True)


def test_a_per_block_pipeline_plan_is_the_hotspa_strategy_it_names():
    """`plan_text` of a per-block plan in two stages: 'pp2,tp[..]' with its recompute, parsed back alike."""
    from luoshu.parallel import mixed_tp

    text = mixed_tp.plan_text(None, ["none", "full", "none"], (2, 1, 2), (True, False, False), pp=2)
    assert text == "pp2,tp[2,1,2],sp[1,0,0],rc[none,full,none]"
    st = H.parse_strategy(text)
    assert st.pp == 2 and st.layer_tp == (2, 1, 2) and st.layer_recompute == ("none", "full", "none")
    plan = LW.LayerPlan(None, ["none"] * 3, [0, 2], 1.0, 1.0, {}, (2, 1, 2), (True, False, False), 2)
    assert plan.text == "pp2,tp[2,1,2],sp[1,0,0]"
