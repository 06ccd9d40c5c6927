"""DataParallel(mode="allreduce"): N workers at batch b follow one process at batch N*b.

The model has a sparse embedding (IndexedSlices gradients, all-gathered) and dense
layers (bucketed all-reduce). Workers start from different random weights on purpose:
DataParallel's broadcast of worker 0's parameters is part of what is checked.
"""

from __future__ import annotations

import numpy as np
import pytest

import luoshu as ls
from tests.distributed.launcher import launch
from tests.parallel.dp_train import Net, parse_run, train

# Bucket sizes: 0.0005 MB (~524 B) splits the dense gradients (~1.6 KB) into several buckets.
RUNS = ["graph:0.0005:sgd", "eager:0.0005:sgd", "eager-minimize:0.0005:adam", "graph:25:adam"]


def _check_job(tmp_path, workers: int, runs: list[str], batch: int = 4):
    job = launch(workers, "tests/parallel/dp_train.py", "--runs", ",".join(runs), "--batch", str(batch),
                 "--out", str(tmp_path / "params"), timeout=240)
    assert job.returncode == 0, job.stderr[-3000:]
    per_rank = [np.load(tmp_path / f"params.rank{r}.npz") for r in range(workers)]
    for run in runs:
        mode, _, optimizer = parse_run(run)
        # one process, the whole batch, no DataParallel at all: the seed of worker 0
        reference = train(mode, workers * batch, 10, 1, 0, 25.0, optimizer, data_parallel=False)
        for name, expected in reference.items():
            for rank, got in enumerate(per_rank):
                np.testing.assert_allclose(got[f"{run}/{name}"], expected, rtol=1e-5, atol=1e-5,
                                           err_msg=f"{run}: {name} on worker {rank}")


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_two_workers_match_one_process_at_twice_the_batch(tmp_path):
    _check_job(tmp_path, 2, RUNS)


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_four_workers_match_one_process_at_four_times_the_batch(tmp_path):
    _check_job(tmp_path, 4, RUNS, batch=3)


def _training_graph():
    """(model, graph, loss, its gradients, the SGD update, a feed) of one small step."""
    model = Net()
    opt = ls.optim.SGD(model.parameters(), lr=0.1)
    with ls.Graph() as g:
        ids = ls.placeholder("ids", (None, 3), "int64")
        dense = ls.placeholder("dense", (None, 5), "float32")
        loss = model(ids, dense).sum()
        grads = ls.gradients(loss, model.parameters())
        train_op = opt.minimize(loss)
    feed = {ids: np.arange(6).reshape(2, 3) % 50, dense: np.ones((2, 5), np.float32)}
    return model, g, loss, grads, train_op, feed


def _graph_with_update(bucket_mb: float):
    _, g, loss, _, train_op, feed = _training_graph()
    ls.parallel.DataParallel(g, bucket_size_mb=bucket_mb)
    g.run([loss, train_op], feed)
    return [step.op.opdef.name for step in g.plan([loss, train_op], feed).steps]


def test_the_pass_buckets_dense_gradients_and_gathers_sparse_ones():
    # Single process: the comm ops are identities, the rewritten plan is the same shape.
    names = _graph_with_update(0.0005)
    assert names.count("bucket_all_reduce") >= 3 and names.count("bucket_unpack") == names.count("bucket_all_reduce")
    assert names.count("sparse_all_gather") == 1 and "sparse_to_dense" not in names
    assert _graph_with_update(25.0).count("bucket_all_reduce") == 1


def test_buckets_start_during_backward_and_are_waited_before_the_update():
    names = _graph_with_update(0.0005)
    starts = [i for i, n in enumerate(names) if n == "bucket_all_reduce"]
    waits = [i for i, n in enumerate(names) if n == "bucket_unpack"]
    backward = [i for i, n in enumerate(names) if n in ("matmul", "threshold_backward", "sum", "bucket_place")]
    assert starts[0] < backward[-1], "the first bucket must start before the backward pass ends"
    assert max(starts) < min(waits) and max(waits) < names.index("optimizer_update")


def test_each_bucket_place_runs_where_its_gradient_op_ran():
    """bucket_place takes over its gradient op's place in the backward: recorded at the end, it
    ran after the whole backward and kept every weight gradient's inputs alive until then."""
    _, g, loss, _, train_op, feed = _training_graph()
    plain = [step.op.opdef.name for step in g.plan([loss, train_op], feed).steps]
    placed = _graph_with_update(25.0)
    # the backward's gradient ops (matmul, sum) keep their number and places: four of them are
    # now bucket_place
    made = [n for n in plain[plain.index("sum") + 1:] if n in ("matmul", "sum")]
    rewritten = [n for n in placed[placed.index("sum") + 1:] if n in ("matmul", "sum", "bucket_place")]
    assert len(rewritten) == len(made) and rewritten.count("bucket_place") == 4
    assert placed.index("bucket_place") < len(placed) - placed[::-1].index("matmul") - 1, \
        "the first bucket_place runs before the backward's last matmul"


