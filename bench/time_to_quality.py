"""Validation curves side by side: when each run first reaches a target quality.

    python -m bench.time_to_quality --target 0.0632 --half-of 278 \\
        --curve faithful=docs/results/beauty-elcrec-seed1-full-valid-ndcg20.csv \\
        --run 'tau 50=runs/reproduce/beauty/elcrec-seed1-e139-6d35f0d8' \\
        --out docs/results/figures/time-to-quality-beauty.png

A ``--run`` is a run folder (its ``metrics.jsonl``: valid NDCG@20 after each epoch, and the
k-means, training and validation seconds up to that epoch); a ``--curve`` is a CSV of
``epoch,value`` rows. For each it prints one JSON line: the first epoch whose validation
NDCG@20 reaches ``--target`` (null if none), the wall seconds of training and validation up
to it (runs only), and the best value and its epoch. The figure holds every curve, the target as a
horizontal line and, with ``--half-of E``, the epoch budget E / 2 as a vertical one.

``--digitise PNG`` instead reads a curve back from a figure the reproduction harness drew
(one line in its default blue), for a run whose folder was not kept: the pixel columns and rows
of two known ticks on each axis are given (``--x-pixels 84:688 --x-values 0:270 --y-pixels
387:72 --y-values 0:0.06`` for ``figures/reproduce-beauty-elcrec-seeds-1-full.png``), and the
curve's value at each epoch is the mean row of the line's pixels in that epoch's column; the
CSV goes to stdout. Read that way the faithful Beauty run gives 0.0011 after epoch 0 and its best,
0.0630 at epoch 278, where its log said 0.0011 and 0.0631.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

LINE_RGB = (31, 119, 180)  # matplotlib's first colour, the harness's single-variant line
LEGEND_PIXELS = (90, 170)  # rows, columns of the top-left corner the legend covers


@dataclass(frozen=True)
class Curve:
    name: str
    epochs: tuple[int, ...]
    values: tuple[float, ...]
    seconds: tuple[float, ...] | None = None  # k-means, training, validation seconds up to each


def run_curve(name: str, run_dir: Path) -> Curve:
    """Valid NDCG@20 after each validated epoch of a run folder (``metrics.jsonl``, which a
    resume rewinds to its checkpoint, so no epoch appears twice), with the seconds spent up to
    it."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"error: {path} is missing")
    epochs: list[int] = []
    values: list[float] = []
    seconds: list[float] = []
    total, epoch = 0.0, None
    for line in path.read_text().splitlines():
        row = json.loads(line)
        total += sum(row.get(key, 0.0) for key in ("time/kmeans_start_s", "time/clustering_s",
                                                   "time/train_s", "time/eval_s"))
        if "train/epoch" in row:
            epoch = int(row["train/epoch"])
        if "valid/NDCG@20" in row:
            if epoch is None:
                raise SystemExit(f"error: {path}: a validation pass before any epoch")
            epochs.append(epoch)
            values.append(float(row["valid/NDCG@20"]))
            seconds.append(total)
    if not epochs:
        raise SystemExit(f"error: {path} holds no validation pass")
    return Curve(name, tuple(epochs), tuple(values), tuple(seconds))


def csv_curve(name: str, path: Path) -> Curve:
    rows = [row for row in csv.reader(path.read_text().splitlines()) if row and row[0] != "epoch"]
    return Curve(name, tuple(int(r[0]) for r in rows), tuple(float(r[1]) for r in rows))


def first_reaching(curve: Curve, target: float) -> int | None:
    """Index of the first value >= ``target``, or None."""
    return next((i for i, v in enumerate(curve.values) if v >= target), None)


def report(curve: Curve, target: float) -> dict[str, object]:
    best = max(range(len(curve.values)), key=lambda i: curve.values[i])
    reached = first_reaching(curve, target)
    return {
        "curve": curve.name, "target": target,
        "first_epoch_at_target": None if reached is None else curve.epochs[reached],
        "seconds_to_target": (None if reached is None or curve.seconds is None
                              else round(curve.seconds[reached], 1)),
        "best": round(curve.values[best], 4), "best_epoch": curve.epochs[best],
        "epochs_logged": len(curve.values),
    }


