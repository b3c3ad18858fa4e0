"""Worker for the validation test on 2 ranks, started by the deepspeed launcher: every rank
builds the same model (seeded) and runs ``evaluate_sharded`` on the dataset with the given
``--set`` overrides; rank 0 saves the metrics to OUT/metrics.json."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from elcrec_dist import distributed as dist_utils
from elcrec_dist.config import load_config
from elcrec_dist.model import ELCRec
from elcrec_dist.stream import StreamingDataset
from elcrec_dist.trainer.validation import evaluate_sharded
from launcher.common import run_main


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--split", default="valid")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--local_rank", type=int, default=None)
    args = parser.parse_args()
    config = load_config(None, args.overrides)
    data = StreamingDataset.open(args.data)
    device = dist_utils.init(local_rank=args.local_rank)
    torch.manual_seed(5)
    model = ELCRec(config.model, num_items=data.info.num_items).eval()
    metrics = evaluate_sharded(model, data, config, split=args.split, device=device)
    if dist_utils.is_main():
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "metrics.json").write_text(json.dumps(metrics))
    dist_utils.teardown()
    return 0


if __name__ == "__main__":
    run_main(main, hard_exit=True)
