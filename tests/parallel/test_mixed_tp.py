"""Per-block tensor parallelism inside one strategy (luoshu.parallel.mixed_tp): GPT-2 and LLaMA of
four blocks under 'tp[4,2,1,2]'-like strategies on 4 processes train as one process does (float64,
five AdamW steps on long-tailed packed batches, to 1e-6); the re-batch plan between segments'
row layouts delivers every row once from a rank that holds it; bad strategies are refused."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import luoshu as ls
from luoshu.parallel import hot_switch as hs
from luoshu.parallel.hotspa import HotSPaError, Strategy, mixed_strategy, parse_strategy
from luoshu.parallel.mixed_tp import Segment, rebatch_plan, row_layout, segments
from tests.distributed.launcher import launch
from tests.parallel import hotspa_train as H

LAYERS = 4


def _job(tmp_path, tag: str, models: str, strategies: str, bounds: str = "32,0", timeout: float = 300,
         extra: tuple = ()):
    out = tmp_path / tag
    proc = launch(4, "tests/parallel/hotspa_train.py", "--models", models, "--strategies", strategies,
                  "--bounds", bounds, "--layers", str(LAYERS), "--out", str(out), *extra, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _runs(out, models):
    """Each rank's results, after checking them against one process training on the same batches."""
    for name in models:
        ref_losses, ref_params = H.reference(name, layers=LAYERS)
        for r in range(4):
            run = np.load(f"{out}.{name}.rank{r}.npz")
            np.testing.assert_allclose(run["losses"], ref_losses, rtol=0, atol=1e-6)
            for pname, value in ref_params.items():
                np.testing.assert_allclose(run[pname], value, rtol=0, atol=1e-6, err_msg=f"{name} {pname}")
            yield name, run


@pytest.mark.dist
def test_gpt2_and_llama_under_per_block_tp_on_4_processes_match_one_process(tmp_path):
    """tp [4, 2, 1, 2] (dp [1, 2, 4, 2]): four segments, the embedding with the first, the head
    (GPT-2's tied table: its gradient from two layouts) with the last."""
    out = _job(tmp_path, "mixed", "gpt2,llama", "tp[4,2,1,2]")
    for _, run in _runs(out, ("gpt2", "llama")):
        # three boundaries: tp4 -> dp2·tp2 and dp2·tp2 -> dp4 are local slices; dp4 -> dp2·tp2 gathers
        traffic = run["traffic"]
        assert traffic.shape == (3, 2)
        assert traffic[0].tolist() == [0, 0] and traffic[1].tolist() == [0, 0]
        assert traffic[2][0] > 0 and traffic[2][1] == 4  # each dp2·tp2 rank gets the other half of its rows
        assert (run["rebatch"][:, 0] > 0).all()  # every step moved rows (and their gradients back)
        assert int(run["owner"]) == 0 and (run["switch_bytes"] == 0).all()  # one strategy: nothing to switch


@pytest.mark.dist
@pytest.mark.slow
def test_sequence_parallel_and_recompute_per_block_on_4_processes_match_one_process(tmp_path):
    """sp on the tp4 and tp2 segments, full recompute on block 1 and selective on block 3."""
    out = _job(tmp_path, "sprc", "gpt2,llama", "tp[4,2,1,2],sp[1,1,0,1],rc[none,full,none,selective]")
    for _, run in _runs(out, ("gpt2", "llama")):
        counts = run["segment_counts"]  # per segment: reduce-scatters, regions traced, values saved
        assert counts.shape == (4, 3)
        assert (counts[[0, 1, 3], 0] > 0).all() and counts[2, 0] == 0  # sp segments reduce-scatter, tp1 none
        assert (counts[:, 1] == 2).all()  # one region for block 1 (full), one for block 3's attention


@pytest.mark.dist
@pytest.mark.slow
def test_a_per_block_strategy_hot_switched_with_uniform_ones_matches_one_process(tmp_path):
    """A mixed strategy among hot-switched ones: parameters switched to its per-parameter layouts
    (each block's own tp) and the gradients back to the owner."""
    out = _job(tmp_path, "set", "gpt2", "dp1,tp4,pp1;tp[4,2,1,2];dp4,tp1,pp1", bounds="32,12,6,0")
    for _, run in _runs(out, ("gpt2",)):
        assert int(run["owner"]) == 0 and sorted(run["order"]) == [0, 1, 2]
        assert (run["switch_bytes"] > 0).all() and (run["tokens"] > 0).all()
        assert (run["rebatch"][:, 0] > 0).all()


