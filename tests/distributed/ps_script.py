"""Workers of a `luoshu launch -n N --servers S` job talk to the servers the launcher started.

    python -m luoshu.distributed.launch -n 2 --servers 1 tests/distributed/ps_script.py OUT_DIR
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch

import luoshu as ls


def main() -> None:
    torch.set_num_threads(1)
    ls.distributed.init()  # a server process serves here and exits: nothing below runs there
    from luoshu import ps

    store, servers = ls.distributed.ps_store()
    client = ps.connect(store=store, timeout_s=120)  # generous: the test machine is shared
    client.create_table("t", 2, num_rows=8, id_policy="refuse", init=("zeros",), optimizer=("sgd", {"lr": 1.0}))
    client.barrier()
    client.push("t", np.array([ls.distributed.rank()]), -np.ones((1, 2), np.float32)).result()
    client.barrier()
    rows, _ = client.pull("t", np.arange(ls.distributed.world_size()))
    np.savez(os.path.join(sys.argv[1], f"rank{ls.distributed.rank()}.npz"), rows=rows, servers=servers,
             world=ls.distributed.world_size())
    client.shutdown_servers()
    client.close()
    ls.distributed.shutdown()


if __name__ == "__main__":
    main()
