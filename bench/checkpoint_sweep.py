"""Valid and test metrics of every kept checkpoint of a run: how much the choice of checkpoint
moves test.

    python -m bench.checkpoint_sweep --config configs/beauty.yaml --data data/beauty \\
        --run runs/plateau-seed2 [--select NDCG@20]

Every complete checkpoint under ``RUN/checkpoints`` (its manifest verified, as ``--resume``
would) is evaluated by full ranking on valid and on test (eval mode, the protocol of
``launcher/evaluate.py``). Prints one row per checkpoint (epoch, step, valid and test metrics,
test/valid), then a summary per metric over the checkpoints: test mean, spread (sample
standard deviation), min and max, the Pearson correlation of the epoch-to-epoch changes of
valid ``--select`` and of the test metric, and the test metric of the checkpoint that ``--select``
on valid picks among them. Keep enough checkpoints for a sweep with
``--set train.keep_checkpoints=N`` while training.

Prints one JSON object as the last stdout line.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from elcrec_dist.checkpoint import CHECKPOINTS, checkpoint_folders, load_model_weights, verify
from elcrec_dist.config import ConfigError, load_config
from elcrec_dist.evaluation import evaluate
from elcrec_dist.model import ELCRec
from elcrec_dist.prepared import load_sequences
from elcrec_dist.rundir import Folder
from launcher.common import config_arguments, print_json_line, run_main


def complete_checkpoints(run_dir: Path) -> list[tuple[Folder, int, int]]:
    """(folder, epoch, global step) of every complete checkpoint, oldest first.

    ``epoch`` is the epoch the checkpoint's data cursor is in; a checkpoint written at the end
    of epoch e has cursor (e + 1, 0) and is reported as epoch e.
    """
    if not (run_dir / CHECKPOINTS).is_dir():
        raise ConfigError(f"{run_dir}: no {CHECKPOINTS}/ folder")
    found = []
    for folder in reversed(checkpoint_folders(run_dir)):
        record = verify(folder)
        if record is None:
            continue
        state = record["state"]
        epoch = state["epoch"] - 1 if state["step_in_epoch"] == 0 else state["epoch"]
        found.append((folder, int(epoch), int(state["global_step"])))
    if not found:
        raise ConfigError(f"{run_dir}: no complete checkpoint under {CHECKPOINTS}/")
    return found


def sweep_summary(
    valid: Sequence[dict[str, float]], test: Sequence[dict[str, float]], *, select: str
) -> dict[str, dict[str, float]]:
    """Per metric over checkpoints: test mean/sd/min/max, correlation of valid[select] changes
    with test changes between consecutive checkpoints, and test at the valid-best checkpoint
    (the first of equal bests, as early stopping keeps it)."""
    if len(valid) != len(test) or not valid:
        raise ValueError("valid and test need one row per checkpoint, at least one")
    selector = np.array([row[select] for row in valid])
    chosen = int(np.argmax(selector))
    out: dict[str, dict[str, float]] = {}
    for name in test[0]:
        values = np.array([row[name] for row in test])
        entry = {
            "test_mean": float(values.mean()),
            "test_sd": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            "test_min": float(values.min()),
            "test_max": float(values.max()),
            "test_at_valid_best": float(values[chosen]),
        }
        if len(values) > 2:
            dv, dt = np.diff(selector), np.diff(values)
            if dv.std() > 0 and dt.std() > 0:
                entry["change_correlation"] = float(np.corrcoef(dv, dt)[0, 1])
        out[name] = entry
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    config_arguments(parser)
    parser.add_argument("--run", required=True, help="run folder whose checkpoints/ are evaluated")
    parser.add_argument(
        "--select", default="NDCG@20", help="valid metric that picks a checkpoint (default NDCG@20)"
    )
    args = parser.parse_args()
    config = load_config(args.config, args.overrides)
    data = args.data or config.data.path
    if not data:
        raise ConfigError("no dataset: pass --data or set data.path")
    checkpoints = complete_checkpoints(Path(args.run))
    info, _, sequences = load_sequences(data)
    sequences = list(sequences)
    names = [f"{m}@{k}" for k in config.eval.ks for m in ("HR", "NDCG")] + ["MRR"]
    if args.select not in names:
        raise ConfigError(f"--select {args.select!r} is not one of {names}")
    rows, valid_rows, test_rows = [], [], []
    header = (
        "epoch   step   "
        + "  ".join(f"v {n:>7s}" for n in names)
        + "  "
        + "  ".join(f"t {n:>7s}" for n in names)
        + "  t/v "
        + args.select
    )
    print(header, flush=True)
    for folder, epoch, step in checkpoints:
        model = ELCRec(config.model, num_items=info.num_items)
        model.load_state_dict(load_model_weights(folder))
        with torch.no_grad():
            valid = evaluate(
                model,
                sequences,
                split="valid",
                ks=config.eval.ks,
                batch_size=config.eval.batch_size,
            )
            test = evaluate(
                model, sequences, split="test", ks=config.eval.ks, batch_size=config.eval.batch_size
            )
        valid_rows.append(valid)
        test_rows.append(test)
        rows.append(
            {"epoch": epoch, "step": step, "checkpoint": folder.name, "valid": valid, "test": test}
        )
        print(
            f"{epoch:5d} {step:7d}  "
            + "  ".join(f"{valid[n]:9.4f}" for n in names)
            + "  "
            + "  ".join(f"{test[n]:9.4f}" for n in names)
            + f"  {test[args.select] / valid[args.select]:.3f}",
            flush=True,
        )
    summary = sweep_summary(valid_rows, test_rows, select=args.select)
    for name, entry in summary.items():
        print(name, " ".join(f"{k}={v:.4f}" for k, v in entry.items()), flush=True)
    print_json_line(
        {"run": args.run, "select": args.select, "checkpoints": rows, "summary": summary}
    )
    return 0


if __name__ == "__main__":
    run_main(main)
