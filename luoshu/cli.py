"""The `luoshu` command line.

`luoshu train` with no arguments runs the embedded default job: an MLP on the
scikit-learn digits (shipped with scikit-learn, no download) trained in
define-and-run mode, with a progress bar, a metrics CSV and a checkpoint.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np

from luoshu.core.errors import Error


def _digits(seed: int):
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    split = int(0.8 * len(x))
    train, test = order[:split], order[split:]
    return x[train], y[train], x[test], y[test]


def train(args) -> float:
    """Trains the default MLP; returns the final test accuracy."""
    from tqdm import tqdm

    import luoshu as ls

    ls.manual_seed(args.seed)
    xtr, ytr, xte, yte = _digits(args.seed)
    model = ls.nn.Sequential(ls.nn.Linear(64, args.hidden), ls.nn.ReLU(), ls.nn.Linear(args.hidden, 10))
    optimizer = ls.optim.Adam(model.parameters(), lr=args.lr) if args.optimizer == "adam" else \
        ls.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)

    with ls.Graph("train") as g:
        x = ls.placeholder("x", (None, 64), "float32")
        y = ls.placeholder("y", (None,), "int64")
        logits = model(x)
        loss = ls.nn.functional.cross_entropy(logits, y)
        train_op = optimizer.minimize(loss)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    steps_per_epoch = len(xtr) // args.batch_size
    log_path = out / "metrics.csv"
    with open(log_path, "w", newline="") as f:
        log = csv.writer(f)
        log.writerow(["epoch", "step", "train_loss", "test_accuracy", "samples_per_s"])
        bar = tqdm(total=args.epochs * steps_per_epoch, unit="step", disable=args.quiet, dynamic_ncols=True)
        step, accuracy = 0, 0.0
        for epoch in range(1, args.epochs + 1):
            order = rng.permutation(len(xtr))
            start, losses = time.perf_counter(), []
            for b in range(steps_per_epoch):
                idx = order[b * args.batch_size:(b + 1) * args.batch_size]
                loss_v, _ = g.run([loss, train_op], {x: xtr[idx], y: ytr[idx]})
                losses.append(float(loss_v))
                step += 1
                bar.update(1)
            rate = steps_per_epoch * args.batch_size / (time.perf_counter() - start)
            accuracy = float((g.run(logits, {x: xte}).argmax(1) == yte).mean())
            bar.set_postfix(epoch=epoch, loss=f"{np.mean(losses):.4f}", test_acc=f"{accuracy:.3f}",
                            samples_s=f"{rate:,.0f}")
            log.writerow([epoch, step, f"{np.mean(losses):.6f}", f"{accuracy:.6f}", f"{rate:.1f}"])
        bar.close()
    ls.save(out / "checkpoint", model, optimizer, metadata={"test_accuracy": accuracy, "epochs": args.epochs})
    print(f"digits MLP: test accuracy {accuracy:.4f} after {args.epochs} epochs; "
          f"metrics in {log_path}, checkpoint in {out / 'checkpoint'}")
    return accuracy


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="luoshu", description="luoshu: distributed deep learning")
    sub = parser.add_subparsers(dest="command")
    t = sub.add_parser("train", help="train a model (default: MLP on the scikit-learn digits)")
    t.add_argument("--epochs", type=int, default=15)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--hidden", type=int, default=128)
    t.add_argument("--lr", type=float, default=0.05)
    t.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", default="runs/digits-mlp", help="directory for metrics.csv and the checkpoint")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.command != "train":
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        train(args)
    except Error as exc:
        print(f"luoshu: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
