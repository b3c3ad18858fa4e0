"""Probes of trained models that ask how they were trained (docs/notes/beauty-at5-gap.md).

    python -m bench.probe_reference --config configs/beauty.yaml --data data/beauty \\
        --model published=reference:../shared/reference/ELCRec-Beauty-1.pt \\
        --model ours=runs/beauty-full/best_model.pt [--users 2048] [--batches 12]
        [--prefix-users 4000] [--seed 0]

Models are named as in ``bench.compare_models`` (``NAME=best_model.pt`` or
``NAME=reference:PATH``). Three probes, each model in eval mode (no dropout):

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
   centres: how far training went, term by term; and the largest negative logit of the next-item
   loss (the reference's ``log(1 - σ + 1e-24)`` stops a negative's gradient past about 16.6).
   Plus the norms of the position embeddings in bands (``position_norm/A-B``, the mean over
   positions A..B; the newest item sits at T - 1):
   how strongly the model encodes where an item sits against what it is. And, per loss term,
   the norm of its *weighted* gradient (``loss.*_weight`` applied) with respect to the position
   embeddings of each band and to the item table (``grad/TERM/position_A-B``,
   ``grad/TERM/items``), averaged over the same batches in training mode (dropout seeded per
   batch): which term shapes which parameters. And the centres' spread as training logs it
   (``centres/*`` of ``elcrec_dist.trainer.intents.centre_stats``, every user assigned): among
   them the effective rank and the share of opposed pairs, which tell centres spread over many
   directions from centres folded onto two opposite groups.
3. **Prefix alignment.** For ``--prefix-users`` users and every training target ``seq[m+1]``
   (m = 0 .. len - 4), the full-ranking rank of that target (items of ``seq[:m+1]`` excluded)
   predicted two ways: inside the whole training input ``seq[:-3]`` (where ``seq[m]`` sits d
   positions before the newest, as one-sequence-per-user training sees it) and from the prefix
   ``seq[:m+1]`` alone, newest at T - 1 (as evaluation, and training on every prefix as a
   separate sequence, see it). Reported by d as HR@20, NDCG@20 and the prefix / in-sequence
   ratio. A model trained on every prefix as its own sequence (ICSRec's "DS" segmentation)
   has seen the prefix form of every pair; one trained on one sequence per user only the
   in-sequence form.

Prints one JSON object as the last stdout line.
"""

from __future__ import annotations

import argparse
import math
import random
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from bench.compare_models import REFERENCE_PREFIX, load_compared_model, parse_model_argument
from elcrec_dist.batching import TrainBatch, make_train_batch
from elcrec_dist.config import ConfigError, ExperimentConfig, load_config
from elcrec_dist.data import left_pad, train_pairs
from elcrec_dist.embed import pooled_embeddings
from elcrec_dist.evaluation import answer_ranks
from elcrec_dist.losses import assign_users, elcrec_terms, fuse_intents
from elcrec_dist.model import ELCRec
from elcrec_dist.prepared import load_sequences
from elcrec_dist.trainer.intents import centre_stats
from launcher.common import config_arguments, print_json_line, run_main

PROBE_BATCH = 256


