"""Probes of trained models that ask how they were trained (docs/RESULTS.md, "Where the Beauty gap comes from").

    python bench/probe_reference.py --config configs/beauty.yaml --data data/beauty \
        --model published=reference:../shared/reference/ELCRec-Beauty-1.pt \
        --model ours=runs/beauty-full/best_model.pt [--users 2048] [--batches 12] [--seed 0]

Models are named as in ``bench/compare_models.py`` (``NAME=best_model.pt`` or
``NAME=reference:PATH``). Two probes, each model in eval mode (no dropout):

1. **Mask token.** The spec says the mask augmentation writes the padding id 0 (which attention
   ignores); the published item table has one extra row, the reserved id N + 1, which other
   code bases use as a mask token. For ``--users`` users (input ``seq[:-3]``, at least 5
   items) two views are drawn, each with 70 % of the positions (``augment.mask_ratio``) masked,
   once with 0 and once with N + 1 as the mask. Both views are encoded, fused with their nearest
   centres as the sequence CL does (``loss.fusion``), flattened, and each view of view 1 is
   matched to the view 2 row with the largest raw dot product in its batch of 256: the fraction
   matched to its own user. A model trained with a mask token matches its own kind of mask
   best. Our models have no row N + 1; a fresh N(0, 0.02) row (an id never trained) is added.
2. **Fingerprint.** Every loss term on the same ``--batches`` training batches (same users,
   negatives and views for every model), the mean norm of the item embeddings and of the
   centres: how far training went, term by term.

Prints one JSON object as the last stdout line.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from compare_models import REFERENCE_PREFIX, load_compared_model, parse_model_argument

from elcrec_dist.batching import make_train_batch
from elcrec_dist.config import ConfigError, ExperimentConfig, load_config
from elcrec_dist.data import left_pad, train_pairs
from elcrec_dist.losses import elcrec_terms, fuse_intents
from elcrec_dist.model import ELCRec
from elcrec_dist.prepared import load_sequences
from launcher.common import config_arguments, print_json_line, run_main

PROBE_BATCH = 256


def with_reserved_row(model: ELCRec, source: str) -> ELCRec:
    """The same model with an item table of N + 2 rows: the published row N + 1 where the
    source is a published checkpoint, else a fresh N(0, init_std) row (never trained)."""
    wide = ELCRec(model.config, num_items=model.num_items + 1)
    state = model.state_dict()
    if source.startswith(REFERENCE_PREFIX):
        published = torch.load(source[len(REFERENCE_PREFIX):], map_location="cpu", weights_only=True)
        extra = published["item_embeddings.weight"][-1:].to(state["item_embeddings.weight"].dtype)
    else:
        extra = torch.randn(1, model.config.hidden_size, generator=torch.Generator().manual_seed(0)) * model.config.init_std
    state["item_embeddings.weight"] = torch.cat([state["item_embeddings.weight"], extra])
    wide.load_state_dict(state)
    return wide.eval()


def masked(seq: Sequence[int], ratio: float, token: int, rng: random.Random) -> list[int]:
    """``seq`` with exactly ``floor(ratio * n)`` distinct positions set to ``token``."""
    out = list(seq)
    for position in rng.sample(range(len(out)), k=math.floor(ratio * len(out))):
        out[position] = token
    return out


@torch.no_grad()
def mask_matching(model: ELCRec, inputs: list[list[int]], *, token: int, config: ExperimentConfig, seed: int) -> float:
    """Fraction of users whose masked view 1 is nearest (raw dot product of the fused, flattened
    states, within its batch of ``PROBE_BATCH``) to their own masked view 2."""
    rng = random.Random(seed)
    hits = 0
    for start in range(0, len(inputs), PROBE_BATCH):
        chunk = inputs[start : start + PROBE_BATCH]
        views = [np.array(masked(seq, config.augment.mask_ratio, token, rng)) for seq in chunk + chunk]
        hidden = model(left_pad(views, config.model.max_len))  # [2b, T, D]
        fused = fuse_intents(hidden, model.cluster_centers, config.loss.fusion)  # [2b, F]
        one, two = fused[: len(chunk)], fused[len(chunk) :]
        hits += int(((one @ two.T).argmax(dim=1) == torch.arange(len(chunk))).sum())
    return hits / len(inputs)


@torch.no_grad()
def fingerprint(model: ELCRec, sequences: list[np.ndarray], *, config: ExperimentConfig, batches: int, seed: int) -> dict[str, float]:
    """Mean loss terms over the same training batches (eval mode), and parameter norms."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    order = np.random.default_rng(seed).permutation(len(sequences))
    totals: dict[str, float] = {}
    for b in range(batches):
        rows = [sequences[i] for i in order[b * config.train.batch_size : (b + 1) * config.train.batch_size]]
        batch = make_train_batch(rows, num_items=model.num_items, max_len=config.model.max_len,
                                 augment=config.augment, generator=generator)
        for name, value in elcrec_terms(model, batch, config.loss).items():
            totals[f"loss/{name}"] = totals.get(f"loss/{name}", 0.0) + float(value) / batches
    totals["item_embedding_norm"] = float(model.item_embeddings.weight[1:].norm(dim=1).mean())
    totals["centre_norm"] = float(model.cluster_centers.norm(dim=1).mean())
    return totals


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config_arguments(parser)
    parser.add_argument("--model", action="append", required=True, metavar="NAME=SOURCE")
    parser.add_argument("--users", type=int, default=2048, help="users of the mask-token probe")
    parser.add_argument("--batches", type=int, default=12, help="training batches of the fingerprint")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.users < 1 or args.batches < 1:
        raise ConfigError("--users and --batches must be >= 1")
    models = [parse_model_argument(text) for text in args.model]
    config = load_config(args.config, args.overrides)
    data = args.data or config.data.path
    if not data:
        raise ConfigError("no dataset: pass --data or set data.path")
    info, _, sequences = load_sequences(data)
    long_enough = [train_pairs(seq)[0].tolist() for seq in sequences if len(seq) >= 8][: args.users]
    if len(long_enough) < args.users:
        raise ConfigError(f"--users {args.users}: the dataset has only {len(long_enough)} users with 8 or more items")
    sequences = list(sequences)
    report: dict[str, dict[str, float]] = {}
    for name, source in models:
        model = load_compared_model(source, config, info.num_items)
        wide = with_reserved_row(model, source)
        report[name] = {
            "mask_matched/padding_0": mask_matching(wide, long_enough, token=0, config=config, seed=args.seed),
            "mask_matched/reserved_id": mask_matching(wide, long_enough, token=info.num_items + 1, config=config, seed=args.seed),
            **fingerprint(model, sequences, config=config, batches=args.batches, seed=args.seed),
        }
        print(name, " ".join(f"{k}={v:.4f}" for k, v in report[name].items()), flush=True)
    print_json_line(report)
    return 0


if __name__ == "__main__":
    run_main(main)
