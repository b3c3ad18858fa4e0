"""Evaluate a model on the valid or test split by full ranking.

    python launcher/evaluate.py --checkpoint RUN/best_model.pt [--data DIR]
    python launcher/evaluate.py --checkpoint RUN/checkpoints/step-00000420 --split valid
    python launcher/evaluate.py --config configs/beauty.yaml --data DIR \
        --import-reference ../shared/reference/ELCRec-Beauty-1.pt

A checkpoint holds the config it was trained with: the model is built from it, and --data
defaults to its data.path. A --config given with --checkpoint must agree with it on the model
section (it may set eval.*); --set applies on top of either. A published state_dict holds no
config, so --import-reference needs --config. The model runs on the GPU when there is one.

Prints the metrics as one JSON object on the last stdout line; writes nothing.
"""

from __future__ import annotations

import argparse

import torch

from elcrec_dist.config import ConfigError, load_config
from elcrec_dist.evaluation import evaluate
from elcrec_dist.model import ELCRec
from elcrec_dist.prepared import load_sequences
from elcrec_dist.reference import load_reference
from elcrec_dist.saved_model import build_model, check_catalogue, read_saved_model, resolve_config
from launcher.common import config_arguments, print_json_line, run_main


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    config_arguments(parser, config_required=False)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--import-reference", metavar="PT", help="a published ELCRec state_dict")
    source.add_argument(
        "--checkpoint", metavar="PATH",
        help="RUN/best_model.pt, or a committed training checkpoint folder RUN/checkpoints/step-N",
    )
    parser.add_argument("--split", choices=("valid", "test"), default="test")
    args = parser.parse_args()

    if args.checkpoint:
        saved = read_saved_model(args.checkpoint)
        config = resolve_config(saved, files=args.config, overrides=args.overrides)
    else:
        if not args.config:
            raise ConfigError(
                "--import-reference needs --config: a published state_dict holds no config"
            )
        config = load_config(args.config, args.overrides)
    data = args.data or config.data.path
    if not data:
        raise ConfigError("no dataset: pass --data or set data.path")
    info, _, sequences = load_sequences(data)
    if args.checkpoint:
        check_catalogue(saved, info, data)
        model = build_model(saved, config)
    else:
        model = ELCRec(config.model, num_items=info.num_items)
        load_reference(args.import_reference, model)
    model.to(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    ev = config.eval
    metrics = evaluate(model, sequences, split=args.split, ks=ev.ks, batch_size=ev.batch_size,
                       tile_items=ev.tile_items, history_items=ev.history_items)
    print_json_line(metrics)
    return 0


if __name__ == "__main__":
    run_main(main, hard_exit=True)