def with_reserved_row(model: ELCRec, source: str) -> ELCRec:
    """The same model with an item table of N + 2 rows: the published row N + 1 where the
    source is a published checkpoint, else a fresh N(0, init_std) row (never trained)."""
    wide = ELCRec(model.config, num_items=model.num_items + 1)
    state = model.state_dict()
    if source.startswith(REFERENCE_PREFIX):
        published = torch.load(
            source[len(REFERENCE_PREFIX) :], map_location="cpu", weights_only=True
        )
        extra = published["item_embeddings.weight"][-1:].to(state["item_embeddings.weight"].dtype)
    else:
        extra = (
            torch.randn(1, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
            * model.config.init_std
        )
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
def mask_matching(
    model: ELCRec, inputs: list[list[int]], *, token: int, config: ExperimentConfig, seed: int
) -> float:
    """Fraction of users whose masked view 1 is nearest (raw dot product of the fused, flattened
    states, within its batch of ``PROBE_BATCH``) to their own masked view 2."""
    rng = random.Random(seed)
    hits = 0
    for start in range(0, len(inputs), PROBE_BATCH):
        chunk = inputs[start : start + PROBE_BATCH]
        views = [
            np.array(masked(seq, config.augment.mask_ratio, token, rng)) for seq in chunk + chunk
        ]
        hidden = model(left_pad(views, config.model.max_len))  # [2b, T, D]
        fused = fuse_intents(hidden, model.cluster_centers, config.loss.fusion)  # [2b, F]
        one, two = fused[: len(chunk)], fused[len(chunk) :]
        hits += int(((one @ two.T).argmax(dim=1) == torch.arange(len(chunk))).sum())
    return hits / len(inputs)


def probe_batches(
    model: ELCRec, sequences: list[np.ndarray], *, config: ExperimentConfig, batches: int, seed: int
) -> Iterator[TrainBatch]:
    """The fingerprint's training batches: the same users, negatives and views for every model
    and every call with the same ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    order = np.random.default_rng(seed).permutation(len(sequences))
    size = config.train.batch_size
    for b in range(batches):
        rows = [sequences[i] for i in order[b * size : (b + 1) * size]]
        yield make_train_batch(rows, num_items=model.num_items, max_len=config.model.max_len,
                               augment=config.augment, generator=generator)


@torch.no_grad()
def fingerprint(
    model: ELCRec, sequences: list[np.ndarray], *, config: ExperimentConfig, batches: int, seed: int
) -> dict[str, float]:
    """Mean loss terms over the same training batches (eval mode), and parameter norms."""
    model.eval()
    totals: dict[str, float] = {}
    largest_negative = -math.inf
    for batch in probe_batches(model, sequences, config=config, batches=batches, seed=seed):
        for name, value in elcrec_terms(model, batch, config.loss).items():
            totals[f"loss/{name}"] = totals.get(f"loss/{name}", 0.0) + float(value) / batches
        # the reference's log(1 - σ(x) + 1e-24) stops a negative's gradient once σ(x) rounds to 1
        # (x > ~16.6)
        hidden = model(batch.inputs)  # [B, T, D]
        negative = (hidden * model.item_embeddings.weight[batch.negatives]).sum(-1)[
            batch.targets > 0
        ]
        largest_negative = max(largest_negative, float(negative.max()))
    totals["next_item/largest_negative_logit"] = largest_negative
    totals["item_embedding_norm"] = float(model.item_embeddings.weight[1:].norm(dim=1).mean())
    totals["centre_norm"] = float(model.cluster_centers.norm(dim=1).mean())
    # how the centres spread and how many users each wins (every user, as the training logs it)
    wins = torch.bincount(
        assign_users(pooled_embeddings(model, sequences, batch_size=1024), model.cluster_centers),
        minlength=model.cluster_centers.shape[0],
    ).float()
    totals.update(centre_stats(model.cluster_centers, wins))
    totals.update(position_norms(model))
    totals.update(gradient_norms(model, sequences, config=config, batches=batches, seed=seed))
    return totals


def gradient_norms(
    model: ELCRec, sequences: list[np.ndarray], *, config: ExperimentConfig, batches: int, seed: int
) -> dict[str, float]:
    """Mean norm of each weighted loss term's gradient w.r.t. the position embeddings per band
    and the item table, over the fingerprint's batches (train mode, dropout seeded by batch).
    Parameters' ``.grad`` are not touched."""
    was_training = model.training
    weights = {"next_item": 1.0, "seq_cl": config.loss.seq_cl_weight,
               "intent_cl": config.loss.intent_cl_weight, "cluster": config.loss.cluster_weight}
    bands = position_bands(model.config.max_len)
    params = [model.position_embeddings.weight, model.item_embeddings.weight]
    totals: dict[str, float] = {}
    model.train()
    try:
        with torch.enable_grad():  # the fingerprint itself runs under no_grad
            for b, batch in enumerate(
                probe_batches(model, sequences, config=config, batches=batches, seed=seed)
            ):
                torch.manual_seed(seed * 100_003 + b)  # dropout
                for name, value in elcrec_terms(model, batch, config.loss).items():
                    positions, items = torch.autograd.grad(
                        weights[name] * value, params, retain_graph=True, allow_unused=True
                    )
                    parts = {
                        f"position_{a}-{z}": None if positions is None else positions[a : z + 1]
                        for a, z in bands
                    }
                    parts["items"] = items
                    for part, grad in parts.items():
                        key = f"grad/{name}/{part}"
                        totals[key] = (
                            totals.get(key, 0.0)
                            + (0.0 if grad is None else float(grad.norm())) / batches
                        )
    finally:
        model.train(was_training)
    return totals


def position_bands(max_len: int) -> list[tuple[int, int]]:
    """Inclusive position ranges: the older half, the rest but the newest five, then each of
    the newest five positions (fewer for short windows)."""
    half, tail = max_len // 2, max(0, max_len - 5)
    bands = [(0, half - 1)] if half >= 1 else []
    if tail > half:
        bands.append((half, tail - 1))
    bands += [(p, p) for p in range(max(tail, half), max_len)]
    return bands


@torch.no_grad()
def position_norms(model: ELCRec) -> dict[str, float]:
    """Mean L2 norm of the position embeddings per band of ``position_bands``."""
    norms = model.position_embeddings.weight.norm(dim=1)  # [T]
    return {
        f"position_norm/{a}-{b}": float(norms[a : b + 1].mean())
        for a, b in position_bands(model.config.max_len)
    }


def distance_band(d: int) -> str:
    return "d=0" if d == 0 else "d=1-2" if d <= 2 else "d=3-5" if d <= 5 else "d>=6"


@torch.no_grad()
def prefix_pairs_ranks(
    model: ELCRec, sequences: Sequence[np.ndarray]
) -> list[tuple[int, int, int]]:
    """(d, in-sequence rank, prefix rank) for every training target of every sequence (each of
    length >= 4). d = positions between ``seq[m]`` and the newest input item; only pairs whose
    ``seq[m]`` is inside the window of the whole input (d < T) are scored."""
    model.eval()
    window = model.config.max_len
    out: list[tuple[int, int, int]] = []
    for seq in sequences:
        inputs = seq[:-3]
        n = len(inputs)
        ms = [m for m in range(n) if n - 1 - m < window]
        hidden = model(left_pad([inputs], window))[0]  # [T, D]
        inside = hidden[torch.tensor([window - 1 - (n - 1 - m) for m in ms])]  # [P, D]
        prefixes = [seq[: m + 1] for m in ms]
        alone = model(left_pad(prefixes, window), last_only=True)[:, -1]  # [P, D]
        answers = torch.tensor([int(seq[m + 1]) for m in ms])
        history = left_pad(prefixes, max(len(p) for p in prefixes))  # [P, L], 0 = empty
        ranks_inside = answer_ranks(model.score_all(inside), answers, history)
        ranks_alone = answer_ranks(model.score_all(alone), answers, history)
        out += [
            (n - 1 - m, int(a), int(b))
            for m, a, b in zip(ms, ranks_inside.tolist(), ranks_alone.tolist(), strict=True)
        ]
    return out


def prefix_alignment(model: ELCRec, sequences: Sequence[np.ndarray]) -> dict[str, float]:
    """HR@20 and NDCG@20 of both forms by distance band, and the prefix / in-sequence ratios."""
    rows = prefix_pairs_ranks(model, sequences)
    report: dict[str, float] = {}
    for band in ("d=0", "d=1-2", "d=3-5", "d>=6", "d>=1"):
        chosen = [
            (a, b) for d, a, b in rows if (d >= 1 if band == "d>=1" else distance_band(d) == band)
        ]
        if not chosen:
            continue
        ranks = np.array(chosen, dtype=np.float64)  # [P, 2]: in-sequence, prefix
        hr = (ranks < 20).mean(axis=0)
        ndcg = ((ranks < 20) / np.log2(ranks + 2.0)).mean(axis=0)
        report[f"prefix/{band}/pairs"] = float(len(chosen))
        report[f"prefix/{band}/HR@20_in_sequence"], report[f"prefix/{band}/HR@20_prefix"] = (
            float(hr[0]),
            float(hr[1]),
        )
        report[f"prefix/{band}/NDCG@20_in_sequence"], report[f"prefix/{band}/NDCG@20_prefix"] = (
            float(ndcg[0]),
            float(ndcg[1]),
        )
        report[f"prefix/{band}/NDCG@20_ratio"] = (
            float(ndcg[1] / ndcg[0]) if ndcg[0] > 0 else float("nan")
        )
    return report


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    config_arguments(parser)
    parser.add_argument("--model", action="append", required=True, metavar="NAME=SOURCE")
    parser.add_argument("--users", type=int, default=2048, help="users of the mask-token probe")
    parser.add_argument(
        "--batches", type=int, default=12, help="training batches of the fingerprint"
    )
    parser.add_argument(
        "--prefix-users",
        type=int,
        default=4000,
        help="users of the prefix-alignment probe (0: skip it)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.users < 1 or args.batches < 1 or args.prefix_users < 0:
        raise ConfigError("--users and --batches must be >= 1, --prefix-users >= 0")
    models = [parse_model_argument(text) for text in args.model]
    config = load_config(args.config, args.overrides)
    data = args.data or config.data.path
    if not data:
        raise ConfigError("no dataset: pass --data or set data.path")
    info, _, sequences = load_sequences(data)
    long_enough = [train_pairs(seq)[0].tolist() for seq in sequences if len(seq) >= 8][: args.users]
    if len(long_enough) < args.users:
        raise ConfigError(
            f"--users {args.users}: the dataset has only {len(long_enough)} users "
            "with 8 or more items"
        )
    sequences = list(sequences)
    if args.prefix_users > len(sequences):
        raise ConfigError(
            f"--prefix-users {args.prefix_users}: the dataset has only {len(sequences)} users"
        )
    prefix_users = [
        sequences[i]
        for i in np.random.default_rng(args.seed).choice(
            len(sequences), size=args.prefix_users, replace=False
        )
    ]
    report: dict[str, dict[str, float]] = {}
    for name, source in models:
        model = load_compared_model(source, config, info.num_items)
        wide = with_reserved_row(model, source)
        report[name] = {
            "mask_matched/padding_0": mask_matching(
                wide, long_enough, token=0, config=config, seed=args.seed
            ),
            "mask_matched/reserved_id": mask_matching(
                wide, long_enough, token=info.num_items + 1, config=config, seed=args.seed
            ),
            **fingerprint(model, sequences, config=config, batches=args.batches, seed=args.seed),
            **(prefix_alignment(model, prefix_users) if prefix_users else {}),
        }
        print(name, " ".join(f"{k}={v:.4f}" for k, v in report[name].items()), flush=True)
    print_json_line(report)
    return 0


if __name__ == "__main__":
    run_main(main)
