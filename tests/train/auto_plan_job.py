"""A `parallel: auto` job whose layer-wise search is made to return one given per-block plan (the
hand-over from the search to HotSPa, not the choice, is under test); run under `luoshu launch` by
tests/train/test_hot_switch_job.py.

    luoshu launch -n 4 tests/train/auto_plan_job.py CONFIG.yaml --pp 2 --tp 2,1 --stages 0,1 --recompute none,full
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

import luoshu as ls
from luoshu.parallel import layerwise
from luoshu.train.config import TrainConfig


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("--pp", type=int, required=True)
    parser.add_argument("--tp", required=True)
    parser.add_argument("--stages", required=True)
    parser.add_argument("--recompute", required=True)
    args = parser.parse_args()
    tp = tuple(int(t) for t in args.tp.split(","))
    plan = layerwise.LayerPlan(None, args.recompute.split(","), [int(s) for s in args.stages.split(",")], 0.0, 0.0,
                               {}, tp, (False,) * len(tp), args.pp)

    def search_plan(*_, **__):
        return plan, [(None, plan, {"free_bytes": 0.0, "least_bytes": 0.0, "pp": args.pp})]

    layerwise.search_plan = search_plan
    ls.train.train(TrainConfig.from_dict(yaml.safe_load(Path(args.config).read_text())))


if __name__ == "__main__":
    main()
