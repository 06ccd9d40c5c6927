"""A multi-server push that fails on one shard: the error says exactly which shards applied it, and
`resync` rolls every shard back to one tagged snapshot, after which a replay matches a run without faults."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from luoshu import ps

pytest.importorskip("zmq")

IDS = np.arange(-200, 200)


def _steps(n, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.integers(-200, 200, 48), rng.standard_normal((48, 3)).astype(np.float32)) for _ in range(n)]


def _table(c):
    c.create_table("e", 3, optimizer=("adam", {"lr": 0.05}))


def _reference(steps):
    with ps.start_local_servers(2, in_process=True) as servers, ps.connect(addresses=servers) as c:
        _table(c)
        for ids, grads in steps:
            c.push("e", ids, grads).result(30)
        return c.pull("e", IDS)


def _table_steps(c):
    return [s["tables"]["e"]["step"] for s in c.stats()["servers"]]


@pytest.mark.parametrize("mid_push", [False, True])
def test_a_push_that_one_shard_missed_is_reported_and_resync_restores_one_step(tmp_path, mid_push):
    steps = _steps(7)
    expected = _reference(steps)
    with ps.start_local_servers(2, snapshot_dir=tmp_path, in_process=True) as servers:
        c = ps.connect(addresses=servers, timeout_s=2.0)
        _table(c)
        for ids, grads in steps[:4]:
            c.push("e", ids, grads).result(30)
        c.snapshot(tag="step-4")
        c.push("e", *steps[4]).result(30)  # applied everywhere, after the snapshot
        if mid_push:  # server 1 dies while the push is on its way
            killer = threading.Thread(target=servers.kill, args=(1,))
            future = c.push("e", *steps[5])
            killer.start()
            killer.join()
        else:
            servers.kill(1)
            future = c.push("e", *steps[5])
        try:
            future.result(30)
            applied_everywhere = True
        except ps.PartialPushError as exc:  # what the worker is told, exactly
            applied_everywhere = False
            assert exc.applied == (0,) and set(exc.failed) == {1}, exc
            assert "applied by servers [0] but not by servers [1]" in str(exc) and "resync" in str(exc)
        servers.restart(1)  # restores its newest snapshot: step 4, while server 0 is at step 6
        # server 0 applied step 6; whatever server 1 did with it died with it
        assert _table_steps(c) == [6, 4] and (mid_push or not applied_everywhere)
        assert c.resync() == "step-4"
        assert _table_steps(c) == [4, 4]  # every shard at the same step again
        for ids, grads in steps[4:]:  # the worker replays from the tag
            c.push("e", ids, grads).result(30)
        got = c.pull("e", IDS)
        c.close()
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])


def test_a_gradient_one_shard_would_refuse_is_refused_before_any_shard_sees_it():
    # One NaN row lives on one shard only: refused there and applied on the other, the table would be
    # out of step. The client refuses the whole push before sending.
    with ps.start_local_servers(2, in_process=True) as servers, ps.connect(addresses=servers) as c:
        _table(c)
        with pytest.raises(ps.ProtocolError, match="1 gradient values are NaN or infinite; refused, nothing sent"):
            c.push("e", np.array([1, 2]), np.array([[np.nan, 0, 0], [0, 0, 0]], np.float32))
        assert _table_steps(c) == [0, 0]


def test_resync_without_a_common_tag_says_so(tmp_path):
    with (
        ps.start_local_servers(2, snapshot_dir=tmp_path, in_process=True) as servers,
        ps.connect(addresses=servers) as c,
    ):
        _table(c)
        c.snapshot()  # untagged
        with pytest.raises(ps.SnapshotError, match="share no tagged snapshot"):
            c.resync()