def test_gradients_are_computed_as_views_of_their_bucket():
    """The weight and bias gradients (matmul, sum) are written straight into the bucket: the
    values the update reads live in the bucket buffer, and they equal the plain gradients."""
    names = _graph_with_update(25.0)
    assert names.count("bucket_place") == 4  # two linear layers: two weights, two biases
    model, g, loss, grads, train_op, feed = _training_graph()
    before = [p.numpy().copy() for p in model.parameters()]
    expected = g.run(grads, feed)
    ls.parallel.DataParallel(g, bucket_size_mb=25.0)
    g.run([loss, train_op], feed)
    for p, b, e in zip(model.parameters(), before, expected):
        if isinstance(e, np.ndarray):  # the dense ones: SGD moved them by lr * gradient
            np.testing.assert_allclose(p.numpy(), b - 0.1 * e, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bucket_mb", [0.0005, 25.0])
def test_bucket_views_follow_a_reallocated_bucket_buffer(bucket_mb):
    """bucket_place and bucket_all_reduce find their piece and buffer once, then by identity: when a
    bucket's buffer is dropped or replaced between steps, the next step writes the gradients into
    the new one and training still equals the plain graph's (one process, no DataParallel)."""
    import torch

    from luoshu.compiler.gradient_allreduce import _BUFFERS_OF
    from tests.parallel.dp_train import batches

    runs = []
    for data_parallel in (False, True):
        ls.manual_seed(3)
        model, g, loss, _, train_op, feed = _training_graph()
        ids, dense = list(feed)
        if data_parallel:
            ls.parallel.DataParallel(g, bucket_size_mb=bucket_mb)
        for step, (ids_value, dense_value, _) in enumerate(batches(4, 6)):
            if data_parallel and step == 2:
                for buffer in _BUFFERS_OF[g]:
                    buffer.tensor = None
            if data_parallel and step == 3:
                fresh = {id(b): torch.full_like(b.tensor, float("nan")) for b in _BUFFERS_OF[g]}
                for buffer in _BUFFERS_OF[g]:
                    buffer.tensor = fresh[id(buffer)]
            g.run([loss, train_op], {ids: ids_value, dense: dense_value})
        runs.append([p.numpy().copy() for p in model.parameters()])
        if data_parallel:
            names = [step.op.opdef.name for step in g.plan([loss, train_op], feed).steps]
            assert names.count("bucket_place") == 4
            placed = []
            for buffer in _BUFFERS_OF[g]:  # the fresh buffer kept (it fits) and the gradients made in it
                assert buffer.tensor is fresh[id(buffer)] and not torch.isnan(buffer.tensor).any()
                pieces = buffer.tensor.__dict__.get("_luoshu_pieces_at", {}).values()
                assert all(p.untyped_storage().data_ptr() == buffer.tensor.untyped_storage().data_ptr()
                           for p in pieces)
                placed += pieces
            assert len(placed) == 4
    for plain, bucketed in zip(*runs):
        np.testing.assert_allclose(bucketed, plain, rtol=1e-6, atol=1e-6)


def test_bad_arguments_are_refused():
    model = Net()
    with pytest.raises(ls.Error, match="unknown mode"):
        ls.parallel.DataParallel(model, mode="gossip")
    with pytest.raises(ls.Error, match="bucket_size_mb"):
        ls.parallel.DataParallel(model, bucket_size_mb=0)
    with pytest.raises(ls.Error, match="Module or a luoshu.Graph"):
        ls.parallel.DataParallel(object())
    with pytest.raises(ls.Error, match="no optimizer update"):
        ls.parallel.DataParallel(ls.Graph())
    with pytest.raises(ls.Error, match="worker rank 3"):
        ls.parallel.DataParallel(model, group=ls.DeviceGroup([0, 3]))


def test_gradients_are_reported_as_soon_as_they_are_final():
    # The eager path's overlap rests on this hook: the last layer's gradients are final
    # (and their bucket can start) long before the first layer's.
    ls.manual_seed(0)
    layers = [ls.nn.Linear(4, 4) for _ in range(3)]
    x = ls.tensor(np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32))
    h = x
    for layer in layers:
        h = layer(h).tanh()
    params = [p for layer in layers for p in layer.parameters()]
    seen = []
    grads = ls.gradients(h.sum(), params, on_ready=lambda i, g: seen.append((i, g.numpy())))
    assert sorted(i for i, _ in seen) == list(range(len(params)))
    order = [i for i, _ in seen]
    assert order.index(4) < order.index(0) and order.index(5) < order.index(1)  # layer 3 before layer 1
    for i, g in seen:
        np.testing.assert_array_equal(g, grads[i].numpy())


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_nodes_with_a_server_each_match_one_process(tmp_path):
    # Two "machines" on localhost, each with 1 worker and 1 (unused) parameter server: the
    # workers are numbered across nodes, and the servers end with the job by themselves.
    from tests.distributed.launcher import launch_nodes

    run = "graph:0.0005:sgd"
    jobs = launch_nodes(2, 1, "tests/parallel/dp_train.py", "--runs", run, "--out", str(tmp_path / "params"),
                        timeout=240, extra=("--servers", "1"))
    for job in jobs:
        assert job.returncode == 0, job.stderr[-3000:]
    reference = train("graph", 8, 10, 1, 0, 25.0, "sgd", data_parallel=False)
    for rank in range(2):
        got = np.load(tmp_path / f"params.rank{rank}.npz")
        for name, expected in reference.items():
            np.testing.assert_allclose(got[f"{run}/{name}"], expected, rtol=1e-5, atol=1e-5)
