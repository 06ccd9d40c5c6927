"""Inference latency: a luoshu package (plan executor) against the same model exported to ONNX and run
by onnxruntime (CPU provider), DCN (HugeCTR quick-start shapes) and ResNet-18 (CIFAR), two batch sizes.

Both sides get the same thread count; runs are interleaved, medians after warm-up; the ratio is
luoshu time / onnxruntime time (below 1: luoshu is faster). About a minute on 2 cores.

    .venv/bin/python benchmarks/bench_onnx.py [--threads 2] [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import luoshu as ls
from luoshu.models import build


def _ctr_inputs(rng, batch):
    return {"dense": rng.standard_normal((batch, 13)).astype(np.float32), "sparse": rng.integers(0, 1000, (batch, 26))}


CASES = {
    "dcn": (lambda: build("dcn"), _ctr_inputs, (1, 512)),
    "resnet18": (
        lambda: build("resnet18", num_classes=10),
        lambda rng, b: {"x": rng.standard_normal((b, 3, 32, 32)).astype(np.float32)},
        (1, 32),
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    rng = np.random.default_rng(0)
    print(f"threads {args.threads}, {args.repeats} interleaved repeats, median ms")
    print(f"{'model':10} {'batch':>5} {'luoshu':>9} {'onnxruntime':>12} {'ratio':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (make, inputs, batches) in CASES.items():
            ls.manual_seed(0)
            model = make().eval()
            package = ls.serving.export(Path(tmp) / name, model, inputs(rng, 2), name=name)
            served = ls.serving.load(package)
            session = ort.InferenceSession(
                str(ls.onnx.export(package, Path(tmp) / f"{name}.onnx")), options, providers=["CPUExecutionProvider"]
            )
            for batch in batches:
                feeds = inputs(rng, batch)
                np.testing.assert_allclose(session.run(None, feeds)[0], served(feeds)["output"], rtol=1e-4, atol=1e-4)
                times = {"luoshu": [], "ort": []}
                runs = {"luoshu": lambda f=feeds, m=served: m(f), "ort": lambda f=feeds, s=session: s.run(None, f)}
                for _ in range(3):  # warm-up
                    for run in runs.values():
                        run()
                for _ in range(args.repeats):
                    for key, run in runs.items():
                        start = time.perf_counter()
                        run()
                        times[key].append(time.perf_counter() - start)
                ours, theirs = (statistics.median(times[k]) * 1e3 for k in ("luoshu", "ort"))
                print(f"{name:10} {batch:5d} {ours:9.3f} {theirs:12.3f} {ours / theirs:6.2f}")


if __name__ == "__main__":
    main()