@pytest.mark.dist
@pytest.mark.slow
def test_gpt2_and_llama_under_per_block_tp_inside_two_pipeline_stages_match_one_process(tmp_path):
    """pp2,tp[2,1,1,2]: stage 0 (ranks 0-1) runs blocks 0-1 under tp2 then dp2, stage 1 (ranks 2-3)
    blocks 2-3 under dp2 then tp2, two micro-batches a step; GPT-2's tied table lives on stage 0 and
    goes to stage 1's head (its gradient back)."""
    out = _job(tmp_path, "pp", "gpt2,llama", "pp2,tp[2,1,1,2]")
    held = {}
    for name, run in _runs(out, ("gpt2", "llama")):
        # boundaries: tp2 -> dp2 in stage 0 is a local slice; the hidden state crosses to stage 1 from
        # each dp replica to its peer (two messages of half the padded rows each: 4 rows of 32 x 32 floats);
        # dp2 -> tp2 in stage 1 gathers (each rank the other half)
        assert run["traffic"].tolist() == [[0, 0], [4 * 32 * 32 * 8, 2], [4 * 32 * 32 * 8, 2]]
        assert (run["micro_batches"] == 2).all() and (run["rebatch"][:, 0] > 0).all()
        held.setdefault(name, []).append(run["held"])
        counts = run["segment_counts"]  # -1: a segment of the other stage (this rank builds no plans for it)
        assert counts.shape == (4, 3) and sorted(counts[:, 0].tolist()).count(-1) == 2
    for masks in held.values():  # each stage holds only its own parameters, both stages all of them
        assert (masks[0] == masks[1]).all() and (masks[2] == masks[3]).all()
        assert not masks[0].all() and not masks[2].all() and (masks[0] | masks[2]).all()


@pytest.mark.dist
@pytest.mark.slow
def test_a_pipeline_per_block_strategy_at_a_given_split_with_recompute_matches_one_process(tmp_path):
    """HotSPa's `stages` for a per-block pipeline (the split a search carries): blocks 0-2 on stage 0
    (tp2 then sp-free tp1 with full recompute), block 3 alone on stage 1 under tp2 with sp."""
    out = _job(tmp_path, "split", "gpt2,llama", "pp2,tp[2,2,1,2],sp[0,0,0,1],rc[none,none,full,none]",
               extra=("--stages", "0,3"))
    for _, run in _runs(out, ("gpt2", "llama")):
        # boundaries: tp2 -> tp1 inside stage 0 (a local slice), stage 0's dp2 -> stage 1's tp2 (each of
        # ranks 2 and 3 gets a half from rank 0 and one from rank 1: four messages)
        assert [m for _, m in run["traffic"].tolist()] == [0, 4]
        counts = run["segment_counts"]
        assert counts.shape == (3, 3) and (counts[:, 1] == 1).all()  # one recompute region traced (block 2)


