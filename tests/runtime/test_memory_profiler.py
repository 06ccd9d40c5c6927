"""`plan.memory()` against the allocator's own records: torch's profiler memory events on CPU,
`torch.cuda.max_memory_allocated` on CUDA (skipped without a GPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import luoshu as ls


def _mlp_step(device: str = "cpu", batch: int = 256):
    ls.manual_seed(0)
    with ls.Graph() as g:
        x = ls.placeholder("x", shape=(None, 512), dtype="float32", device=device)
        y = ls.placeholder("y", shape=(None,), dtype="int64", device=device)
        model = ls.nn.Sequential(ls.nn.Linear(512, 1024), ls.nn.Tanh(), ls.nn.Linear(1024, 1024),
                                 ls.nn.Tanh(), ls.nn.Linear(1024, 10))
        if device != "cpu":
            model.to(device)
        loss = ls.nn.functional.cross_entropy(model(x), y)
        train = ls.optim.Adam(model.parameters(), lr=0.01).minimize(loss)
    rng = np.random.default_rng(0)
    feed = {x: rng.standard_normal((batch, 512)).astype(np.float32), y: rng.integers(0, 10, batch)}
    return g, [loss, train], feed


def _feeds(plan, feed, device: str = "cpu") -> list[torch.Tensor]:
    return [torch.from_numpy(np.ascontiguousarray(feed[t])).to(device) for t in plan.feed_tensors]


def _profiled_peak(plan, feeds) -> int:
    """Live bytes the run allocates beyond what existed before it, after each top-level op,
    as the profiler's allocator records say (an op's record nets its allocations and frees)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = plan.run(feeds)
        del out
    events = sorted((e for e in prof.events() if e.cpu_parent is None), key=lambda e: e.time_range.start)
    live = peak = 0
    for e in events:
        live += e.cpu_memory_usage
        peak = max(peak, live)
    return peak


def test_peak_agrees_with_the_profilers_memory_records():
    g, fetches, feed = _mlp_step()
    g.run(fetches, feed)  # optimizer state exists from the first step on: both counts see a later step
    plan = g.plan(fetches, feed)
    feeds = _feeds(plan, feed)
    report = plan.memory(feeds)
    fed_bytes = sum(v.untyped_storage().nbytes() for v in feeds)  # alive before the profiled run
    expected = report.gradients + report.activations - fed_bytes
    measured = _profiled_peak(plan, feeds)
    assert expected > 4 * 2**20  # the check is about megabytes, not a few scalars
    # the profiler sees the kernels' own small temporaries too; the plan's buffers dominate
    assert abs(measured - expected) <= 0.01 * expected, (measured, expected)


def test_profiler_check_notices_a_wrong_account():
    """The comparison above is sharp enough to see one missing activation of the batch."""
    g, fetches, feed = _mlp_step()
    g.run(fetches, feed)
    plan = g.plan(fetches, feed)
    feeds = _feeds(plan, feed)
    report = plan.memory(feeds)
    fed_bytes = sum(v.untyped_storage().nbytes() for v in feeds)
    one_activation = 256 * 1024 * 4
    wrong = report.gradients + report.activations - fed_bytes - one_activation
    assert abs(_profiled_peak(plan, feeds) - wrong) > 0.01 * wrong


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_peak_agrees_with_cuda_max_memory_allocated():
    g, fetches, feed = _mlp_step("cuda")
    g.run(fetches, feed)
    plan = g.plan(fetches, feed)
    feeds = _feeds(plan, feed, "cuda")
    report = plan.memory(feeds)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = plan.run(feeds)
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() - before
    del out
    expected = report.gradients + report.activations - sum(v.untyped_storage().nbytes() for v in feeds)
    # cuBLAS workspaces and the caching allocator's 512-byte rounding come on top of the plan's buffers
    assert expected <= measured <= 1.05 * expected + 8 * 2**20, (measured, expected)
