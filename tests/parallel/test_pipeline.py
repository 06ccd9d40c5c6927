"""Pipeline parallelism: schedules and their activation accounting, stage balancing, bad input,
gradients scaled once, and multi-process GPT-2 pipelines against one process (float64, to 1e-6)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import luoshu as ls
from luoshu.compiler.gradient_allreduce import plan_buckets
from luoshu.parallel.pipeline import _balance
from luoshu.runtime.pipeline import ActivationLedger, schedule
from tests.distributed.launcher import launch
from tests.parallel import pp_train


def _peak(name, stage, stages, m):
    ledger = ActivationLedger()
    for kind, mb in schedule(name, stage, stages, m):
        (ledger.saved if kind == "F" else ledger.freed)(mb)
    return ledger.peak


@pytest.mark.parametrize("stages", [1, 2, 3, 4])
@pytest.mark.parametrize("m", [1, 2, 3, 8])
def test_schedules_run_every_micro_batch_once_in_order(stages, m):
    for name in ("gpipe", "1f1b"):
        for s in range(stages):
            steps = schedule(name, s, stages, m)
            assert sorted(steps) == sorted([("F", i) for i in range(m)] + [("B", i) for i in range(m)])
            assert all(steps.index(("F", i)) < steps.index(("B", i)) for i in range(m))
            assert [i for k, i in steps if k == "B"] == list(range(m))  # backwards in the order neighbours send
        assert _peak("gpipe", 0, stages, m) == m
        assert max(_peak("1f1b", s, stages, m) for s in range(stages)) <= min(stages, m)


def test_balance_by_parameters():
    assert _balance([1, 1, 1, 1], 2) == [0, 2]
    assert _balance([10, 1, 1, 1, 1, 10], 3) == [0, 1, 5]
    assert _balance([1, 1, 1], 3) == [0, 1, 2]


def _model(layers=2):
    ls.manual_seed(11)
    return pp_train.GPT2(pp_train.config(layers)).to(dtype="float64")


def test_bad_input_is_refused_clearly():
    mesh = ls.distributed.DeviceMesh(pp=4, world_size=4)
    with pytest.raises(ls.Error, match="2 layers in 'h' cannot fill 4 stages"):
        ls.parallel.pipeline(_model(2), mesh)
    mesh2 = ls.distributed.DeviceMesh(pp=2, world_size=2)
    with pytest.raises(ls.Error, match="unknown module 'h.7'"):
        ls.parallel.pipeline(_model(2), mesh2, stages=["h.0", "h.7"])
    with pytest.raises(ls.Error, match="unknown schedule"):
        ls.parallel.pipeline(_model(2), mesh2, schedule="zigzag")
    pipe = ls.parallel.pipeline(_model(2), ls.distributed.DeviceMesh(world_size=1), micro_batches=3)
    model = pipe.model
    pipe.compile(
        [("ids", (None, 16), "int64")],
        [("y", (None, 16), "int64")],
        pp_train.loss_fn,
        ls.optim.SGD(model.parameters(), lr=0.1),
    )
    before = model.wte.weight.value.clone()
    ids = np.zeros((8, 16), np.int64)
    with pytest.raises(ls.Error, match="8 rows .* does not divide into 3 micro-batches"):
        pipe.step([ids], [ids])
    assert np.array_equal(model.wte.weight.value.numpy(), before.numpy())  # no half step


def test_gradients_are_scaled_once_over_micro_batches():
    """One stage, four micro-batches: the same steps as the whole batch at once (not 4x, not 1/16)."""
    ref_losses, ref_params = pp_train.reference(2)
    model = _model(2)
    opt = ls.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    pipe = ls.parallel.pipeline(model, ls.distributed.DeviceMesh(world_size=1), micro_batches=4, schedule="gpipe")
    pipe.compile([("ids", (None, 16), "int64")], [("y", (None, 16), "int64")], pp_train.loss_fn, opt)
    losses = [pipe.step([i], [t]) for i, t in pp_train.batches()]
    np.testing.assert_allclose(losses, ref_losses, atol=1e-10)
    for name, p in model.named_parameters():
        np.testing.assert_allclose(p.numpy(), ref_params[name], atol=1e-10, err_msg=name)


def _stage_run(recompute: bool, schedule: str):
    model = _model(2)
    if recompute:
        for layer in model.h:
            ls.nn.recompute(layer)
    opt = ls.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    pipe = ls.parallel.pipeline(model, ls.distributed.DeviceMesh(world_size=1), micro_batches=4, schedule=schedule)
    pipe.compile([("ids", (None, 16), "int64")], [("y", (None, 16), "int64")], pp_train.loss_fn, opt)
    losses = [pipe.step([i], [t]) for i, t in pp_train.batches()]
    return losses, {n: p.numpy() for n, p in model.named_parameters()}, pipe.ledger.peak_bytes


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_recompute_inside_a_stage_keeps_only_the_layers_inputs(schedule):
    """`ls.nn.recompute` layers inside a pipeline stage: the stage keeps far fewer activation bytes
    per micro-batch (the runtime's ledger) and trains exactly as without recompute, and as one process."""
    ref_losses, ref_params = pp_train.reference(2)
    plain_losses, plain_params, plain_bytes = _stage_run(False, schedule)
    losses, params, peak_bytes = _stage_run(True, schedule)
    assert peak_bytes < plain_bytes / 2, (peak_bytes, plain_bytes)
    np.testing.assert_allclose(losses, plain_losses, rtol=1e-13)
    np.testing.assert_allclose(losses, ref_losses, atol=1e-10)
    for name, value in params.items():
        np.testing.assert_allclose(value, plain_params[name], rtol=1e-12, atol=1e-14, err_msg=name)
        np.testing.assert_allclose(value, ref_params[name], atol=1e-10, err_msg=name)


def _compare(tmp_path, dp, pp, layers, m, sched, stages=None, tp=1, model="gpt2", clip=None, recompute=False,
             zero=0, steps=pp_train.STEPS, bucket_mb=None, memory=False):
    """Runs the pipeline job and checks it against one process; returns every rank's npz."""
    out = tmp_path / ("pp-recompute" if recompute else f"pp-zero{zero}" if zero else "pp")
    args = (
        [
            "--model",
            model,
            "--dp",
            str(dp),
            "--tp",
            str(tp),
            "--pp",
            str(pp),
            "--layers",
            str(layers),
            "--micro-batches",
            str(m),
            "--schedule",
            sched,
            "--out",
            str(out),
        ]
        + (["--stages", ",".join(stages)] if stages else [])
        + (["--clip", str(clip)] if clip else [])
        + (["--recompute"] if recompute else [])
        + (["--zero", str(zero)] if zero else [])
        + (["--steps", str(steps)] if steps != pp_train.STEPS else [])
        + (["--bucket-size-mb", str(bucket_mb)] if bucket_mb else [])
        + (["--memory"] if memory else [])
    )
    proc = launch(dp * tp * pp, "tests/parallel/pp_train.py", *args, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref_losses, ref_params = pp_train.reference(layers, model, clip, steps)
    runs = [np.load(f"{out}.rank{r}.npz") for r in range(dp * tp * pp)]
    last = [r for r in runs if int(r["stage"]) == pp - 1]
    np.testing.assert_allclose(np.mean([r["losses"] for r in last], axis=0), ref_losses, atol=1e-6)
    seen = set()
    for run in runs:
        stage = int(run["stage"])
        feeds = set(json.loads(str(run["feeds"])))
        # a rank feeds only what its stage needs: inputs on the first, labels on the last
        assert ("ids" in feeds) == (stage == 0) and ("y" in feeds) == (stage == pp - 1)
        if sched == "1f1b":
            assert int(run["peak"]) <= pp - stage
        # the stage's boundaries are send/recv ops of its forward plan, to and from its neighbours only
        rank = int(run["rank"])
        per = dp * tp
        assert list(run["recvs"]) == ([] if stage == 0 else [rank - per])
        assert list(run["sends"]) == ([] if stage == pp - 1 else [rank + per])
        for name in run.files:
            if name in ref_params:
                np.testing.assert_allclose(run[name], ref_params[name], atol=1e-6, err_msg=name)
                seen.add(name)
    assert seen == set(ref_params)
    return runs


@pytest.mark.dist
def test_gpt2_two_stages_1f1b_matches_one_process(tmp_path):
    _compare(tmp_path, 1, 2, 2, 4, "1f1b")


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize(
    "dp,pp,layers,m,sched",
    [
        (1, 2, 2, 4, "gpipe"),
        (2, 1, 2, 2, "1f1b"),
        (2, 2, 2, 2, "gpipe"),
        (2, 2, 2, 2, "1f1b"),
        (1, 4, 4, 4, "gpipe"),
        (1, 4, 4, 4, "1f1b"),
        (1, 4, 4, 2, "1f1b"),
    ],
)
def test_pipeline_meshes_match_one_process(tmp_path, dp, pp, layers, m, sched):
    _compare(tmp_path, dp, pp, layers, m, sched)


@pytest.mark.dist
@pytest.mark.slow
def test_named_stages(tmp_path):
    _compare(tmp_path, 1, 2, 4, 2, "1f1b", stages=["h.0", "h.3"])


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("sched", ["gpipe", "1f1b"])
def test_tensor_parallel_stages_match_one_process(tmp_path, sched):
    """Mesh (dp, tp, pp) = (1, 2, 2): each stage's graph compiles through the states pass."""
    _compare(tmp_path, 1, 2, 2, 2, sched, tp=2)


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("dp,tp", [(1, 1), (2, 1), (1, 2)])
def test_llama_sparse_table_gradients_through_the_pipeline(tmp_path, dp, tp):
    """LLaMA's untied table: its rows stay sparse over micro-batches (and DP peers, and TP row blocks),
    so AdamW updates exactly the rows one whole batch touches."""
    _compare(tmp_path, dp, 2, 2, 2, "1f1b", tp=tp, model="llama")


@pytest.mark.dist
@pytest.mark.slow
def test_one_f_one_b_with_fewer_micro_batches_than_stages(tmp_path):
    """m=1 < pp=2: the warm-up shrinks to fit; it runs (never hangs) and matches one process."""
    _compare(tmp_path, 1, 2, 2, 1, "1f1b")


def test_clipping_is_active_in_the_reference():
    """The clipping tests below mean something: at max_grad_norm 0.05 the steps differ from unclipped ones."""
    _, clipped = pp_train.reference(2, clip=0.05)
    _, plain = pp_train.reference(2)
    assert max(np.abs(clipped[n] - plain[n]).max() for n in plain) > 1e-4


@pytest.mark.dist
@pytest.mark.parametrize(
    "dp,tp,pp",
    [(1, 1, 2), pytest.param(1, 2, 2, marks=pytest.mark.slow), pytest.param(2, 1, 2, marks=pytest.mark.slow)],
)
def test_global_norm_clipping_across_stages_matches_one_process(tmp_path, dp, tp, pp):
    """The clipping norm is the whole model's: summed over the stages (the tied embedding once) and
    the TP shards within a stage, not each stage's own."""
    _compare(tmp_path, dp, pp, 2, 2, "1f1b", tp=tp, clip=0.05)


class _Wire:
    """An in-memory point-to-point transport standing in for torch.distributed: messages per tag, in order."""

    def __init__(self):
        self.messages: dict[int, list] = {}

    def isend(self, tensor, peer, tag):
        self.messages.setdefault(tag, []).append(tensor.clone())
        return type("Done", (), {"wait": lambda self: None})()

    def recv(self, tensor, peer, tag):
        tensor.copy_(self.messages[tag].pop(0))

    def irecv(self, tensor, peer, tag):
        """A posted receive: the message lands in `tensor` when waited on (receives of one tag in posting order)."""
        self.posted = getattr(self, "posted", 0) + 1
        wire = self
        return type("Posted", (), {"wait": lambda self: tensor.copy_(wire.messages[tag].pop(0))})()


def test_shapes_once_sends_a_run_time_shape_once_per_channel(monkeypatch):
    import torch

    from luoshu.core.op import get_opdef
    from luoshu.ops import comm

    wire = _Wire()
    monkeypatch.setattr(comm, "_p2p_ready", lambda name, peer: None)
    monkeypatch.setattr(comm.torch_dist, "isend", wire.isend)
    monkeypatch.setattr(comm.torch_dist, "recv", wire.recv)
    send, recv = get_opdef("send").compute, get_opdef("recv").compute
    xs = [torch.randn(3, 5) for _ in range(3)]
    for x in xs[:2]:  # outside the scope every message carries its shape
        send(x, peer=1, tag=8, header=True)
    assert len(wire.messages[9]) == 2
    for x in xs[:2]:
        assert torch.equal(recv((-1, 5), "float32", "cpu", peer=0, tag=8), x)
    with comm.shapes_once():
        for x in xs:
            send(x, peer=1, tag=8, header=True)
        assert len(wire.messages[9]) == 1 and len(wire.messages[8]) == 3  # one header, three data messages
        for x in xs:
            assert torch.equal(recv((-1, 5), "float32", "cpu", peer=0, tag=8), x)
        with pytest.raises(ls.Error, match=r"shape \(2, 5\) after \(3, 5\)"):
            send(torch.zeros(2, 5), peer=1, tag=8, header=True)  # refused before anything is sent
        assert not wire.messages[8] and not wire.messages[9]
    with comm.shapes_once():  # a new scope (the next step) exchanges the shape again
        send(torch.ones(2, 5), peer=1, tag=8, header=True)
        assert torch.equal(recv((-1, 5), "float32", "cpu", peer=0, tag=8), torch.ones(2, 5))


@pytest.mark.slow
@pytest.mark.parametrize("sched", ["gpipe", "1f1b"])
def test_recompute_inside_pipeline_stages_matches_one_process(tmp_path, sched):
    """Two stages with every layer recomputed: the same training as one process, and each stage's
    peak activation bytes (the runtime's ledger) fall against the same pipeline without recompute."""
    plain = _compare(tmp_path, 1, 2, 4, 4, sched)
    recomputed = _compare(tmp_path, 1, 2, 4, 4, sched, recompute=True)
    for a, b in zip(sorted(plain, key=lambda r: int(r["rank"])), sorted(recomputed, key=lambda r: int(r["rank"]))):
        kept, without = int(b["peak_bytes"]), int(a["peak_bytes"])
        assert kept < without / 2, (int(b["stage"]), kept, without)


def test_posted_receives_take_the_messages_in_order_and_count_them(monkeypatch):
    """Receives a schedule announces are posted ahead (their shape once known): each recv returns
    the next message on its channel; a message counted but never received, or one too many, is an error."""
    import torch

    from luoshu.core.op import get_opdef
    from luoshu.ops import comm

    wire = _Wire()
    monkeypatch.setattr(comm, "_p2p_ready", lambda name, peer: None)
    for name in ("isend", "recv", "irecv"):
        monkeypatch.setattr(comm.torch_dist, name, getattr(wire, name))
    send, recv = get_opdef("send").compute, get_opdef("recv").compute
    xs = [torch.randn(3, 5) for _ in range(4)]
    grads = [torch.randn(2, 2) for _ in range(3)]
    channels = {(0, 8): ((-1, 5), "float32", "cpu", 4), (0, 12): ((2, 2), "float32", "cpu", 3)}
    with comm.shapes_once(), comm.posted_recvs(channels, depth=2):
        assert wire.posted == 3  # the run-time shape's header, and two of the static channel's messages
        for x in xs:
            send(x, peer=1, tag=8, header=True)
        for gr in grads:
            send(gr, peer=1, tag=12, header=False)
        assert [torch.equal(recv((-1, 5), "float32", "cpu", peer=0, tag=8), x) for x in xs] == [True] * 4
        assert wire.posted == 3 + 4  # the header told the shape: then all four data messages were posted
        assert [torch.equal(recv((2, 2), "float32", "cpu", peer=0, tag=12), gr) for gr in grads] == [True] * 3
        with pytest.raises(ls.Error, match="more messages than the posted_recvs scope counted"):
            recv((2, 2), "float32", "cpu", peer=0, tag=12)
    with pytest.raises(ls.Error, match=r"counted but never received.*\(0, 12\): 1"):
        with comm.posted_recvs({(0, 12): ((2, 2), "float32", "cpu", 2)}):
            send(grads[0], peer=1, tag=12, header=False)
            recv((2, 2), "float32", "cpu", peer=0, tag=12)


@pytest.mark.slow
def test_recompute_inside_tensor_parallel_stages_matches_one_process(tmp_path):
    """pp2 x tp2 with every layer recomputed: the regions carry into the localized stage graphs."""
    _compare(tmp_path, 1, 2, 2, 2, "1f1b", tp=2, recompute=True)


# --- ZeRO over each stage's DP group ------------------------------------------------------------
def test_zero_in_a_pipeline_refuses_what_is_not_built():
    mesh = ls.distributed.DeviceMesh(world_size=1)
    for bad in (4, True, "1"):
        with pytest.raises(ls.Error, match=r"zero must be 0 \(off\), 1, 2 or 3, found"):
            ls.parallel.pipeline(_model(2), mesh, zero=bad)
    with pytest.raises(ls.Error, match=r"\['unit_size_mb'\] are ZeRO options; they need zero=1, 2 or 3"):
        ls.parallel.pipeline(_model(2), mesh, unit_size_mb=1.0)
    model = _model(2)
    pipe = ls.parallel.pipeline(model, mesh, zero=1)
    with pytest.raises(ls.Error, match="LAMB cannot be sharded elementwise"):
        pipe.compile([("ids", (None, 16), "int64")], [("y", (None, 16), "int64")], pp_train.loss_fn,
                     ls.optim.LAMB(model.parameters(), lr=0.1))


@pytest.mark.parametrize("zero", [1, 2, 3])
def test_zero_one_stage_equals_the_whole_batch_with_clipping(zero):
    """One process, one stage, four micro-batches, clipping active: the shard update (its own optimizer
    over the flat shard) and the norm over the shards give one process's steps."""
    ref_losses, ref_params = pp_train.reference(2, clip=0.05)
    model = _model(2)
    opt = ls.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, max_grad_norm=0.05)
    pipe = ls.parallel.pipeline(model, ls.distributed.DeviceMesh(world_size=1), micro_batches=4, zero=zero)
    pipe.compile([("ids", (None, 16), "int64")], [("y", (None, 16), "int64")], pp_train.loss_fn, opt)
    losses = [pipe.step([i], [t]) for i, t in pp_train.batches()]
    np.testing.assert_allclose(losses, ref_losses, atol=1e-10)
    with pipe.zero.gathered_parameters():
        for name, p in model.named_parameters():
            np.testing.assert_allclose(p.numpy(), ref_params[name], atol=1e-10, err_msg=name)
    assert opt.state == {} and pipe.optimizers()[-1] is opt  # the shard optimizers hold every moment


def _kept_numel(tp: int) -> dict:
    """(stage, TP member) -> [elements per ZeRO-3 unit] of the parameters a rank of the dp x tp x pp2 GPT-2
    (two layers) keeps under ZeRO, independent of the code under test: from the one-process model's names
    and shapes, the stages' layers (embeddings with h.0 on stage 0; h.1, ln_f and the tied head on stage 1),
    the Megatron plan's split parameters (1/tp of their elements on each member) and its row-parallel biases
    (added once, on member 0: the other members leave them to member 0). Units: the tied table (several
    stages share it) alone, then the rest (below one `unit_size_mb`)."""
    from luoshu.compiler import states

    model = pp_train.build("gpt2", 2)
    split = set(ls.parallel.parallelize(pp_train.build("gpt2", 2), ls.distributed.DeviceMesh(tp=tp, world_size=tp),
                                        broadcast=False).split) if tp > 1 else set()
    states.set_default(None)
    rowwise = {k for k, v in ls.parallel.MEGATRON_PLAN.items() if v == "rowwise"}
    biases = {n for n, _ in model.named_parameters() if n.endswith(".bias") and n.rsplit(".", 2)[-2] in rowwise}
    assert tp == 1 or len(biases) == 4  # attn.c_proj and mlp.c_proj of each block
    stages = [lambda n: n.startswith(("wte", "wpe", "h.0.")), lambda n: n.startswith(("h.1.", "ln_f", "wte"))]
    kept = {}
    for stage, member in ((s, t) for s in range(2) for t in range(tp)):
        numel = {n: p.value.numel() // (tp if n in split else 1) for n, p in model.named_parameters()
                 if stages[stage](n) and not (member and n in biases)}
        kept[stage, member] = [numel.pop("wte.weight"), sum(numel.values())]
    return kept


def _check_kept_bytes(runs, zero: int, dp: int, tp: int) -> None:
    """Each rank's exact float64 bytes under ZeRO-`zero` (`_kept_numel`): stages 1-2 one flat buffer
    (the model is below one bucket) padded to a multiple of dp, of which the rank's optimizer state
    covers its 1/dp shard; stage 3 one shard per unit (parameters, the accumulated gradient shards and
    the state). AdamW: two moments per element, a float32 step counter per shard optimizer. A TP member
    other than 0 neither keeps nor fetches the gradients of the biases it leaves to member 0."""
    kept = _kept_numel(tp)
    fetched = {}
    for run in runs:
        stage, member = int(run["stage"]), int(run["rank"]) % tp
        units = kept[stage, member]
        shards = [-(-u // dp) for u in units] if zero == 3 else [-(-sum(units) // dp)]
        mem = json.loads(str(run["memory"]))
        assert int(run["buckets"]) == len(shards), (zero, int(run["buckets"]))
        assert int(run["state_bytes"]) == 2 * 8 * sum(shards), (zero, stage, member, int(run["state_bytes"]))
        assert mem["optimizer_state"] == 2 * 8 * sum(shards) + 4 * len(shards), (zero, stage, member, mem)
        assert mem["parameters"] == 8 * (sum(shards) if zero == 3 else dp * sum(shards)), (zero, stage, member, mem)
        if zero == 3:
            assert mem["gradients"] == 8 * sum(shards), (zero, stage, member, mem)
        fetched[stage, member] = mem["gradients"]
    for stage, member in fetched if zero != 3 else ():  # stages 1-2: what member 0 fetches, less the biases'
        assert fetched[stage, member] == fetched[stage, 0] - 8 * (sum(kept[stage, 0]) - sum(kept[stage, member]))
    assert tp == 1 or all(sum(kept[s, 0]) - sum(kept[s, 1]) == 2 * 64 for s in range(2))


def _zero_compare(tmp_path, zero, dp=2, pp=2, tp=1):
    """dp x pp (x tp) with ZeRO-`zero` over each stage's DP group, clipping active, five AdamW steps:
    one process's losses and parameters, each rank 1/dp of its stage's optimizer state, and (stage 2)
    one reduce-scatter per bucket per step, after the last micro-batch. Under TP each rank's exact
    bytes (`_check_kept_bytes`, the first step through `Pipeline.memory`)."""
    runs = _compare(tmp_path, dp, pp, 2, 2, "1f1b", tp=tp, clip=0.05, zero=zero, steps=5, memory=tp > 1)
    if tp > 1:
        _check_kept_bytes(runs, zero, dp, tp)
    for run in runs:
        # plain pipeline: AdamW's two float64 moments of every parameter the stage trains (its TP blocks)
        plain = 2 * 8 * int(run["local_numel"])
        buckets = int(run["buckets"])
        # each bucket (flat group) is padded to a multiple of dp elements (under TP a member other than 0
        # holds less: no state of the biases it leaves to member 0, `_check_kept_bytes`)
        low = plain / dp if tp == 1 else 0
        assert low <= int(run["state_bytes"]) < plain / dp + 2 * 8 * buckets, (int(run["state_bytes"]), plain)
        expected = buckets if zero == 2 else 0
        assert list(run["scatters"]) == [expected] * 5
    return runs


def _zero3_compare(tmp_path, tp: int) -> None:
    """ZeRO-3 over each stage's DP group of dp2 x tp x pp2: one process's five clipped AdamW steps; each
    unit's gradients reduce-scattered once per micro-batch (2 micro-batches); from the plans' accounting
    (`Pipeline.memory`), parameter, gradient and optimizer-state bytes 1/dp of the plain dp x tp x pp
    pipeline's on the same rank (up to each unit's padding)."""
    (tmp_path / "zero").mkdir()
    (tmp_path / "plain").mkdir()
    args = ["--dp", "2", "--tp", str(tp), "--pp", "2", "--layers", "2", "--micro-batches", "2", "--clip", "0.05",
            "--steps", "5", "--memory"]
    ref_losses, ref_params = pp_train.reference(2, "gpt2", 0.05, 5)
    runs, world = {}, 4 * tp
    for name, extra in (("zero", ["--zero", "3"]), ("plain", [])):
        out = tmp_path / name / "pp"
        proc = launch(world, "tests/parallel/pp_train.py", *args, *extra, "--out", str(out), timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = [np.load(f"{out}.rank{r}.npz") for r in range(world)]
    last = [r for r in runs["zero"] if int(r["stage"]) == 1]
    np.testing.assert_allclose(np.mean([r["losses"] for r in last], axis=0), ref_losses, atol=1e-6)
    seen = set()
    for run, plain in zip(runs["zero"], runs["plain"]):
        for name in set(run.files) & set(ref_params):
            np.testing.assert_allclose(run[name], ref_params[name], atol=1e-6, err_msg=name)
            seen.add(name)
        units = int(run["buckets"])
        assert list(run["scatters"]) == [2 * units] * 5  # per micro-batch, one per unit
        mem, base = json.loads(str(run["memory"])), json.loads(str(plain["memory"]))
        pad = 8 * units  # at most one float64 of padding per unit
        # what the plain rank holds: its stage's parameters (its TP blocks: 8 * local_numel bytes) and their
        # gradients, one per parameter (stage 0 fetches the tied table's as rows, then densifies them to sum
        # over the stages: a whole gradient, as many bytes as the parameter). Under TP a member other than 0
        # never reads the row-parallel biases: its plans' parameter bytes leave them out; under ZeRO it
        # leaves them to member 0 (no shard, gradient or state of them: `_check_kept_bytes`)
        held = 8 * int(plain["local_numel"])
        assert int(run["local_numel"]) * 8 == held and base["gradients"] <= held and base["parameters"] <= held
        assert base["parameters"] == held or tp > 1
        # parameters 1/dp of the plain rank's (its plans already never read the biases), optimizer state at
        # most 1/dp (less the biases' left to member 0), up to each unit's padding, +-64: the step counters
        assert base["parameters"] / 2 - 64 <= mem["parameters"] <= held / 2 + pad + 64, (mem, base)
        assert mem["optimizer_state"] <= base["optimizer_state"] / 2 + 2 * pad + 64, (mem, base)
    assert seen == set(ref_params)
    _check_kept_bytes(runs["zero"], 3, 2, tp)


@pytest.mark.dist
def test_zero3_dp2_pp2_with_clipping_matches_one_process_at_1_over_dp_of_the_memory(tmp_path):
    _zero3_compare(tmp_path, tp=1)


@pytest.mark.dist
@pytest.mark.slow
def test_zero3_dp2_tp2_pp2_with_clipping_matches_one_process_at_1_over_dp_of_the_memory(tmp_path):
    """Eight processes: each rank's TP blocks of its stage in units sharded over the stage's DP group (the
    tied table vocabulary-split: stage 0 densifies only its block's rows); the norm weighs the shards as
    their TP states say and sums over shards, TP members and stages."""
    _zero3_compare(tmp_path, tp=2)


@pytest.mark.dist
def test_zero2_dp2_pp2_with_clipping_matches_one_process(tmp_path):
    _zero_compare(tmp_path, 2)


@pytest.mark.dist
@pytest.mark.slow
def test_zero1_dp2_pp2_with_clipping_matches_one_process_and_the_plain_pipeline(tmp_path):
    (tmp_path / "zero").mkdir()
    (tmp_path / "plain").mkdir()
    zero = {int(r["rank"]): r for r in _zero_compare(tmp_path / "zero", 1)}
    plain = {int(r["rank"]): r for r in _compare(tmp_path / "plain", 2, 2, 2, 2, "1f1b", clip=0.05, steps=5)}
    _, names = pp_train.reference(2, steps=1)
    for rank, run in zero.items():
        np.testing.assert_allclose(run["losses"], plain[rank]["losses"], atol=1e-9)
        for name in set(run.files) & set(names):
            np.testing.assert_allclose(run[name], plain[rank][name], atol=1e-9, err_msg=name)
        assert int(run["state_bytes"]) * 2 == int(plain[rank]["state_bytes"])


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("zero", [1, 2])
def test_zero_dp2_tp2_pp2_with_clipping_matches_one_process(tmp_path, zero):
    """Eight processes: each rank's TP blocks of its stage sharded over the stage's DP group; the norm
    weighs the TP-duplicated pieces 1/tp and sums over shards, TP members and stages."""
    _zero_compare(tmp_path, zero, tp=2)


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("zero", [1, 2])
def test_zero_with_a_sparse_table_on_one_stage_matches_one_process(tmp_path, zero):
    """LLaMA's untied table: its rows stay on the model's optimizer (gathered over DP), on stage 0 only;
    clipping's factor reaches it without a norm collective the other stage would not join."""
    _compare(tmp_path, 2, 2, 2, 2, "1f1b", model="llama", clip=0.05, zero=zero, steps=3)


@pytest.mark.dist
def test_plain_dp2_pp2_reduces_over_dp_in_buckets_and_matches_one_process(tmp_path):
    """zero=0: each stage's DP mean is one all-reduce per gradient bucket per step (torch's own calls
    over the DP group counted), after the last micro-batch, not one per parameter; the tied embedding
    still sums over its two stages first (the parameters equal one process)."""
    bucket_mb = 0.05  # ~52 KB: several buckets per stage of this GPT-2
    runs = _compare(tmp_path, 2, 2, 2, 2, "1f1b", clip=0.05, steps=3, bucket_mb=bucket_mb)
    for run in runs:
        sizes = [int(b) for b in run["dense_bytes"] if b]
        buckets = plan_buckets(sizes, ["float64"] * len(sizes), int(bucket_mb * 2**20))
        assert 1 < len(buckets) < len(sizes)
        assert list(run["reduces"]) == [len(buckets)] * 3
