"""Tensor and sequence parallelism: plan structure, sharded bytes, the SP norm trap, bad input, and
multi-process training against one process (float64, three AdamW steps, to 1e-6)."""

from __future__ import annotations

import math

import numpy as np
import pytest

import luoshu as ls
from luoshu.compiler import states as ST
from luoshu.core.op import topological_ops
from luoshu.models.language import GPT2, Attention, GPTBlock, GPTConfig
from tests.distributed.launcher import launch
from tests.parallel import tp_train

COMM = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")
CONFIG = GPTConfig(vocab_size=128, block_size=16, n_layer=2, n_head=4, n_embd=64)


def _shard_block(block, tp: int = 2, rank: int = 0, sp: bool = False):
    mesh = ls.distributed.DeviceMesh(tp=tp, world_size=tp, rank=rank)
    tpar = ls.parallel.parallelize(block, mesh, sequence_parallel=sp, broadcast=False)
    ST.set_default(None)  # these tests localise by hand
    return tpar.strategy


def _comm_counts(ops):
    counts = {}
    for op in ops:
        if op.opdef.name in COMM and len(op.inputs[0].shape) >= 2:  # activations, not scalars
            counts[op.opdef.name] = counts.get(op.opdef.name, 0) + 1
    return counts


@pytest.mark.parametrize("sp", [False, True])
def test_gpt2_block_plan_holds_megatrons_collectives(sp):
    ls.manual_seed(0)
    block = GPTBlock(CONFIG)
    strategy = _shard_block(block, sp=sp)
    x_states = [ls.core.dstates.DStates(2, {1: 2})] if sp else []
    with ls.Graph() as g:
        x = ls.placeholder("x", (None, 16, 64))
        x.ds = list(x_states)
        out = block(x)
        g_out = ls.placeholder("g_out", (None, 16, 64))
        g_out.ds = list(x_states)
        grads = ls.gradients(out, block.parameters() + [x], grad_ys=g_out)
    forward = ST.localize_graph(topological_ops([out], g), [], strategy)
    both = ST.localize_graph(topological_ops([out] + grads, g), [], strategy)
    fwd = _comm_counts(forward.graph.ops)
    bwd = {k: v - fwd.get(k, 0) for k, v in _comm_counts(both.graph.ops).items()}
    bwd = {k: v for k, v in bwd.items() if v}
    if sp:
        assert fwd == {"all_gather": 2, "reduce_scatter": 2}
        assert bwd == {"all_gather": 2, "reduce_scatter": 2}
    else:
        assert fwd == {"all_reduce": 2}
        assert bwd == {"all_reduce": 2}
    assert ST.S.key(forward.states[id(out)]) == (1 if sp else -1)


def test_sequence_parallel_norm_weight_gradients_are_summed_over_tp():
    """The SP trap: each member's norm-weight gradient covers only its sequence block."""
    ls.manual_seed(0)
    block = GPTBlock(CONFIG)
    strategy = _shard_block(block, sp=True)
    opt = ls.optim.SGD(block.parameters(), lr=0.1)
    with ls.Graph() as g:
        x = ls.placeholder("x", (None, 16, 64))
        x.ds = [ls.core.dstates.DStates(2, {1: 2})]
        loss = ls.ops.sum(block(x))
        step = opt.minimize(loss)
    local = ST.localize_graph(topological_ops([step], g), [step], strategy)
    update = next(op for op in local.graph.ops if op.opdef.name == "optimizer_update")
    names = [n for n, _ in block.named_parameters()]
    for i, t in zip(update.attrs["params"], update.inputs):
        if "ln_" in names[i]:
            assert t.producer[0].opdef.name == "all_reduce", names[i]


@pytest.mark.parametrize("rank", [0, 1])
def test_every_rank_holds_half_of_each_split_weight(rank):
    ls.manual_seed(0)
    full = {n: p.value.clone() for n, p in GPT2(CONFIG).named_parameters()}
    ls.manual_seed(0)
    model = GPT2(CONFIG)
    tpar = _shard_block(model, tp=2, rank=rank)
    assert tpar is not None
    split = 0
    for name, p in model.named_parameters():
        value, whole = p.value, full[name]
        if p.ds and not p.ds[0].is_pure_duplicate():
            dim = next(iter(p.ds[0].states))
            assert value.nbytes * 2 == whole.nbytes, name
            np.testing.assert_array_equal(value.numpy(), whole.chunk(2, dim)[rank].numpy())
            assert p.shape == tuple(whole.shape)  # the declared (global) shape is unchanged
            split += 1
        else:
            assert value.nbytes == whole.nbytes
    assert split == 1 + 2 * 10  # wte; per block q/k/v weight+bias, o weight, c_fc weight+bias, c_proj weight


