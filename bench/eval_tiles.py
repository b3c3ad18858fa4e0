"""Time of one full-rank validation pass with the dense score matrix and with item tiles of
several sizes, on a real dataset and model: the figure behind ``eval.tile_items``'s default.

    python -m bench.eval_tiles --data data/beauty \
        --reference ../shared/reference/ELCRec-Beauty-1.pt [--tiles 4096 16384] [--repeat 5]

The published state_dict is built as the Beauty config's model (1 layer, 256 centres); with
``--checkpoint RUN/best_model.pt`` instead, the checkpoint's own config builds it. The passes
(``evaluation.evaluate_sums``, ``eval.batch_size`` users a batch) alternate between the
settings, forwards then backwards, ``--repeat`` rounds, so that load on the machine falls on
all of them alike. Prints the CPU model, the thread count, the fastest and the median pass of
each setting, whether every setting gave the dense pass's metric sums exactly, and the load
average before and after, as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from bench.topk_memory import cpu_model
from elcrec_dist.config import EvalConfig, ModelConfig
from elcrec_dist.evaluation import evaluate_sums
from elcrec_dist.model import ELCRec
from elcrec_dist.prepared import load_sequences
from elcrec_dist.reference import load_reference
from elcrec_dist.saved_model import build_model, check_catalogue, read_saved_model, resolve_config


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="prepared dataset")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--reference", metavar="PT", help="published state_dict (Beauty shape)")
    source.add_argument("--checkpoint", metavar="PATH", help="RUN/best_model.pt or a checkpoint")
    parser.add_argument("--tiles", type=int, nargs="+", default=[4096, EvalConfig.tile_items])
    parser.add_argument("--split", choices=("valid", "test"), default="valid")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    info, _, sequences = load_sequences(args.data)
    batch_size = EvalConfig.batch_size
    if args.checkpoint:
        saved = read_saved_model(args.checkpoint)
        config = resolve_config(saved, files=None)
        check_catalogue(saved, info, args.data)
        model = build_model(saved, config)
        batch_size = config.eval.batch_size
    else:
        model = ELCRec(ModelConfig(num_layers=1, num_clusters=256), num_items=info.num_items)
        load_reference(args.reference, model)

    settings: list[int | None] = [None, *args.tiles]
    seconds: dict[int | None, list[float]] = {s: [] for s in settings}
    sums: dict[int | None, dict[str, float]] = {}
    load_before = os.getloadavg()
    for round_ in range(args.repeat):
        for tile in settings if round_ % 2 == 0 else settings[::-1]:
            started = time.perf_counter()
            sums[tile], _ = evaluate_sums(model, sequences, split=args.split,
                                          batch_size=batch_size, tile_items=tile)
            seconds[tile].append(time.perf_counter() - started)

    def label(tile: int | None) -> str:
        return "dense" if tile is None else f"tile_{tile}"

    result = {
        "cpu": cpu_model(), "threads": torch.get_num_threads(), "split": args.split,
        "users": len(sequences), "items": info.num_items, "batch_size": batch_size,
        "fastest_s": {label(t): round(min(seconds[t]), 3) for t in settings},
        "median_s": {label(t): round(statistics.median(seconds[t]), 3) for t in settings},
        "metrics_equal_dense": all(sums[t] == sums[None] for t in settings),
        "load_avg": [round(x, 1) for x in (*load_before, *os.getloadavg())],
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
