"""Evaluate a model on the valid or test split by full ranking.

    python launcher/evaluate.py --config configs/beauty.yaml --data DIR \
        --import-reference ../shared/reference/ELCRec-Beauty-1.pt
    python launcher/evaluate.py --config configs/demo.yaml --data DIR --checkpoint RUN/best_model.pt
    python launcher/evaluate.py --config configs/demo.yaml --data DIR --checkpoint RUN/checkpoints/step-00000420

Prints the metrics as one JSON object on the last stdout line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from elcrec_dist.checkpoint import load_model_weights
from elcrec_dist.config import ConfigError, load_config
from elcrec_dist.evaluation import evaluate
from elcrec_dist.model import ELCRec
from elcrec_dist.prepared import load_sequences
from elcrec_dist.reference import load_reference
from launcher.common import config_arguments, print_json_line, run_main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config_arguments(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--import-reference", metavar="PT", help="a published ELCRec state_dict")
    source.add_argument("--checkpoint", metavar="PATH",
                        help="RUN/best_model.pt, or a committed training checkpoint folder RUN/checkpoints/step-N")
    parser.add_argument("--split", choices=("valid", "test"), default="test")
    args = parser.parse_args()

    config = load_config(args.config, args.overrides)
    data = args.data or config.data.path
    if not data:
        raise ConfigError("no dataset: pass --data or set data.path")
    info, _, sequences = load_sequences(data)
    model = ELCRec(config.model, num_items=info.num_items)
    if args.import_reference:
        load_reference(args.import_reference, model)
    else:
        model.load_state_dict(load_model_weights(args.checkpoint))
    metrics = evaluate(model, sequences, split=args.split, ks=config.eval.ks, batch_size=config.eval.batch_size)
    print_json_line(metrics)
    return 0


if __name__ == "__main__":
    run_main(main)