def _training_step_collectives(model_name: str, sp: bool = False, phases: bool = False) -> dict:
    """{kind: [input shapes]} of the collectives in rank 0's local plan of a tp=2 training step
    (a max all-reduce counts as "all_reduce_max"); with `phases`, {"forward": .., "backward": ..}."""
    ls.manual_seed(0)
    model = tp_train.build(model_name)
    mesh = ls.distributed.DeviceMesh(tp=2, world_size=2, rank=0)
    strategy = ls.parallel.parallelize(model, mesh, sequence_parallel=sp, broadcast=False).strategy
    ST.set_default(None)  # localised by hand
    opt = ls.optim.AdamW(model.parameters(), lr=1e-2)
    with ls.Graph() as g:
        ids = ls.placeholder("ids", (None, tp_train.LENGTH), "int64")
        y = ls.placeholder("y", (None, tp_train.LENGTH), "int64")
        logits = model(ids).reshape((-1, tp_train.VOCAB))
        loss = ls.nn.functional.cross_entropy(logits, y.reshape((-1,)))
        step = opt.minimize(loss)
    found = _collectives(ST.localize_graph(topological_ops([loss, step], g), [loss, step], strategy).graph.ops)
    if not phases:
        return found
    forward = _collectives(ST.localize_graph(topological_ops([loss], g), [loss], strategy).graph.ops)
    backward = {k: list(v) for k, v in found.items()}
    for kind, shapes in forward.items():
        for shape in shapes:
            backward[kind].remove(shape)
    return {"forward": forward, "backward": {k: v for k, v in backward.items() if v}}


def _collectives(ops) -> dict:
    found = {}
    for op in ops:
        if op.opdef.name in COMM:
            reduce = op.attrs.get("reduce", "sum")
            kind = op.opdef.name if reduce in ("sum", "mean") else f"{op.opdef.name}_{reduce}"
            found.setdefault(kind, []).append(tuple(op.inputs[0].shape))
    return found


def test_gpt2_tp2_training_step_issues_megatrons_collectives():
    """Megatron without SP, 2 blocks: per block 2 forward all-reduces (o_proj, c_proj) and their
    duals backward (q/k/v, c_fc input gradients): 8; the vocabulary-parallel embedding's forward
    all-reduce and the LM head's input-gradient all-reduce: 2; all (batch, 16, 64). The
    vocabulary-parallel loss: sum-exp and target-logit all-reduces over rows, and the row maxima
    (a max all-reduce of (rows, 1)). Nothing is gathered."""
    found = _training_step_collectives("gpt2")
    activation = (None, tp_train.LENGTH, 64)
    assert sorted(found) == ["all_reduce", "all_reduce_max"]
    assert found["all_reduce"].count(activation) == 10
    assert sorted(s for s in found["all_reduce"] if s != activation) == [(None,), (None, 1)]
    assert found["all_reduce_max"] == [(None, 1)]


def test_llama_tp2_training_step_gathers_no_activation_or_gradient():
    """LLaMA's RMSNorm reads its input twice (x * rsqrt(mean(x * x))): once all-reduced, the value
    stays whole for the other readers and the backward. Before, the partial was all-reduced again
    and every column-parallel weight gradient gathered its output gradient (9 all-gathers) and was
    reduce-scattered (8). 1 block: embedding, o_proj, down_proj forward; the q/k/v and gate/up
    input gradients and the embedding's sparse gradient backward: 6 of (rows, 64)."""
    found = _training_step_collectives("llama")
    assert sorted(found) == ["all_reduce", "all_reduce_max"]  # nothing gathered, nothing scattered
    assert found["all_reduce_max"] == [(None, 1)]  # the loss's row maxima
    big = [s for s in found["all_reduce"] if math.prod(d or 1 for d in s) >= 64 and len(s) >= 2]
    assert len(big) == 6, found["all_reduce"]
    # the first RMSNorm's x * x reads the embedding's partial output twice: one all-reduce of x
    # serves both (the mean of squares is not all-reduced again as (rows, 16, 1))
    assert (None, tp_train.LENGTH, 1) not in found["all_reduce"]
    # the rest: the loss's sum-exp and target logits, and the three RMSNorm weights' gradients
    rest = sorted((s for s in found["all_reduce"] if s not in big), key=str)
    assert rest == [(64,), (64,), (64,), (None, 1), (None,)], found["all_reduce"]


