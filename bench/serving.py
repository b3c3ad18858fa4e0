"""Batch inference and export on Beauty with the published weights: users/s, the exported
top-20 against evaluate.py's metrics, each exported graph against the PyTorch model.

    python -m bench.serving --data data/beauty --reference ../shared/reference/ELCRec-Beauty-1.pt \
        [--work /tmp/serving-bench] [--ranks 1]

Makes a run folder from the published state_dict (configs/beauty.yaml, the model file holding
its resolved config as training writes it), runs ``launcher/infer.py --split test --k 20`` on
every Beauty user (``--ranks`` processes under the deepspeed launcher, 1: a plain process),
recomputes HR@20 and NDCG@20 from the written top-20 lists alone (summed in evaluation's batches)
and runs ``launcher/evaluate.py --import-reference`` for the same numbers. Prints one JSON line:
users, seconds of scoring (after start-up, the slowest rank) and users/s, the wall time of the
whole command, both metric pairs and whether they are equal, the CPU model, thread count and
load average before and after; then exports the run (``python -m launcher.export``) and checks
each graph on ``--export-users`` Beauty test users (``check_exports``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.train_speed import cpu_model
from elcrec_dist.checkpoint import save_model
from elcrec_dist.config import load_config
from elcrec_dist.data import eval_batch
from elcrec_dist.evaluation import metric_sums, top_k_items, user_vectors
from elcrec_dist.export import Export
from elcrec_dist.inference import read_recommendations
from elcrec_dist.model import ELCRec
from elcrec_dist.prepared import load_sequences
from elcrec_dist.reference import load_reference

REPO = Path(__file__).resolve().parents[1]


def last_json(cmd: list[str]) -> dict:
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"})
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def check_exports(work: Path, data: str, sequences: list, *, users: int) -> dict[str, dict]:
    """``python -m launcher.export`` of the run, then each graph against the PyTorch model on the
    first ``users`` Beauty test users: the encoder's largest vector difference, the scorer's
    largest score difference and share of identical top-20 lists (fed the graph's own vectors)."""
    last_json([sys.executable, "-m", "launcher.export", str(work / "run"), "--output",
               str(work / "export"), "--data", data])
    exported = Export.open(str(work / "export"))
    model = exported.model()
    batch = eval_batch(sequences[:users], "test", model.config.max_len)
    with torch.no_grad():
        want = user_vectors(model, batch.inputs)
        top = top_k_items(want, model.item_embeddings.weight, batch.history, k=20)
    out = {}
    for kind in ("onnx", "pt2"):
        (vectors,) = exported.runner(f"user_encoder.{kind}")(batch.inputs.numpy())
        items, scores = exported.runner(f"topk_scorer.{kind}")(vectors, batch.history.numpy())
        out[kind] = {
            "vector_max_abs_diff": float(np.abs(vectors - want.numpy()).max()),
            "score_max_abs_diff": float(np.abs(scores - top.scores.numpy()).max()),
            "identical_top20": float(np.mean(np.all(items == top.items.numpy(), axis=1))),
        }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="the prepared Beauty dataset")
    parser.add_argument("--reference", required=True, help="the published Beauty state_dict")
    parser.add_argument("--work", default="/tmp/serving-bench", help="scratch folder (emptied)")
    parser.add_argument("--ranks", type=int, default=1)
    parser.add_argument("--export-users", type=int, default=4096,
                        help="Beauty test users each exported graph is checked on")
    args = parser.parse_args()

    work = Path(args.work)
    subprocess.run(["rm", "-rf", str(work)], check=True)
    config = load_config("configs/beauty.yaml", [f"data.path={args.data}"])
    info, user_ids, sequences = load_sequences(args.data)
    model = ELCRec(config.model, num_items=info.num_items)
    load_reference(args.reference, model)
    save_model(work / "run" / "best_model.pt", state=model.state_dict(), config=config.to_dict(),
               meta={"source": f"reference:{args.reference}"})

    load_before = os.getloadavg()[0]
    infer = ["launcher/infer.py", str(work / "run"), "--output", str(work / "recs"),
             "--split", "test", "--k", "20"]
    cmd = ([sys.executable, *infer] if args.ranks == 1 else
           ["deepspeed", "--num_gpus", str(args.ranks), *infer])
    started = time.perf_counter()
    result = last_json(cmd)
    wall = time.perf_counter() - started

    answers = {int(u): int(s[-1]) for u, s in zip(user_ids, sequences, strict=True)}
    ranks = []
    for row in read_recommendations(str(work / "recs")).to_pylist():
        answer = answers[row["user"]]
        if answer in row["items"]:
            score = row["scores"][row["items"].index(answer)]
            ranks.append(sum(1 for i, s in zip(row["items"], row["scores"], strict=True)
                             if i != answer and s >= score))
        else:
            ranks.append(20)
    totals = {"HR@20": 0.0, "NDCG@20": 0.0}
    rank_tensor = torch.tensor(ranks)
    for start in range(0, len(ranks), config.eval.batch_size):
        sums = metric_sums(rank_tensor[start : start + config.eval.batch_size], [20])
        for name in totals:
            totals[name] += sums[name]
    from_top20 = {name: value / len(ranks) for name, value in totals.items()}
    evaluated = last_json([sys.executable, "launcher/evaluate.py",
                           "--config", "configs/beauty.yaml",
                           "--data", args.data, "--import-reference", args.reference])
    exports = check_exports(work, args.data, sequences, users=args.export_users)
    print(json.dumps({
        "users": result["users"], "ranks": args.ranks, "scoring_s": round(result["seconds"], 2),
        "users_per_s": round(result["users_per_s"], 1), "command_wall_s": round(wall, 2),
        "from_top20": from_top20,
        "evaluate_py": {name: evaluated[name] for name in from_top20},
        "equal": all(from_top20[name] == evaluated[name] for name in from_top20),
        "cpu": cpu_model(), "threads": torch.get_num_threads(),
        "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)],
        "exports": exports,
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
