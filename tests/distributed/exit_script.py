"""A script as a user writes it: init, a collective (and, with --ps, a parameter-server table), then the
end of the script, with no explicit shutdown of anything.

    python -m luoshu.distributed.launch -n 2 [--servers 1] tests/distributed/exit_script.py OUT_DIR [--ps]
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch

import luoshu as ls


def main() -> None:
    torch.set_num_threads(1)
    ls.distributed.init()
    x = ls.tensor(np.full(1000, float(ls.distributed.rank() + 1), np.float32))
    y = ls.ops.all_reduce(x)
    assert float(y.numpy()[0]) == sum(range(1, ls.distributed.world_size() + 1))
    if "--ps" in sys.argv:
        from luoshu import ps

        client = ps.connect(timeout_s=60)
        client.create_table("t", 2, init=("zeros",), optimizer=("sgd", {"lr": 1.0}))
        client.push("t", np.array([ls.distributed.rank()]), np.ones((1, 2), np.float32)).result()
    # The end of the script: when it was reached, for the test to see how long the job took to end after it.
    with open(os.path.join(sys.argv[1], f"end{ls.distributed.rank()}"), "w") as f:
        f.write(repr(time.time()))


if __name__ == "__main__":
    main()