def digitise(png: Path, *, x_pixels: tuple[float, float], x_values: tuple[float, float],
             y_pixels: tuple[float, float], y_values: tuple[float, float],
             epochs: int) -> list[tuple[int, float]]:
    """(epoch, value) for epochs 0..epochs-1 read from the harness's plot (see the docstring)."""
    import numpy as np
    from PIL import Image

    image = np.asarray(Image.open(png).convert("RGB")).astype(int)
    line = np.all(np.abs(image - np.array(LINE_RGB)) < 40, axis=2)
    line[: LEGEND_PIXELS[0], : LEGEND_PIXELS[1]] = False
    x_scale = (x_pixels[1] - x_pixels[0]) / (x_values[1] - x_values[0])
    y_scale = (y_values[1] - y_values[0]) / (y_pixels[1] - y_pixels[0])
    out = []
    for epoch in range(epochs):
        column = round(x_pixels[0] + (epoch - x_values[0]) * x_scale)
        rows = np.nonzero(line[:, column])[0]
        if len(rows) == 0:
            raise SystemExit(f"error: no line pixel in column {column} (epoch {epoch}) of {png}")
        out.append((epoch, y_values[0] + (float(rows.mean()) - y_pixels[0]) * y_scale))
    return out


def plot(curves: Sequence[Curve], path: Path, *, target: float, budget: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for curve in curves:
        ax.plot(curve.epochs, curve.values, linewidth=1.6, label=curve.name)
    ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target}")
    if budget is not None:
        ax.axvline(budget, color="grey", linestyle=":", linewidth=1, label=f"epoch {budget:g}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("valid NDCG@20")
    ax.set_title("Beauty: validation NDCG@20 per epoch")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


def _pair(text: str) -> tuple[float, float]:
    first, _, second = text.partition(":")
    return float(first), float(second)


def _named(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, Path(path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=_named, action="append", default=[], metavar="NAME=RUN")
    parser.add_argument("--curve", type=_named, action="append", default=[], metavar="NAME=CSV")
    parser.add_argument("--target", type=float, default=0.0632)
    parser.add_argument("--half-of", type=float, default=None, metavar="E")
    parser.add_argument("--out", type=Path, default=None, help="the figure (PNG)")
    parser.add_argument("--digitise", type=Path, default=None, metavar="PNG")
    parser.add_argument("--x-pixels", type=_pair)
    parser.add_argument("--x-values", type=_pair)
    parser.add_argument("--y-pixels", type=_pair)
    parser.add_argument("--y-values", type=_pair)
    parser.add_argument("--epochs", type=int, default=300, help="with --digitise")
    args = parser.parse_args(argv)
    if args.digitise is not None:
        if None in (args.x_pixels, args.x_values, args.y_pixels, args.y_values):
            parser.error("--digitise needs --x-pixels, --x-values, --y-pixels and --y-values")
        points = digitise(args.digitise, x_pixels=args.x_pixels, x_values=args.x_values,
                          y_pixels=args.y_pixels, y_values=args.y_values, epochs=args.epochs)
        print("epoch,valid_ndcg20")
        for epoch, value in points:
            print(f"{epoch},{value:.5f}")
        return 0
    curves = [csv_curve(n, p) for n, p in args.curve] + [run_curve(n, p) for n, p in args.run]
    if not curves:
        parser.error("give at least one --run or --curve")
    for curve in curves:
        if any(math.isnan(v) for v in curve.values):
            parser.error(f"{curve.name}: a value is not a number")
        print(json.dumps(report(curve, args.target)))
    if args.out is not None:
        plot(curves, args.out, target=args.target,
             budget=None if args.half_of is None else args.half_of / 2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
