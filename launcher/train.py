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
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    config_arguments(parser)
    parser.add_argument(
        "--run-dir", help="run folder: a local path or s3://BUCKET/PATH (overrides train.run_dir)"
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const="required",
        choices=("required", "auto"),
        default=None,
        help="continue from the newest complete checkpoint in the run folder: "
        "an error if there is none, "
        "or, with --resume auto, start afresh then (what a retried Kubernetes pod wants)",
    )
    parser.add_argument(
        "--init-from", metavar="RUN",
        help="warm start on this (newer) build from RUN's best model (a run folder or model file): "
        "items matched by original id through both builds' id maps, the encoder and centres "
        "carried over, a fresh optimizer; unlike --resume, a new run (train.init_from)",
    )
    # set by the deepspeed launcher
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.path={args.data}")
    if args.run_dir:
        overrides.append(f"train.run_dir={args.run_dir}")
    if args.init_from:
        overrides.append(f"train.init_from={args.init_from}")
    config = load_config(args.config, overrides)
    if not config.data.path:
        raise ConfigError("no dataset: pass --data or set data.path")
    # Before any work: a URL is never taken for a local path; scheme, credentials and bucket
    # are checked here, not at the first checkpoint (exit 2 if missing, 75 if unreachable).
    check_location(config.data.path, what="dataset")
    check_location(config.train.run_dir, what="run folder")

    from elcrec_dist.stream import StreamingDataset
    from elcrec_dist.trainer import train
    from elcrec_dist.trainer.warmstart import check_init_from

    # manifest and footers: fails before any process group exists
    data = StreamingDataset.open(config.data.path)
    check_init_from(config, data.info, data.url)  # a model or build a warm start cannot use: exit 2
    device = dist_utils.init(local_rank=args.local_rank,
                             timeout_s=config.train.collective_timeout_s)
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