def test_llama_sp_training_step_keeps_the_norms_in_the_sequence_split():
    """Megatron-LM's sequence-parallel collectives for 1 LLaMA block: forward, the embedding, o_proj
    and down_proj outputs reduce-scattered and the three RMSNorm outputs all-gathered for the
    column-parallel projections (attention, MLP, LM head); backward their duals: the three norm
    outputs' gradients reduce-scattered (q/k/v's input gradients summed first) and the o_proj,
    down_proj and embedding gradients gathered. Nothing of activation size all-reduced.

    Before, RMSNorm's statistic rsqrt(mean(x * x)) was reduce-scattered, gathered back (rows, 16, 1)
    and multiplied onto the partial x, which was then all-reduced: 3 activation all-reduces forward
    (an all-reduce moves twice a gather's bytes). Backward the norm ran on the partial gradient,
    gathering x and the statistic for it and all-reducing 3 more (9 reduce-scatters, 6 gathers); with
    the forward fixed, the norm's gradient was still reduce-scattered twice (for gy * w and for the
    weight's gy * x_hat: 6)."""
    found = _training_step_collectives("llama", sp=True, phases=True)
    length, width = tp_train.LENGTH, 64
    split, whole = (length // 2, None, width), (length, None, width)  # sequence-first around a collective
    forward, backward = found["forward"], found["backward"]
    assert forward["reduce_scatter"] == [whole] * 3 and forward["all_gather"] == [split] * 3
    # the loss only: the vocabulary-parallel sum-exp and target logits, the row maxima
    assert forward["all_reduce"] == [(None, 1), (None,)] and forward["all_reduce_max"] == [(None, 1)]
    assert sorted(backward) == ["all_gather", "all_reduce", "reduce_scatter"]
    assert backward["all_gather"] == [split] * 3
    assert backward["reduce_scatter"] == [whole] * 3
    assert sorted(backward["all_reduce"], key=str) == [(64,), (64,), (64,)]  # the norm weights' gradients


def test_bad_input_is_refused_clearly():
    with pytest.raises(ls.Error, match=r"dp \* tp \* pp = 6 must equal the world size 4"):
        ls.distributed.DeviceMesh(dp=3, tp=2, world_size=4)
    mesh = ls.distributed.DeviceMesh(tp=8, world_size=8)
    with pytest.raises(ls.Error, match="num_heads = 4 does not split over the tensor-parallel axis of size 8"):
        ls.parallel.parallelize(GPT2(CONFIG), mesh, broadcast=False)
    odd = GPT2(GPTConfig(vocab_size=130, block_size=16, n_layer=1, n_head=4, n_embd=64))
    before = odd.wte.weight.value.clone()
    with pytest.raises(ls.Error, match=r"wte.weight dimension 0 has size 130.*axis of size 4"):
        ls.parallel.parallelize(odd, ls.distributed.DeviceMesh(tp=4, world_size=4), broadcast=False)
    assert odd.wte.weight.value.shape == before.shape and not odd.wte.weight.ds  # nothing changed
    with pytest.raises(ls.Error, match="DeviceMesh"):
        ls.parallel.parallelize(odd, (2, 2))
    ST.set_default(None)


def test_attention_gqa_kv_heads_must_split():
    attn = Attention(64, 8, 2)
    with pytest.raises(ls.Error, match="num_kv_heads = 2"):
        ls.parallel.parallelize(attn, ls.distributed.DeviceMesh(tp=4, world_size=4), broadcast=False)


def _compare(tmp_path, n, model, dp, tp, sp, clip=None):
    out = tmp_path / "tp"
    args = ["--model", model, "--dp", str(dp), "--tp", str(tp), "--out", str(out)] + (["--sp"] if sp else [])
    args += ["--clip", str(clip)] if clip else []
    proc = launch(n, "tests/parallel/tp_train.py", *args, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref_losses, ref_params = tp_train.train(model, clip=clip)
    runs = [np.load(f"{out}.rank{r}.npz") for r in range(n)]
    mesh_losses = np.mean([runs[r * tp]["losses"] for r in range(dp)], axis=0)  # each DP rank: its half
    np.testing.assert_allclose(mesh_losses, ref_losses, rtol=0, atol=1e-6)
    for run in runs:
        for name, value in ref_params.items():
            np.testing.assert_allclose(run[name], value, rtol=0, atol=1e-6, err_msg=name)
    return ref_losses


@pytest.mark.dist
def test_gpt2_tp2_sequence_parallel_with_global_norm_clipping_matches_one_process(tmp_path):
    """Also clips to a norm the gradients exceed: the norm must cover every shard, counted once."""
    losses = _compare(tmp_path, 2, "gpt2", 1, 2, True, clip=0.05)
    unclipped, _ = tp_train.train("gpt2")
    assert np.abs(losses - unclipped).max() > 1e-4  # the clipping took effect


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize(
    "model,dp,tp,sp",
    [
        ("gpt2", 1, 2, False),
        ("llama", 1, 2, False),
        ("gpt2", 1, 4, False),
        ("gpt2", 1, 4, True),
        ("gpt2", 2, 2, False),
        ("gpt2", 2, 2, True),
        ("llama", 2, 2, True),
        ("gpt2", 4, 1, False),
    ],
)
def test_mesh_training_matches_one_process(tmp_path, model, dp, tp, sp):
    _compare(tmp_path, dp * tp, model, dp, tp, sp)


def _reference_after_two_steps():
    """One process: two AdamW steps on the whole batch; its full parameters and optimizer state."""
    from tests.parallel.tp_checkpoint import full_state

    ls.manual_seed(11)
    model = tp_train.build("gpt2").to(dtype="float64")
    opt = ls.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    with ls.Graph() as g:
        ids = ls.placeholder("ids", (None, tp_train.LENGTH), "int64")
        y = ls.placeholder("y", (None, tp_train.LENGTH), "int64")
        loss = ls.nn.functional.cross_entropy(model(ids).reshape((-1, tp_train.VOCAB)), y.reshape((-1,)))
        step = opt.minimize(loss)
    for i, (ids_v, y_v) in enumerate(tp_train.batches()):
        if i < 2:
            g.run([loss, step], {ids: ids_v, y: y_v})
    return full_state(model, opt)


def _check_state(got: dict, expected: dict):
    assert set(got) == set(expected)
    for k, v in expected.items():
        np.testing.assert_allclose(got[k], v, rtol=0, atol=1e-9, err_msg=k)


def _load_in_one_process(path):
    from tests.parallel.tp_checkpoint import full_state

    ls.manual_seed(5)  # other initial values: everything must come from the checkpoint
    model = tp_train.build("gpt2").to(dtype="float64")
    opt = ls.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ls.load(path, model, opt)
    return full_state(model, opt)


@pytest.mark.dist
@pytest.mark.slow
def test_checkpoint_saved_under_dp2_tp2_loads_under_tp4_pp2_tp2_and_one_process(tmp_path):
    ckpt = tmp_path / "ckpt"
    proc = launch(
        4, "tests/parallel/tp_checkpoint.py", "save", "--dp", "2", "--tp", "2", "--path", str(ckpt), timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = _reference_after_two_steps()
    _check_state(_load_in_one_process(ckpt), expected)
    for tp, pp in ((4, 1), (2, 2)):
        out = tmp_path / f"tp{tp}pp{pp}"
        args = ["load", "--tp", str(tp), "--pp", str(pp), "--path", str(ckpt), "--out", str(out)]
        proc = launch(4, "tests/parallel/tp_checkpoint.py", *args, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
        for r in range(4):
            _check_state(dict(np.load(f"{out}.rank{r}.npz")), expected)


OPTIMIZERS = ["sgd", "momentum", "nesterov", "adam", "adagrad", "rmsprop"]


@pytest.mark.dist
@pytest.mark.slow
def test_every_elementwise_optimizer_under_tp2_matches_one_process(tmp_path):
    out = tmp_path / "opt"
    proc = launch(
        2,
        "tests/parallel/tp_train.py",
        "--tp",
        "2",
        "--optimizers",
        ",".join(OPTIMIZERS),
        "--out",
        str(out),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in OPTIMIZERS:
        ref_losses, ref_params = tp_train.train("gpt2", optimizer=name)
        for r in range(2):
            run = np.load(f"{out}.{name}.rank{r}.npz")
            np.testing.assert_allclose(run["losses"], ref_losses, atol=1e-6, err_msg=name)
            for k, v in ref_params.items():
                np.testing.assert_allclose(run[k], v, atol=1e-6, err_msg=f"{name} {k}")


def test_lamb_on_split_parameters_is_refused():
    ls.manual_seed(0)
    block = GPTBlock(CONFIG)
    strategy = _shard_block(block)
    opt = ls.optim.LAMB(block.parameters(), lr=1e-3)
    with ls.Graph() as g:
        x = ls.placeholder("x", (None, 16, 64))
        step = opt.minimize(ls.ops.sum(block(x)))
    with pytest.raises(ls.Error, match="LAMB takes norms of whole parameters"):
        ST.localize_graph(topological_ops([step], g), [step], strategy)


@pytest.mark.parametrize("sp", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_gpt2_under_autocast_on_two_simulated_ranks(sp):
    """Mixed precision composes: the casts autocast inserts carry the states through (bf16 sums
    in another order: compared at bf16 precision)."""
    ls.manual_seed(0)
    model = GPT2(CONFIG)
    whole = {id(p): p.value.clone() for p in model.parameters()}
    _shard_block(model, sp=sp)
    for p in model.parameters():  # the simulation shards full values by the annotated states
        p._value = whole[id(p)]
    rng = np.random.default_rng(0)
    ids_v, y_v = rng.integers(0, 128, (2, 16)), rng.integers(0, 128, (2, 16))
    with ls.Graph() as g:
        ids = ls.placeholder("ids", (None, 16), "int64")
        y = ls.placeholder("y", (None, 16), "int64")
        with ls.autocast("bfloat16"):
            logits = model(ids)
        loss = ls.nn.functional.cross_entropy(logits.reshape((-1, 128)).astype("float32"), y.reshape((-1,)))
        grads = ls.gradients(loss, [model.h[0].mlp.c_fc.weight, model.h[1].ln_1.weight])
    fetches = [loss] + grads
    values, states, _ = ST.simulate(
        topological_ops(fetches, g), fetches, 2, {id(ids): ids_v, id(y): y_v}, sequence_parallel=sp
    )
    got = [ST.assemble([v[i] for v in values], [s[i] for s in states]).float().numpy() for i in range(len(fetches))]
    assert ST.S._show(states[0][1]) == "split(0)" and ST.S._show(states[0][2]) == ("partial" if sp else "dup")
    # one process, unsharded model, same seed
    ls.manual_seed(0)
    ref_model = GPT2(CONFIG)
    with ls.Graph() as g2:
        ids2 = ls.placeholder("ids", (None, 16), "int64")
        y2 = ls.placeholder("y", (None, 16), "int64")
        with ls.autocast("bfloat16"):
            logits2 = ref_model(ids2)
        loss2 = ls.nn.functional.cross_entropy(logits2.reshape((-1, 128)).astype("float32"), y2.reshape((-1,)))
        grads2 = ls.gradients(loss2, [ref_model.h[0].mlp.c_fc.weight, ref_model.h[1].ln_1.weight])
    expected = g2.run([loss2] + grads2, {ids2: ids_v, y2: y_v})
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b.astype(np.float32), rtol=5e-2, atol=5e-3)


@pytest.mark.dist
@pytest.mark.slow
def test_a_rank_dying_mid_step_ends_the_job_with_the_launchers_message(tmp_path):
    job = launch(
        2,
        "tests/parallel/tp_train.py",
        "--tp",
        "2",
        "--sp",
        "--die-at",
        "1",
        "--out",
        str(tmp_path / "x"),
        timeout=150,
        extra=("--timeout", "30"),
    )
    assert job.returncode != 0
    assert "worker rank 1" in job.stderr and "SIGKILL" in job.stderr


def test_bert_for_pretraining_on_two_simulated_ranks():
    """BERT's Megatron layout (tied MLM decoder with its vocabulary bias split, padding mask)."""
    from luoshu.models.language import BertConfig, BertForPreTraining

    cfg = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_layers=1,
        num_heads=4,
        intermediate_size=64,
        max_position_embeddings=16,
        dropout=0.0,
    )
    ls.manual_seed(0)
    model = BertForPreTraining(cfg).to(dtype="float64")
    whole = {id(p): p.value.clone() for p in model.parameters()}
    tpar = ls.parallel.parallelize(model, ls.distributed.DeviceMesh(tp=2, world_size=2), broadcast=False)
    ST.set_default(None)
    assert tpar.split["mlm_bias"] == "split(0)" and tpar.split["bert.layers.0.intermediate.weight"] == "split(0)"
    for p in model.parameters():
        p._value = whole[id(p)]
    rng = np.random.default_rng(0)
    ids_v = rng.integers(0, 64, (2, 8))
    mask_v = np.ones((2, 8), np.int64)
    mask_v[1, 6:] = 0
    labels_v = np.where(rng.random((2, 8)) < 0.3, ids_v, -100)
    with ls.Graph() as g:
        ids = ls.placeholder("ids", (None, 8), "int64")
        mask = ls.placeholder("mask", (None, 8), "int64")
        labels = ls.placeholder("labels", (None, 8), "int64")
        nsp = ls.placeholder("nsp", (None,), "int64")
        mlm, nsp_logits = model(ids, attention_mask=mask)
        loss = BertForPreTraining.loss(mlm, nsp_logits, labels, nsp)
        grads = ls.gradients(loss, [model.bert.word_embeddings.weight, model.mlm_bias, model.mlm_norm.weight])
    fetches = [loss] + grads
    feeds = {ids: ids_v, mask: mask_v, labels: labels_v, nsp: np.array([0, 1])}
    expected = g.run(fetches, feeds)
    values, states, _ = ST.simulate(topological_ops(fetches, g), fetches, 2, {id(k): v for k, v in feeds.items()})
    for i in range(len(fetches)):
        got = ST.assemble([v[i] for v in values], [s[i] for s in states]).numpy()
        np.testing.assert_allclose(got, expected[i], rtol=1e-10, atol=1e-10)


def _backward_activation_all_reduces(name: str) -> int:
    """Activation all-reduces the backward of a 2-layer tp=2 training step adds to rank 0's local graph
    (fixed shapes: a gradient that is `sum_to`'s input itself is the one tensor all readers share)."""
    from luoshu.models.language import BertConfig, BertForPreTraining

    ls.manual_seed(0)
    if name == "bert":
        cfg = BertConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                         max_position_embeddings=16, dropout=0.0)
        model = BertForPreTraining(cfg)
    else:
        model = GPT2(GPTConfig(vocab_size=64, block_size=8, n_layer=2, n_head=4, n_embd=32))
    strategy = ls.parallel.parallelize(model, ls.distributed.DeviceMesh(tp=2, world_size=2), broadcast=False).strategy
    ST.set_default(None)  # localised by hand
    opt = ls.optim.AdamW(model.parameters(), lr=1e-2)
    with ls.Graph() as g:
        ids, y = ls.placeholder("ids", (4, 8), "int64"), ls.placeholder("y", (4, 8), "int64")
        if name == "bert":
            mlm, nsp_logits = model(ids)
            loss = BertForPreTraining.loss(mlm, nsp_logits, y, ls.placeholder("nsp", (4,), "int64"))
        else:
            loss = ls.nn.functional.cross_entropy(model(ids).reshape((-1, 64)), y.reshape((-1,)))
        step = opt.minimize(loss)

    def all_reduces(fetches) -> int:
        ops = ST.localize_graph(topological_ops(fetches, g), fetches, strategy).graph.ops
        return _comm_counts(ops).get("all_reduce", 0)

    return all_reduces([loss, step]) - all_reduces([loss])


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_the_backward_all_reduces_once_per_tp_block_input(name):
    """Megatron's count, 2L + 1 = 5: one all-reduce per column-parallel input (q/k/v, the MLP's first
    matmul: its `f`'s dual) and the LM head's input gradient. A residual's gradient sums its partial
    contributions before the whole one joins (autodiff's one `add_n`; the states pass all-reduces each
    layout's sum once): BERT's separate q, k and v projections made 3 all-reduces at each attention
    input before, 9 in all. GPT-2's fused c_attn had one partial there already: 5 before too."""
    assert _backward_activation_all_reduces(name) == 5