@pytest.mark.dist
@pytest.mark.slow
def test_a_pipeline_per_block_strategy_owns_and_hot_switches_with_uniform_ones(tmp_path):
    """pp2,tp[2,1,1,2] as the owner (each stage updating its own shards) among dp4 and tp4 buckets."""
    out = tmp_path / "ppset"
    proc = launch(4, "tests/parallel/hotspa_train.py", "--models", "gpt2", "--strategies",
                  "pp2,tp[2,1,1,2];dp4,tp1,pp1;dp1,tp4,pp1", "--bounds", "32,12,6,0", "--owner", "0",
                  "--layers", str(LAYERS), "--out", str(out), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for _, run in _runs(out, ("gpt2",)):
        assert int(run["owner"]) == 0 and sorted(run["order"]) == [0, 1, 2]
        assert (run["switch_bytes"] > 0).all() and (run["tokens"] > 0).all()


# --- the re-batch plan (one process) ------------------------------------------------------------------
def _check_rebatch(src: Segment, dst: Segment, rows: int, node_size: int):
    shape, itemsize = (rows, 3, 2), 8
    plan = rebatch_plan(shape, itemsize, src, dst, node_size)
    world = src.dp * src.tp
    held = {r: (r // src.tp * rows // src.dp, (r // src.tp + 1) * rows // src.dp) for r in range(world)}
    wanted = {r: (r // dst.tp * rows // dst.dp, (r // dst.tp + 1) * rows // dst.dp) for r in range(world)}
    got = {r: [] for r in range(world)}
    for r, cells in plan.local.items():
        for cell in cells:
            assert held[r][0] <= cell[0][0] and cell[0][1] <= held[r][1]  # a self-copy is of rows it holds
            got[r].append(cell[0])
    pairs = [(m.sender, m.receiver) for m in plan.messages]
    assert len(pairs) == len(set(pairs))  # at most one message per pair
    for m in plan.messages:
        assert m.sender != m.receiver
        for cell in m.slices:
            assert held[m.sender][0] <= cell[0][0] and cell[0][1] <= held[m.sender][1]  # from a holder
            assert not (held[m.receiver][0] <= cell[0][0] and cell[0][1] <= held[m.receiver][1])  # self: local
            got[m.receiver].append(cell[0])
        # a sender on the receiver's node wherever one holds the rows
        if m.sender // node_size != m.receiver // node_size:
            for cell in m.slices:
                near = [r for r in range(world) if r // node_size == m.receiver // node_size
                        and held[r][0] <= cell[0][0] and cell[0][1] <= held[r][1]]
                assert not near
    for r in range(world):  # every needed row once, nothing else
        covered = sorted(got[r])
        assert covered[0][0] == wanted[r][0] and covered[-1][1] == wanted[r][1]
        assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))
    full = np.random.default_rng(0).standard_normal(shape)
    shards = {r: full[held[r][0] : held[r][1]] for r in range(world)}
    out = hs.simulate(plan, shards)
    for r in range(world):
        np.testing.assert_array_equal(out[r], full[wanted[r][0] : wanted[r][1]])  # bitwise
    return plan


@pytest.mark.parametrize("world", [4, 8])
def test_rebatch_plan_delivers_every_row_once_from_a_holder(world):
    tps = [t for t in (1, 2, 4, 8) if world % t == 0]
    for a, b in itertools.product(tps, tps):
        src, dst = Segment(0, 1, a, False, world // a), Segment(1, 2, b, False, world // b)
        for node_size in (world, 2):
            plan = _check_rebatch(src, dst, 2 * world, node_size)
            if world // a <= world // b and (world // b) % (world // a) == 0:
                assert not plan.messages  # more replicas next: each takes a slice of rows it holds
            if a == b:
                assert not plan.messages


def test_rebatch_balances_the_senders_of_a_gather():
    """dp4 -> dp1·tp4: each rank holds a quarter; every rank needs the other three."""
    plan = _check_rebatch(Segment(0, 1, 1, False, 4), Segment(1, 2, 4, False, 1), 8, 4)
    assert len(plan.messages) == 12 and set(plan.send_bytes().values()) == {3 * 2 * 3 * 2 * 8}


def test_row_layout_is_replica_major():
    boxes = row_layout(2, 2).boxes((8, 3))
    assert boxes == {0: ((0, 4), (0, 3)), 1: ((0, 4), (0, 3)), 2: ((4, 8), (0, 3)), 3: ((4, 8), (0, 3))}


# --- strategies and bad input --------------------------------------------------------------------------
def test_per_block_strategy_strings_round_trip():
    for text in ["tp[4,2,1,2]", "tp[4,2,1,2],sp[1,1,0,1]", "tp[2,2],rc[none,full]",
                 "tp[4,4,2,1],sp[1,0,0,0],rc[selective,none,none,full]"]:
        st = parse_strategy(text)
        assert st.mixed and str(st) == text and parse_strategy(str(st)) == st
    assert parse_strategy("tp[4,2,1],sp") == mixed_strategy((4, 2, 1), (True, True, False))
    assert parse_strategy("tp[2,1],rc=full").layer_recompute == ("full", "full")
    assert not parse_strategy("dp2,tp2,pp1").mixed
    for text in ["pp2,tp[2,1,1,2]", "pp2,tp[2,2,1,2],sp[1,1,0,1]", "pp4,tp[1,1,1,1],rc[none,full,none,none]"]:
        st = parse_strategy(text)
        assert st.mixed and str(st) == text and parse_strategy(str(st)) == st
    st = parse_strategy("tp[2,1,1,2],pp2")  # any order
    assert (st.pp, st.dp, st.tp, st.layer_tp) == (2, 1, 1, (2, 1, 1, 2)) and str(st) == "pp2,tp[2,1,1,2]"
    assert parse_strategy("pp1,tp[2,1]") == parse_strategy("tp[2,1]")
    assert mixed_strategy((2, 1), pp=2) == parse_strategy("pp2,tp[2,1]")


@pytest.mark.parametrize("text, words", [
    ("tp[4,2],dp2", "takes no dp part"),
    ("tp[4,2],pp2,dp2", "takes no dp part"),
    ("tp[4,2],pp3", "cannot fill pp=3 stages"),
    ("tp[4,2],pp0", "none of dpN"),
    ("tp[1,2],sp[1,0]", "sequence parallelism but tp 1"),
    ("tp[4,2],sp[1]", "names 2 blocks but sp"),
    ("tp[4,2],rc[none]", "names 2 blocks but rc"),
    ("tp[4,0]", "integers >= 1"),
    ("tp[]", "one entry per block"),
    ("sp[1,0]", "need a per-block tp"),
    ("tp[2,2],rc[none,most]", "layer_recompute must be"),
])
def test_bad_per_block_strategies_are_refused(text, words):
    with pytest.raises(HotSPaError, match=words.replace("[", r"\[")):
        parse_strategy(text)


def test_segments_group_equal_consecutive_blocks():
    segs = segments(parse_strategy("tp[4,4,2,2,2,1],sp[1,1,1,0,0,0]"), 4, 6)
    assert [(s.first, s.stop, s.tp, s.sp, s.dp) for s in segs] == [
        (0, 2, 4, True, 1), (2, 3, 2, True, 2), (3, 5, 2, False, 2), (5, 6, 1, False, 4)]
    with pytest.raises(HotSPaError, match="names 3 blocks, but the model has 4"):
        segments(parse_strategy("tp[4,2,1]"), 4, 4)
    with pytest.raises(HotSPaError, match="tp 4 does not divide the world of 6"):
        segments(parse_strategy("tp[2,4]"), 6, 2)
    with pytest.raises(HotSPaError, match="no per-block tp"):
        segments(Strategy(4, 1, 1), 4, 2)


def test_segments_inside_pipeline_stages():
    segs = segments(parse_strategy("pp2,tp[2,2,2,1]"), 4, 4, [0, 2])
    assert [(s.first, s.stop, s.tp, s.dp, s.stage, s.first_rank) for s in segs] == [
        (0, 2, 2, 1, 0, 0), (2, 3, 2, 1, 1, 2), (3, 4, 1, 2, 1, 2)]  # equal tp across a stage cut: two segments
    assert [s.stage for s in segments(parse_strategy("pp2,tp[1,1,1,1]"), 4, 4)] == [0, 1]  # default: equal counts
    with pytest.raises(HotSPaError, match="tp 4 of block 0 does not divide the 2 ranks of a pipeline stage"):
        segments(parse_strategy("pp2,tp[4,1]"), 4, 2, [0, 1])
    with pytest.raises(HotSPaError, match="pp 2 does not divide the world of 3"):
        segments(parse_strategy("pp2,tp[1,1,1]"), 3, 3, [0, 1])
    with pytest.raises(HotSPaError, match="stage starts"):
        segments(parse_strategy("pp2,tp[1,1,1,1]"), 4, 4, [0, 4])
    # a stage's row layout names its own ranks: the re-batch between stages is point-to-point
    plan = rebatch_plan((4, 3), 8, segs[0], segs[1], 4)
    assert plan.local == {} and sorted((m.sender, m.receiver) for m in plan.messages) == [(0, 2), (1, 3)]


def test_hotspa_refuses_a_per_block_strategy_that_does_not_fit_the_model_or_the_world():
    model = H.build("gpt2", LAYERS)
    before = [p.value.clone() for p in model.parameters()]
    with pytest.raises(HotSPaError, match="names 3 blocks, but the model has 4"):
        ls.parallel.HotSPa(model, ["tp[1,1,1]"], [32, 0])
    with pytest.raises(HotSPaError, match="tp 2 does not divide the world of 1"):
        ls.parallel.HotSPa(model, ["tp[1,2,1,1]"], [32, 0])
    with pytest.raises(HotSPaError, match="pp 2 does not divide the world of 1"):
        ls.parallel.HotSPa(model, ["pp2,tp[1,1,1,1]"], [32, 0])
    with pytest.raises(HotSPaError, match="tp 3 of block 1 does not divide the model's 4 attention heads"):
        ls.parallel.HotSPa(model, ["tp[1,3,1,1]"], [32, 0])
    assert all(not p.ds for p in model.parameters())  # the model as it was
    assert all((p.value == b).all() for p, b in zip(model.parameters(), before))


def test_one_process_per_block_strategy_matches_the_reference():
    """World 1: every block under tp1 is one segment; the co-located stage program alone trains
    as the eager one-process reference does."""
    losses, params, reports, hot = H.train("gpt2", ["tp[1,1,1,1]"], [32, 0], layers=LAYERS)
    ref_losses, ref_params = H.reference("gpt2", layers=LAYERS)
    np.testing.assert_allclose(losses, ref_losses, rtol=0, atol=1e-10)
    for name, value in ref_params.items():
        np.testing.assert_allclose(params[name], value, rtol=0, atol=1e-10)
    assert len(hot._mixed[0].segs) == 1 and reports[0].rebatch_bytes == 0
    assert repr(hot) == "HotSPa(['tp[1,1,1,1]'], bounds=[32, 0], owner=tp[1,1,1,1])"


def test_a_per_block_strategy_is_held_to_the_memory_budget_by_its_most_demanding_block():
    with pytest.raises(HotSPaError, match="per the cost model, more than the budget"):
        ls.parallel.HotSPa(H.build("gpt2", LAYERS), ["tp[1,1,1,1],rc[full,none,none,none]"], [32, 0],
                           memory_budget=1024.0)
