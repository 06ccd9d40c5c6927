"""Eager-mode tensor (and sequence) parallelism: the states pass's own per-op step, run at once."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import luoshu as ls
from luoshu.compiler import states as ST
from luoshu.core import op as op_module
from luoshu.core.dstates import DStates
from tests.distributed.launcher import launch
from tests.parallel import eager_tp_train


def _global(local: torch.Tensor, shape, ds: DStates) -> ls.Tensor:
    t = ls.Tensor.from_value(local)
    t.shape, t.ds = tuple(shape), [ds]
    return t


def test_eager_ops_on_simulated_rank_deduce_states_and_slice_duplicates():
    """Rank 1 of a simulated TP group of 2 (no collective needed): split + split stays split; split +
    duplicate slices the duplicate locally (the pass's cheapest conversion); the outputs are global."""
    full_x, full_y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    ST.set_default(ST.Strategy((0, 1), 1))
    try:
        x = _global(full_x.chunk(2, 0)[1].clone(), (4, 3), DStates(2, {0: 2}))
        both = x + _global(full_y.chunk(2, 0)[1].clone(), (4, 3), DStates(2, {0: 2}))
        mixed = x * ls.Tensor.from_value(full_y)  # the duplicate operand carries no states
        scaled = ls.nn.functional.relu(x) * 2.0
    finally:
        ST.set_default(None)
    for t, want in ((both, full_x + full_y), (mixed, full_x * full_y), (scaled, full_x.relu() * 2)):
        assert t.shape == (4, 3) and ST.S.key(t.ds[0]) == 0
        torch.testing.assert_close(t.value, want.chunk(2, 0)[1], rtol=0, atol=0)
    assert op_module.eager_states is None  # no strategy: eager ops take the plain path


def test_eager_gradients_with_a_data_parallel_axis_are_refused():
    """The DP all-reduce is a graph pass: an eager backward under dp>1 says so instead of training wrongly."""
    ST.set_default(ST.Strategy((0, 1), 0, dp_group=(0, 2)))
    try:
        w = _global(torch.ones(2, 3, dtype=torch.float64), (4, 3), DStates(2, {0: 2}))
        w.requires_grad, w.kind = True, "variable"
        loss = (w * 3.0).sum()  # a split sum: partial, then all-reduced -- only on a real group
        with pytest.raises(ST.StatesError, match="data-parallel axis of 2 ranks"):
            ls.gradients(loss, [w])
    finally:
        ST.set_default(None)


CLIP = 0.05


def test_the_clipping_case_clips():
    """CLIP is small enough to change the one-process run, so the clipped case tests the norm."""
    _, clipped = eager_tp_train.train(clip=CLIP)
    _, barely = eager_tp_train.train(clip=1e6)  # a norm never reached: plain SGD
    assert max(np.abs(clipped[k] - barely[k]).max() for k in clipped) > 1e-3


@pytest.mark.parametrize(
    "model, sp, minimize, clip",
    [("gpt2", False, False, None), ("gpt2", True, True, None),
     ("llama", True, False, None),  # llama: a sparse row-split table gradient
     ("llama", False, False, None),  # and its whole step's collectives
     ("gpt2", True, False, CLIP)],  # clipped by the whole model's norm across the TP shards
)
def test_eager_tp2_training_matches_one_process(tmp_path, model, sp, minimize, clip):
    out = tmp_path / "eager"
    args = ["--model", model, "--tp", "2", "--out", str(out)]
    args += (["--sp"] if sp else []) + (["--minimize"] if minimize else []) + (["--clip", str(clip)] if clip else [])
    proc = launch(2, "tests/parallel/eager_tp_train.py", *args, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref_losses, ref_params = eager_tp_train.train(minimize=minimize, model_name=model, clip=clip)
    for r in range(2):
        got = np.load(f"{out}.rank{r}.npz")
        np.testing.assert_allclose(got["losses"], ref_losses, rtol=0, atol=1e-6)
        assert set(got.files) - {"losses"} == set(ref_params)
        for name, value in ref_params.items():
            np.testing.assert_allclose(got[name], value, rtol=0, atol=1e-6, err_msg=name)
        # one eager GPT-2 block runs Megatron's collectives, as its compiled plan does
        counts = json.loads((tmp_path / f"eager.rank{r}.json").read_text())
        if sp:
            each = {"all_gather": 2, "reduce_scatter": 2}
        else:
            each = {"all_reduce": 2}
        step = counts.pop("llama", None)
        assert counts == {"forward": each, "backward": each}
        if model == "llama" and not sp:
            # A partial all-reduced to whole stays whole for later readers, as in the graph pass:
            # before, RMSNorm's x * rsqrt(mean(x * x)) all-reduced the embedding's output and then
            # the partial mean of squares, and the backward gathered the column-parallel weight
            # gradients' output gradients (8 all-gathers) and reduce-scattered them (8). Forward:
            # embedding, o_proj, down_proj and the loss's sum of exponentials; the row maxima.
            assert step == {"forward": {"all_reduce": 4, "all_reduce_max": 1}, "backward": {"all_reduce": 3}}
            # and the define-and-run step's local graph on this member makes the same
            assert step == eager_tp_train.llama_graph_collectives(r), (step, eager_tp_train.llama_graph_collectives(r))
        if model == "llama" and sp:
            # Megatron-LM's sequence-parallel collectives, eager as in the graph pass (see
            # test_tensor_parallel's test_llama_sp_training_step_keeps_the_norms_in_the_sequence_split):
            # before, 3 activation all-reduces forward and 11 reduce-scatters, 4 gathers and an
            # all-reduce backward. This job's batch size is static: the sequence is split, not the batch.
            assert step == {"forward": {"reduce_scatter": 3, "all_gather": 3, "all_reduce": 1, "all_reduce_max": 1},
                            "backward": {"reduce_scatter": 3, "all_gather": 3}}, step
            assert step == eager_tp_train.llama_graph_collectives(r, sequence_parallel=True), step


def test_the_llama_graph_step_makes_megatrons_collectives_and_3_backward_all_reduces():
    """The define-and-run LLaMA step on either TP member (the states pass alone, one process): the
    forward all-reduces the embedding, o_proj, down_proj and the loss's sum of exponentials (and its
    row maxima); the backward all-reduces one gradient per TP block input, as Megatron-LM's `f` does:
    down_proj's output gradient (the final norm's partial branches, summed locally: row-parallel
    down_proj wants it whole), and at each of the two inner RMSNorms the sum of its partial
    input-gradient branches (over the q, k, v or gate, up projections) once, before the residual's
    whole gradient joins it (autodiff's one `add_n` per gradient), where adding each branch as it
    arrived made 1 + 3 + 3 = 7. Three is the least: down_proj's and o_proj's backward and the
    embedding's each need a whole gradient holding partial contributions that exist only after the
    previous one was reduced (the branches of the norm in between), so no two can share one."""
    for index in (0, 1):
        assert eager_tp_train.llama_graph_collectives(index) == {
            "forward": {"all_reduce": 4, "all_reduce_max": 1}, "backward": {"all_reduce": 3}}
