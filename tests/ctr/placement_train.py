"""Run by `luoshu launch -n N` from test_placement.py: the small DCN with sharded embeddings.

    placement_train.py OUT SOURCE EVAL_SOURCE RUN[,RUN...]   (RUN = placement:update, e.g. distributed:Local)

Rank 0 writes OUT.npz with every run's gathered embedding table, dense parameters and AUC.
"""

from __future__ import annotations

import sys

import numpy as np

import luoshu.distributed as dist
from luoshu import ctr as hugectr
from luoshu import ps
from tests.ctr.conftest import dcn_model

STEPS, BATCH = 4, 64


def run(source, eval_source, placement, update):
    model = dcn_model(source, eval_source, batch=BATCH, update=getattr(hugectr.Update_t, update),
                      embedding_placement=placement)
    model.compile()
    for _ in range(STEPS):
        model.train()
    result = {"table": model.embedding_table(0), "auc": np.array(model.evaluate()["AUC"])}
    result.update({f"dense/{k}": v.numpy() for k, v in model.network.state_dict().items()})
    return result


def main():
    out, source, eval_source, runs = sys.argv[1:5]
    dist.init()
    saved = {}
    for spec in runs.split(","):
        placement, update = spec.split(":")
        for k, v in run(source, eval_source, placement, update).items():
            saved[f"{spec}/{k}"] = v
    if dist.rank() == 0:
        np.savez(out, **saved)
    store, servers = dist.ps_store()
    if servers:  # every worker is done with the parameter servers: worker 0 stops them
        client = ps.connect(store=store, worker_rank=dist.rank())
        dist.barrier()
        if dist.rank() == 0:
            client.shutdown_servers(force=True)
        client.close()
    dist.shutdown()


if __name__ == "__main__":
    main()
