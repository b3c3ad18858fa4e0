"""Approximate top-K (FAISS HNSW) against the exact top-K on Beauty with the published weights.

    python -m bench.ann --data data/beauty --reference ../shared/reference/ELCRec-Beauty-1.pt \
        [--k 20] [--ef 16 32 64 128 256]

Every Beauty user's test input through the model, the exact top-K by the tiled scorer
(``evaluation.top_k_items``, history excluded) and the approximate one from an HNSW index of
the item table (``elcrec_dist.ann``, M=32, efConstruction=200) at each efSearch. Prints one JSON
line: build seconds, and per efSearch the recall@K against the exact lists and users/s of the
search, beside the exact scorer's users/s; the CPU model, threads and load average.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from bench.train_speed import cpu_model
from elcrec_dist.ann import build_index, recall_at_k, search
from elcrec_dist.config import load_config
from elcrec_dist.data import eval_batch
from elcrec_dist.evaluation import top_k_items, user_vectors
from elcrec_dist.model import ELCRec
from elcrec_dist.prepared import load_sequences
from elcrec_dist.reference import load_reference


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--reference", required=True)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--ef", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    config = load_config("configs/beauty.yaml")
    info, _, sequences = load_sequences(args.data)
    model = ELCRec(config.model, num_items=info.num_items)
    load_reference(args.reference, model)
    model.eval()
    batch = eval_batch(sequences, "test", config.model.max_len)
    table = model.item_embeddings.weight.detach()
    with torch.no_grad():
        users = user_vectors(model, batch.inputs)
        started = time.perf_counter()
        exact = top_k_items(users, table, batch.history, k=args.k).items.numpy()
        exact_s = time.perf_counter() - started
    started = time.perf_counter()
    index = build_index(table[1:].numpy(), kind="hnsw")
    build_s = time.perf_counter() - started
    rows = []
    for ef in args.ef:
        index.hnsw.efSearch = ef
        started = time.perf_counter()
        approx = search(index, users.numpy(), batch.history.numpy(), k=args.k)
        seconds = time.perf_counter() - started
        rows.append({"ef_search": ef, f"recall@{args.k}": round(recall_at_k(approx, exact), 4),
                     "users_per_s": round(len(approx) / seconds, 1)})
    print(
        json.dumps(
            {
                "users": len(sequences),
                "items": info.num_items,
                "build_s": round(build_s, 2),
                "exact_users_per_s": round(len(exact) / exact_s, 1),
                "hnsw": rows,
                "cpu": cpu_model(),
                "threads": torch.get_num_threads(),
                "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)],
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
