"""Batch inference: top-K recommendations, user vectors and intents for every user.

    deepspeed --num_gpus N launcher/infer.py RUN --data DIR --output OUT [--k 20]
    python launcher/infer.py RUN --data DIR --output s3://bucket/recs     # one process

RUN is a run folder (its best_model.pt holds the resolved config: no --config) or a model file.
--data defaults to the dataset the model was trained on (its stored data.path). Writes sharded
Parquet (one row per user: original user id, top-K original item ids and scores, user vector,
nearest intent and its cosine) and manifest.json last; see elcrec_dist/inference.py. --split
valid|test scores the split's input instead of the whole history (offline checks: HR/NDCG from
these lists equal launcher/evaluate.py's). Prints a JSON summary as the last stdout line.
"""

from __future__ import annotations

import argparse

from elcrec_dist import distributed as dist_utils
from elcrec_dist.inference import (
    DEFAULT_SHARD_USERS,
    FORMAT,
    InferenceSettings,
    inference_request,
    run_inference,
)
from elcrec_dist.outputs import OutputFolder
from elcrec_dist.runlog import setup_console
from elcrec_dist.stream import StreamingDataset
from launcher.common import (
    print_json_line,
    run_main,
    trained_model_and_data,
    trained_model_arguments,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    trained_model_arguments(parser, data_help="prepared dataset folder or URL")
    parser.add_argument("--k", type=int, default=20, help="items per user (default 20)")
    parser.add_argument("--keep-history", action="store_true",
                        help="let items of the user's history be recommended (default: excluded)")
    parser.add_argument("--split", choices=("valid", "test"), default=None,
                        help="score the split's input, its held-out item hidden (offline checks)")
    parser.add_argument("--shard-users", type=int, default=DEFAULT_SHARD_USERS,
                        help=f"users per output file (default {DEFAULT_SHARD_USERS})")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    trained, data_url, info = trained_model_and_data(args.run, args.data)
    data = StreamingDataset.open(data_url, info=info)
    settings = InferenceSettings(
        k=args.k, keep_history=args.keep_history, split=args.split, shard_users=args.shard_users,
        batch_size=trained.config.eval.batch_size, tile_items=trained.config.eval.tile_items,
    )
    out = OutputFolder(
        args.output, kind=FORMAT, request=inference_request(trained, data.info, settings)
    )
    device = dist_utils.init(local_rank=args.local_rank)
    try:
        setup_console(main=dist_utils.is_main())
        problem, done = None, False
        if dist_utils.is_main():
            try:
                done = out.claim()
            except Exception as exc:  # every rank must learn it, or the others wait forever
                problem = exc
        problem, done = dist_utils.broadcast_object((problem, done))
        if problem is not None:
            raise problem
        if done:
            if dist_utils.is_main():
                print_json_line({"output": args.output, "already_complete": True})
            return 0
        trained.model.to(device)
        stats = run_inference(trained, data, settings, out)
        if dist_utils.is_main():
            print_json_line({"output": args.output, "users": stats.users, "seconds": stats.seconds,
                             "users_per_s": stats.users / max(stats.seconds, 1e-9)})
    finally:
        dist_utils.teardown()
    return 0


if __name__ == "__main__":
    run_main(main, hard_exit=True)
