"""Names moved by the restructuring keep working for one release, each with a warning naming
the new place."""

from __future__ import annotations

import warnings

import pytest

import luoshu as ls


@pytest.mark.parametrize("old, new", [
    ("DataParallel", ls.parallel.DataParallel),
    ("MODES", ls.parallel.MODES),
    ("Strategy", ls.parallel.SyncMode),
    ("register_strategy", ls.parallel.register_sync_mode),
    ("init", ls.distributed.init),
    ("rank", ls.distributed.rank),
    ("DistError", ls.distributed.DistError),
    ("process_group", ls.distributed.process_group),
])
def test_luoshu_dist_names_warn_and_resolve(old, new):
    with pytest.warns(DeprecationWarning, match=r"luoshu\.dist\." + old + r" is now luoshu\.(parallel|distributed)\."):
        assert getattr(ls.dist, old) is new


def test_luoshu_dist_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'gossip'"):
        ls.dist.gossip  # noqa: B018


@pytest.mark.parametrize("old, new", [("Embedding", "PSEmbedding"), ("SlotEmbedding", "PSSlotEmbedding")])
def test_ps_embedding_names(old, new):
    with pytest.warns(DeprecationWarning, match=f"luoshu.ps.{new}"):
        assert getattr(ls.ps, old) is getattr(ls.ps, new)


def test_data_parallel_strategy_attribute_is_sync():
    model = ls.nn.Linear(2, 2)
    dp = ls.parallel.DataParallel(model, ls.optim.SGD(model.parameters(), lr=0.1))
    with pytest.warns(DeprecationWarning, match="DataParallel.sync"):
        assert dp.strategy is dp.sync
    assert isinstance(dp.sync, ls.parallel.AllReduceSync)


def test_new_names_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ls.parallel.DataParallel and ls.distributed.init and ls.ps.PSEmbedding
