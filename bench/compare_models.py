"""Two models on the same users: metrics, their difference, and how much of it the test set decides.

    python -m bench.compare_models --config configs/beauty.yaml --data data/beauty \\
        --model ours=runs/beauty-full/best_model.pt \\
        --model published=reference:../shared/reference/ELCRec-Beauty-1.pt \\
        [--split test] [--resamples 2000] [--seed 0]

Each ``--model NAME=SOURCE`` is a model file written by ``launcher/train.py``
(``RUN/best_model.pt``), a committed training checkpoint folder (``RUN/checkpoints/step-N``),
or ``reference:PATH``, a published ELCRec state_dict (loaded with ``weights_only=True``). Every
model ranks every user of ``--split`` by full ranking, exactly as ``launcher/evaluate.py`` does,
history items by the config's ``eval.history_items`` (``score_zero`` in the paper's dataset
configs, the rule behind the published rows; ``--set eval.history_items=exclude`` for the other);
the per-user values (HR@k, NDCG@k, MRR) are kept.

The first model is compared with each other one by a **paired bootstrap over users**: the users
are resampled with replacement ``--resamples`` times and, on each resample, both models' means
are taken over the *same* users. Reported per metric: each model's mean, the relative difference
``mean_first / mean_other - 1`` and its 95 % interval (2.5th and 97.5th percentiles over
resamples), and the interval of the first model's own metric. The interval says how far the
metric moves with the choice of test users alone, for a fixed model; it says nothing about
training noise (another seed trains another model).

``--published DATASET`` sets the first model beside the paper's published row for DATASET (Table
1, parsed from ``{--shared}/docs/elcrec-method.md``), for a dataset whose published weights we do
not have (Sports, Yelp): per published metric, the first model's mean, the published figure,
``mean / published - 1`` and its 95 % interval over the same resamples of the users. The
published figure is one number, so there is nothing to pair: the interval is the first model's
own, divided by the published figure. One ``--model`` is enough then.

``--by-repeat`` also splits the users by whether their answer is an item already in their
history (a repeat: a place visited again, an item bought again) and reports, per group, the
number of users, each model's means and the same paired comparison within the group. Under
``score_zero`` a repeated answer scores 0 and ranks behind every positive score, so comparing the
groups under both history rules shows how much of the rule's cost falls on those users.

Prints one JSON object as the last stdout line.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TypedDict

import numpy as np

from bench.reproduce import DATASET_FILES, HarnessError, paper_metrics, parse_spec
from elcrec_dist.checkpoint import load_model_weights
from elcrec_dist.config import ConfigError, ExperimentConfig, load_config
from elcrec_dist.data import Split, eval_batch, eval_pair
from elcrec_dist.evaluation import DEFAULT_TILE_ITEMS, HistoryItems, batch_ranks
from elcrec_dist.model import ELCRec
from elcrec_dist.prepared import load_sequences
from elcrec_dist.reference import load_reference
from launcher.common import config_arguments, print_json_line, run_main

REFERENCE_PREFIX = "reference:"


def parse_model_argument(text: str) -> tuple[str, str]:
    """``NAME=SOURCE`` -> (name, source); a clear error for anything else."""
    name, sep, source = text.partition("=")
    if not sep or not name or not source:
        raise ConfigError(f"--model {text!r}: expected NAME=CHECKPOINT or NAME=reference:PATH")
    return name, source


def load_compared_model(source: str, config: ExperimentConfig, num_items: int) -> ELCRec:
    """A model from our checkpoint file or, with the ``reference:`` prefix, a published one."""
    model = ELCRec(config.model, num_items=num_items)
    if source.startswith(REFERENCE_PREFIX):
        load_reference(source[len(REFERENCE_PREFIX):], model)
    else:
        model.load_state_dict(load_model_weights(source))
    return model.eval()


def user_ranks(
    model: ELCRec,
    sequences: Sequence[np.ndarray],
    *,
    split: Split,
    batch_size: int,
    history_items: HistoryItems = "exclude",
    tile_items: int | None = DEFAULT_TILE_ITEMS,
) -> np.ndarray:
    """0-based full-ranking rank of every user's answer, through ``evaluation.batch_ranks`` as
    ``launcher/evaluate.py`` ranks (history items by ``history_items``, the catalogue scored
    ``tile_items`` items at a time). -> [U]."""
    model.eval()
    out = []
    for start in range(0, len(sequences), batch_size):
        batch = eval_batch(sequences[start : start + batch_size], split, model.config.max_len)
        ranks = batch_ranks(model, batch, tile_items=tile_items, history_items=history_items)
        out.append(ranks.cpu().numpy())
    return np.concatenate(out)


def repeat_answers(sequences: Sequence[np.ndarray], split: Split) -> np.ndarray:
    """Whether each user's ``split`` answer is already in the user's (untruncated) history,
    the history the ranking excludes or zeroes. -> [U] bool."""
    flags = []
    for seq in sequences:
        history, answer = eval_pair(seq, split)
        flags.append(bool(np.any(history == answer)))
    return np.array(flags, dtype=bool)


def per_user_values(ranks: np.ndarray, ks: Sequence[int]) -> tuple[list[str], np.ndarray]:
    """Per-user HR@k, NDCG@k (each k) and MRR from 0-based ranks [U] -> (names, [U, M] float64).

    Column means are the metrics ``elcrec_dist.evaluation`` reports.
    """
    r = ranks.astype(np.float64)
    names: list[str] = []
    columns: list[np.ndarray] = []
    for k in ks:
        hit = (r < k).astype(np.float64)
        names += [f"HR@{k}", f"NDCG@{k}"]
        columns += [hit, hit / np.log2(r + 2.0)]
    names.append("MRR")
    columns.append(1.0 / (r + 1.0))
    return names, np.stack(columns, axis=1)


def resample_counts(users: int, resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Each bootstrap resample as how often it draws each user: [users] int64 per resample.

    Resample r draws ``users`` indices uniformly with replacement, the r-th
    ``default_rng(seed).integers(0, users, users)`` call; counts keep memory at O(users).
    """
    rng = np.random.default_rng(seed)
    for _ in range(resamples):
        yield np.bincount(rng.integers(0, users, users), minlength=users)


