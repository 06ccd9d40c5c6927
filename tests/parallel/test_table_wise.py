"""Slot tables over tensor parallelism: row-wise and table-wise (each slot's table whole on one TP
rank) DLRM on 2 processes against one process (float64, 3 AdamW steps)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import luoshu as ls
from luoshu.models.recommendation import SlotEmbedding
from luoshu.parallel.tensor_parallel import _place_slots, original_order, placed_order
from tests.distributed.launcher import launch
from tests.parallel import dlrm_tp_train


def test_table_wise_placement_keeps_each_slot_whole_on_one_rank_balanced_by_rows():
    ls.manual_seed(0)
    table = SlotEmbedding([7, 3, 12, 5, 3], 2)
    full = table.weight._value.clone()
    _place_slots(table, table.weight, 2)
    rows, _, shape = next(iter(ls.parallel.tensor_parallel._PLACED_TABLES.values()))
    assert table.weight.shape == (30, 2) and shape == (30, 2)  # 12+3 | 7+5+3: blocks of 15, no padding
    offsets = table._buffers["offsets"]._value
    for s, size in enumerate([7, 3, 12, 5, 3]):
        start = int(offsets[s])
        assert start // 15 == (start + size - 1) // 15, f"slot {s} lies in one rank's block"
        # slot s's id i reads the row it read before the placement
        np.testing.assert_array_equal(table.weight._value[start : start + size], full[int(table_offsets(s)) :][:size])
    assert sorted(start // 15 for start in offsets.tolist()) == [0, 0, 1, 1, 1]
    np.testing.assert_array_equal(original_order(table.weight._value, rows, shape), full)
    np.testing.assert_array_equal(placed_order(full, rows), table.weight._value)


def table_offsets(s: int) -> int:
    return int(np.concatenate([[0], np.cumsum([7, 3, 12, 5, 3])[:-1]])[s])


def test_uneven_tables_are_padded_to_one_block_per_rank():
    table = SlotEmbedding([10, 1, 1], 3)
    full = table.weight._value.clone()
    _place_slots(table, table.weight, 2)
    assert table.weight.shape == (20, 3)  # 10 | 1+1 padded to 10
    rows = ls.parallel.tensor_parallel._PLACED_TABLES[table][0]
    assert int((rows < 0).sum()) == 8
    assert torch.equal(table.weight._value[rows < 0], torch.zeros(8, 3))
    np.testing.assert_array_equal(original_order(table.weight._value, rows, (12, 3)), full)


def test_bad_table_placement_is_refused():
    model = dlrm_tp_train.DLRM(
        dlrm_tp_train.CTRConfig(slot_sizes=[3, 4], embedding_dim=2, mlp_dims=(4,), bottom_mlp_dims=(2,))
    )
    with pytest.raises(ls.Error, match=r"tables must be one of \('row', 'table'\), found 'column'"):
        ls.parallel.parallelize(model, ls.distributed.DeviceMesh(), tables="column")
    assert not any(p.ds for p in model.parameters())


@pytest.mark.dist
@pytest.mark.parametrize("tables", [pytest.param("row", marks=pytest.mark.slow), "table"])
def test_dlrm_tables_on_two_processes_equal_one_process(tmp_path, tables):
    out = tmp_path / tables
    proc = launch(2, "tests/parallel/dlrm_tp_train.py", "--tables", tables, "--out", str(out), timeout=200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses, params, _, _ = dlrm_tp_train.train(None)
    for r in range(2):
        got = np.load(f"{out}.rank{r}.npz")
        np.testing.assert_allclose(got["losses"], losses, rtol=0, atol=1e-6)
        for name, value in params.items():
            np.testing.assert_allclose(got[f"param.{name}"], value, rtol=0, atol=1e-6, err_msg=name)
        assert int(got["local_rows"]) == 15  # half the 30 rows each: [12, 3] and [7, 5, 3] whole


@pytest.mark.dist
@pytest.mark.slow
def test_a_table_wise_checkpoint_loads_into_one_process_and_into_row_and_table_wise_jobs(tmp_path):
    from tests.parallel.tp_checkpoint import full_state

    ckpt = tmp_path / "ckpt"
    args = ["--tables", "table", "--out", str(tmp_path / "train"), "--save", str(ckpt)]
    proc = launch(2, "tests/parallel/dlrm_tp_train.py", *args, timeout=200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, _, ref_model, ref_opt = dlrm_tp_train.train(None)
    expected = full_state(ref_model, ref_opt)
    model, opt = dlrm_tp_train.build(None, seed=5)
    ls.load(ckpt, model, opt)  # the table in its original order and shape: a plain one-process model
    got = full_state(model, opt)
    assert sorted(got) == sorted(expected)
    for k, v in expected.items():
        np.testing.assert_allclose(got[k], v, rtol=0, atol=1e-9, err_msg=k)
    for tables in ("row", "table"):
        out = tmp_path / tables
        args = ["--tables", tables, "--out", str(out), "--load", str(ckpt)]
        proc = launch(2, "tests/parallel/dlrm_tp_train.py", *args, timeout=200)
        assert proc.returncode == 0, proc.stderr[-3000:]
        for r in range(2):
            loaded = dict(np.load(f"{out}.rank{r}.npz"))
            assert sorted(loaded) == sorted(expected)
            for k, v in expected.items():
                np.testing.assert_allclose(loaded[k], v, rtol=0, atol=1e-9, err_msg=f"{tables} rank {r}: {k}")
