"""Train ELCRec with DeepSpeed data parallelism.

    deepspeed launcher/train.py --config configs/demo.yaml [--data DIR] [--set key=value ...]
    python launcher/train.py --config configs/demo.yaml        # a world of one, no launcher

Trains with early stopping on validation, evaluates the best model on test, writes the run
folder (resolved config, TensorBoard, metrics.jsonl, best_model.pt, results.json) and prints the
test metrics as one JSON object on the last stdout line.
"""

from __future__ import annotations

import argparse

from elcrec_dist import distributed as dist_utils
from elcrec_dist.config import ConfigError, load_config
from elcrec_dist.rundir import check_location
from elcrec_dist.runlog import setup_console
from launcher.common import config_arguments, print_json_line, run_main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config_arguments(parser)
    parser.add_argument("--run-dir",
                        help="run folder: a local path or s3://BUCKET/PATH (overrides train.run_dir)")
    parser.add_argument(
        "--resume", nargs="?", const="required", choices=("required", "auto"), default=None,
        help="continue from the newest complete checkpoint in the run folder: an error if there is none, "
        "or, with --resume auto, start afresh then (what a retried Kubernetes pod wants)",
    )
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    args = parser.parse_args()

    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.path={args.data}")
    if args.run_dir:
        overrides.append(f"train.run_dir={args.run_dir}")
    config = load_config(args.config, overrides)
    if not config.data.path:
        raise ConfigError("no dataset: pass --data or set data.path")
    # Before any work: a URL is never taken for a local path; scheme, credentials and bucket
    # are checked here, not at the first checkpoint (exit 2 if missing, 75 if unreachable).
    check_location(config.data.path, what="dataset")
    check_location(config.train.run_dir, what="run folder")

    from elcrec_dist.stream import StreamingDataset
    from elcrec_dist.trainer import train

    data = StreamingDataset.open(config.data.path)  # manifest and footers: fails before any process group exists
    device = dist_utils.init(local_rank=args.local_rank)
    try:
        setup_console(main=dist_utils.is_main())
        run_dir, result = train(config, data, device=device, resume=args.resume)
        if dist_utils.is_main():
            print(f"run folder: {run_dir}")
            print_json_line({**result.test, "run_dir": str(run_dir)})
    finally:
        dist_utils.teardown()
    return 0


if __name__ == "__main__":
    run_main(main, hard_exit=True)
