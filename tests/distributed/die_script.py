"""Worker `--victim` dies (SIGKILL) or hangs in the middle of training; the others keep all-reducing.

    python -m luoshu.distributed.launch -n 2 tests/distributed/die_script.py --victim 1 [--hang | --hang-at-end]

--hang-at-end: every worker runs a few collectives; then the victim hangs while the others end.
"""

from __future__ import annotations

import argparse
import os
import signal
import time

import numpy as np
import torch

import luoshu as ls


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--victim", type=int, default=1)
    parser.add_argument("--hang", action="store_true", help="stop calling collectives instead of dying")
    parser.add_argument("--hang-at-end", action="store_true", help="hang after the last collective")
    args = parser.parse_args()
    torch.set_num_threads(1)
    ls.distributed.init()
    x = ls.tensor(np.ones(1000, np.float32))
    if args.hang_at_end:
        for _ in range(3):
            ls.ops.all_reduce(x)
        if ls.distributed.rank() == args.victim:
            while True:
                time.sleep(1)
        return
    for step in range(100000):  # far longer than any test waits: only the fault ends it
        if step == 3 and ls.distributed.rank() == args.victim:
            if args.hang:
                while True:
                    time.sleep(1)
            os.kill(os.getpid(), signal.SIGKILL)
        ls.ops.all_reduce(x)


if __name__ == "__main__":
    main()