def paired_bootstrap(
    first: np.ndarray, other: np.ndarray, counts: Iterable[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Means of both models over each resample of users.

    first, other: [U, M] per-user values of the same users in the same order; counts: one
    [U] vector per resample (``resample_counts``). Returns (first_means, other_means), each
    [R, M].
    """
    if first.shape != other.shape:
        raise ValueError(f"per-user values differ in shape: {first.shape} vs {other.shape}")
    users, metrics = first.shape
    first_means, other_means = [], []
    for count in counts:
        first_means.append(count @ first / users)
        other_means.append(count @ other / users)
    if not first_means:
        return np.zeros((0, metrics)), np.zeros((0, metrics))
    return np.stack(first_means), np.stack(other_means)


def interval(values: np.ndarray) -> list[float]:
    """95 % percentile interval of [R] values."""
    low, high = np.percentile(values, [2.5, 97.5])
    return [float(low), float(high)]


def compare(
    names: list[str], first: np.ndarray, other: np.ndarray, *, resamples: int, seed: int
) -> dict[str, dict[str, object]]:
    """Per metric: both means, relative difference first/other - 1 and bootstrap intervals."""
    first_means, other_means = paired_bootstrap(
        first, other, resample_counts(len(first), resamples, seed)
    )
    result: dict[str, dict[str, object]] = {}
    for m, name in enumerate(names):
        a, b = float(first[:, m].mean()), float(other[:, m].mean())
        entry: dict[str, object] = {"first": a, "other": b, "relative": a / b - 1.0 if b else None}
        if resamples:
            ok = other_means[:, m] > 0  # a resample where the other model has 0 has no ratio
            entry["relative_95"] = (
                interval(first_means[ok, m] / other_means[ok, m] - 1.0) if ok.any() else None
            )
            entry["first_95"] = interval(first_means[:, m])
        result[name] = entry
    return result


REPEAT_GROUPS = ("repeat", "new")


class RepeatGroup(TypedDict, total=False):
    """One group of ``by_repeat``: its users, and (when it has any) each model's means and the
    comparisons of the first model with each other one."""

    users: int
    metrics: dict[str, dict[str, float]]
    comparisons: dict[str, dict[str, dict[str, object]]]


def by_repeat(
    names: list[str],
    values: Mapping[str, np.ndarray],
    repeat: np.ndarray,
    first: str,
    *,
    resamples: int,
    seed: int,
) -> dict[str, RepeatGroup]:
    """Per group of users (``repeat``: the answer is in the history; ``new``: it is not): the
    users, each model's means over them and ``compare`` of ``first`` with each other model on
    the group's rows. values: model -> [U, M]; repeat: [U] bool."""
    groups: dict[str, RepeatGroup] = {}
    for group, rows in zip(REPEAT_GROUPS, (repeat, ~repeat), strict=True):
        entry: RepeatGroup = {"users": int(rows.sum())}
        if rows.any():
            entry["metrics"] = {
                model: dict(zip(names, (float(v) for v in array[rows].mean(axis=0)), strict=True))
                for model, array in values.items()
            }
            entry["comparisons"] = {
                f"{first} vs {other}": compare(
                    names, values[first][rows], array[rows], resamples=resamples, seed=seed
                )
                for other, array in values.items()
                if other != first
            }
        groups[group] = entry
    return groups


def against_published(
    names: list[str],
    first: np.ndarray,
    published: Mapping[str, float],
    *,
    resamples: int,
    seed: int,
) -> dict[str, dict[str, object]]:
    """Per metric of ``published`` (also in ``names``): the mean of ``first`` [U, M], the
    published figure, ``mean / published - 1`` and its bootstrap interval over ``resamples``
    resamples of the users (the same draws ``compare`` makes with this ``seed``)."""
    users = len(first)
    counts = resample_counts(users, resamples, seed)
    means = np.stack([count @ first / users for count in counts]) if resamples else first[:0]
    result: dict[str, dict[str, object]] = {}
    for m, name in enumerate(names):
        if name not in published:
            continue
        ours, paper = float(first[:, m].mean()), float(published[name])
        entry: dict[str, object] = {"first": ours, "published": paper,
                                    "relative": ours / paper - 1.0 if paper else None}
        if resamples and paper:
            entry["relative_95"] = interval(means[:, m] / paper - 1.0)
            entry["first_95"] = interval(means[:, m])
        result[name] = entry
    return result


def published_row(dataset: str, shared: Path) -> dict[str, float]:
    """The paper's Table 1 row (ELCRec) for ``dataset``, from the spec under ``shared``."""
    try:
        figures = parse_spec(shared / "docs" / "elcrec-method.md")
    except HarnessError as exc:
        raise ConfigError(str(exc)) from exc
    row = paper_metrics(figures, dataset).get("elcrec")
    if not row:
        raise ConfigError(f"--published {dataset}: the spec has no published ELCRec row for it")
    return row


def print_rows(title: str, entries: Mapping[str, Mapping[str, object]], other: str) -> None:
    """One line per metric: the first model's mean, the other figure (key ``other``), the
    relative difference and its interval."""
    print(title)
    for metric, entry in entries.items():
        band = entry.get("relative_95")
        extra = f"  95% [{band[0]:+.1%}, {band[1]:+.1%}]" if isinstance(band, list) else ""
        relative = entry["relative"]
        change = f"{relative:+.1%}" if isinstance(relative, float) else "(no ratio: 0)"
        print(f"  {metric:8s} {entry['first']:.4f} vs {entry[other]:.4f}  {change}{extra}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    config_arguments(parser)
    parser.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="NAME=SOURCE",
        help="a model to compare (at least two); the first is compared with each other",
    )
    parser.add_argument("--split", choices=("valid", "test"), default="test")
    parser.add_argument(
        "--resamples", type=int, default=2000, help="bootstrap resamples of the users (0: none)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling")
    parser.add_argument(
        "--published",
        choices=sorted(DATASET_FILES),
        help="also set the first model beside the paper's published row for this dataset",
    )
    parser.add_argument(
        "--by-repeat",
        action="store_true",
        help="also report each model on the users whose answer repeats a history item, and on "
        "the others",
    )
    parser.add_argument(
        "--shared", default="../shared", help="the folder holding docs/elcrec-method.md"
    )
    args = parser.parse_args()
    if len(args.model) < (1 if args.published else 2):
        raise ConfigError("--model: give at least two models to compare (or one with --published)")
    if args.resamples < 0:
        raise ConfigError(f"--resamples must be >= 0, got {args.resamples}")
    models = [parse_model_argument(text) for text in args.model]
    if len({name for name, _ in models}) != len(models):
        raise ConfigError("--model: names must be distinct")

    paper = published_row(args.published, Path(args.shared)) if args.published else None
    config = load_config(args.config, args.overrides)
    data = args.data or config.data.path
    if not data:
        raise ConfigError("no dataset: pass --data or set data.path")
    info, _, sequences = load_sequences(data)
    values: dict[str, np.ndarray] = {}
    names: list[str] = []
    for name, source in models:
        model = load_compared_model(source, config, info.num_items)
        ranks = user_ranks(model, sequences, split=args.split, batch_size=config.eval.batch_size,
                           history_items=config.eval.history_items,
                           tile_items=config.eval.tile_items)
        names, values[name] = per_user_values(ranks, config.eval.ks)
    (first_name, _), *others = models
    report: dict[str, object] = {
        "split": args.split,
        "history_items": config.eval.history_items,
        "users": len(sequences),
        "resamples": args.resamples,
        "metrics": {
            name: dict(zip(names, (float(v) for v in values[name].mean(axis=0)), strict=True))
            for name, _ in models
        },
        "comparisons": {
            f"{first_name} vs {other}": compare(
                names, values[first_name], values[other], resamples=args.resamples, seed=args.seed
            )
            for other, _ in others
        },
    }
    comparisons: dict[str, dict[str, dict[str, object]]] = report["comparisons"]  # type: ignore[assignment]
    for other, _ in others:
        print_rows(
            f"{first_name} vs {other} ({args.split}, history {config.eval.history_items}, "
            f"{len(sequences)} users, "
            f"{args.resamples} paired resamples):",
            comparisons[f"{first_name} vs {other}"], "other",
        )
    if paper is not None:
        beside = against_published(
            names, values[first_name], paper, resamples=args.resamples, seed=args.seed
        )
        report["published"] = {"dataset": args.published, "row": paper, first_name: beside}
        print_rows(
            f"{first_name} vs the published {args.published} row ({args.split}, "
            f"history {config.eval.history_items}, "
            f"{len(sequences)} users, {args.resamples} resamples of the users):",
            beside, "published",
        )
    if args.by_repeat:
        groups = by_repeat(names, values, repeat_answers(sequences, args.split), first_name,
                           resamples=args.resamples, seed=args.seed)
        report["by_repeat"] = groups
        for group, entry in groups.items():
            print(f"users whose answer is {'in' if group == 'repeat' else 'not in'} their "
                  f"history: {entry['users']} of {len(sequences)}")
            for name, means in entry.get("metrics", {}).items():
                print(f"  {name:12s} " + "  ".join(f"{m} {v:.4f}" for m, v in means.items()))
            for pair, rows in entry.get("comparisons", {}).items():
                print_rows(f"  {pair}, {group} users:", rows, "other")
    print_json_line(report)
    return 0


if __name__ == "__main__":
    run_main(main)
