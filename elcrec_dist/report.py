"""The intent report: what the learned intents are, for a person to read and look at.

Every user of a prepared dataset is assigned to an intent by the project's one rule
(``clustering.nearest_centre``), on the embedding training clusters: the L2-normalised
mean-pooled embedding of the user's training input (``embed.pooled_embeddings``) against the
normalised centres (the same assignment as ``diagnostics.intent_recovery``). Per intent:

- users: how many users it holds, and its share;
- concentration: the mean cosine of its users to its centre (1: all on the centre), and the
  share of its users' interactions that fall on its 10 most typical items;
- most typical items (original ids): the items that most set its users apart, ranked by their
  term in the KL divergence of the intent's item distribution from the overall one,
  ``p_intent(i) * log(p_intent(i) / p_all(i))``, over the users' whole sequences;
- dead intents: centres no user is nearest to.

On a dataset with planted intents (``data_prep.synthetic``): the NMI of planted against
assigned intent, beside chance (the same assignment against the planted labels permuted over
users, mean of 5), and the ARI.

Plots (PNG): users per intent; a 2-D projection (PCA of the normalised embeddings of a seeded
sample of users, the centres projected with them) coloured by assigned intent, and by planted
intent where there is one. Memory: per-user intent labels and a bounded sample of embeddings;
item counts per (intent, item) pair that occurs.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from elcrec_dist.clustering import (
    adjusted_rand_index,
    kmeans,
    nearest_centre,
    normalized_mutual_info,
)
from elcrec_dist.embed import pooled_embeddings
from elcrec_dist.idmaps import IdMaps
from elcrec_dist.inference import TrainedModel
from elcrec_dist.outputs import FileRecord, OutputFolder
from elcrec_dist.planted import read_planted
from elcrec_dist.stream import StreamingDataset

FORMAT = "elcrec-intent-report"
TYPICAL_ITEMS = 10
PROJECTION_USERS = 4000


@dataclass
class IntentTotals:
    """Running per-intent sums over the users seen so far."""

    k: int
    num_items: int
    users: np.ndarray = field(init=False)
    cosine_sum: np.ndarray = field(init=False)
    pair_keys: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    pair_counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def __post_init__(self) -> None:
        self.users = np.zeros(self.k, np.int64)
        self.cosine_sum = np.zeros(self.k, np.float64)

    def add(self, intents: np.ndarray, cosines: np.ndarray, sequences: list[np.ndarray]) -> None:
        self.users += np.bincount(intents, minlength=self.k)
        self.cosine_sum += np.bincount(intents, weights=cosines, minlength=self.k)
        lengths = np.array([len(s) for s in sequences])
        keys = (
            np.repeat(intents.astype(np.int64), lengths) * (self.num_items + 1)
            + np.concatenate(sequences)
        )
        keys = np.concatenate([self.pair_keys, keys])
        weights = np.concatenate([self.pair_counts, np.ones(int(lengths.sum()), np.int64)])
        self.pair_keys, inverse = np.unique(keys, return_inverse=True)
        self.pair_counts = np.bincount(inverse, weights=weights).astype(np.int64)

    def item_counts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(intent, item, count) of every pair that occurs."""
        width = self.num_items + 1
        return self.pair_keys // width, self.pair_keys % width, self.pair_counts


@dataclass(frozen=True)
class Assignment:
    """Every user's intent [U] and cosine [U], the per-intent totals, and a sample of
    normalised embeddings [S, D] with the sampled users' intents and planted labels."""

    user_ids: np.ndarray
    intents: np.ndarray
    cosines: np.ndarray
    totals: IntentTotals
    sample: np.ndarray
    sample_intents: np.ndarray
    sample_planted: np.ndarray | None
    planted: np.ndarray | None  # [U] planted intent of every user, where the data has them


@torch.no_grad()
def assign_users(trained: TrainedModel, data: StreamingDataset, *, batch_size: int,
                 sample_users: int = PROJECTION_USERS, seed: int = 0) -> Assignment:
    """Every user's nearest intent, in manifest order, with the totals and a seeded sample."""
    model = trained.model.eval()
    centres = F.normalize(model.cluster_centers.detach().float().cpu(), dim=-1)
    totals = IntentTotals(k=centres.shape[0], num_items=model.num_items)
    keep = min(1.0, sample_users / max(data.num_users, 1))
    rng = np.random.default_rng(seed)
    ids, intents, cosines, sample, masks = [], [], [], [], []
    for chunk in data.eval_sequences(rank=0, world=1, batch_size=batch_size):
        pooled = F.normalize(
            pooled_embeddings(model, chunk.sequences, batch_size=batch_size), dim=-1
        )
        nearest = nearest_centre(pooled, centres)
        cos = (pooled * centres[nearest]).sum(-1).numpy().astype(np.float64)
        got = nearest.numpy()
        totals.add(got, cos, chunk.sequences)
        chosen = rng.random(len(got)) < keep
        sample.append(pooled.numpy()[chosen])
        masks.append(chosen)
        ids.append(chunk.user_ids)
        intents.append(got)
        cosines.append(cos)
    user_ids = np.concatenate(ids)
    planted_labels = read_planted(data.url)
    planted = None if planted_labels is None else np.asarray(planted_labels.for_users(user_ids))
    assigned, mask = np.concatenate(intents), np.concatenate(masks)
    return Assignment(user_ids, assigned, np.concatenate(cosines), totals, np.concatenate(sample),
                      assigned[mask], None if planted is None else planted[mask], planted)


def intent_table(assignment: Assignment, idmaps: IdMaps) -> list[dict[str, Any]]:
    """One entry per intent: users, share, mean cosine, typical items and their concentration."""
    totals = assignment.totals
    intent, item, count = totals.item_counts()
    overall = np.bincount(item, weights=count, minlength=totals.num_items + 1)
    p_all = overall / max(overall.sum(), 1)
    per_intent_total = np.bincount(intent, weights=count, minlength=totals.k)
    users_all = int(totals.users.sum())
    rows = []
    for c in range(totals.k):
        n = int(totals.users[c])
        row: dict[str, Any] = {"intent": c, "users": n, "share": n / max(users_all, 1),
                               "mean_cosine": None, "typical_items": [], "top_items_share": None}
        if n:
            mine = intent == c
            items, counts = item[mine], count[mine].astype(np.float64)
            p = counts / per_intent_total[c]
            score = p * np.log(p / p_all[items])
            top = np.argsort(-score, kind="stable")[:TYPICAL_ITEMS]
            originals = idmaps.items(items[top]).to_pylist()
            row.update(
                mean_cosine=float(totals.cosine_sum[c] / n),
                typical_items=[
                    {"item": o, "count": int(counts[t]), "lift": float(p[t] / p_all[items[t]])}
                    for o, t in zip(originals, top, strict=True)
                ],
                top_items_share=float(counts[top].sum() / per_intent_total[c]),
            )
        rows.append(row)
    return rows


def recovery(assignment: Assignment, *, seed: int = 0) -> dict[str, float] | None:
    """NMI and ARI of planted against assigned intent, and the NMI of chance. Beside them, the
    NMI of a k-means of the sampled embeddings (as many clusters as planted intents) against
    the planted intents: what the encoder separates, whatever the centres did."""
    if assignment.planted is None or assignment.sample_planted is None:
        return None
    planted, assigned = assignment.planted, assignment.intents
    rng = np.random.default_rng(seed)
    chance = [normalized_mutual_info(rng.permutation(planted), assigned) for _ in range(5)]
    groups = len(np.unique(planted))
    clusters = kmeans(torch.from_numpy(assignment.sample), min(groups, len(assignment.sample)),
                      iterations=20, restarts=3, generator=torch.Generator().manual_seed(seed))
    return {"nmi": normalized_mutual_info(planted, assigned), "nmi_chance": float(np.mean(chance)),
            "ari": adjusted_rand_index(planted, assigned), "planted_intents": groups,
            "nmi_embeddings_kmeans": normalized_mutual_info(assignment.sample_planted,
                                                            clusters.assignments)}


# --- plots --------------------------------------------------------------------------------------


def _png(figure: Any) -> bytes:
    sink = io.BytesIO()
    figure.savefig(sink, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(figure)
    return sink.getvalue()


def users_plot(rows: list[dict[str, Any]]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = [r["users"] for r in rows]
    figure, axis = plt.subplots(figsize=(max(6.0, 0.12 * len(rows) + 3), 3.6))
    colours = ["tab:blue" if c else "tab:red" for c in counts]
    axis.bar(range(len(rows)), counts, color=colours, width=0.85)
    axis.set_xlabel("intent")
    axis.set_ylabel("users")
    dead = sum(1 for c in counts if c == 0)
    axis.set_title(f"Users per intent ({len(rows) - dead} used, {dead} dead: red ticks)")
    for i, c in enumerate(counts):
        if c == 0:
            axis.plot(i, 0, marker="|", color="tab:red", markersize=12)
    return _png(figure)


def projection(sample: np.ndarray, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PCA of the sample [S, D] to 2-D; the centres [k, D] projected on the same axes."""
    mean = sample.mean(axis=0)
    _, _, vt = np.linalg.svd(sample - mean, full_matrices=False)
    axes = vt[:2].T  # [D, 2]
    return (sample - mean) @ axes, (centres - mean) @ axes


def projection_plot(assignment: Assignment, centres: np.ndarray) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    users, points = projection(assignment.sample, centres)
    alive = np.flatnonzero(assignment.totals.users > 0)
    panels = [("assigned intent", assignment.sample_intents)]
    if assignment.sample_planted is not None:
        panels.append(("planted intent", assignment.sample_planted))
    figure, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 5.4), squeeze=False)
    cmap = plt.get_cmap("tab20")
    for axis, (title, labels) in zip(axes[0], panels, strict=True):
        _, codes = np.unique(labels, return_inverse=True)
        axis.scatter(users[:, 0], users[:, 1], c=cmap(codes % 20), s=6, alpha=0.6, linewidths=0)
        axis.scatter(points[alive, 0], points[alive, 1], marker="X", s=90, c="black",
                     edgecolors="white", linewidths=0.8)
        for c in alive:
            axis.annotate(str(c), points[c], textcoords="offset points", xytext=(5, 5), fontsize=8)
        axis.set_title(f"Users coloured by {title}; X: used centres")
        axis.set_xlabel("PC 1")
        axis.set_ylabel("PC 2")
    figure.suptitle(f"2-D PCA of {len(users)} users' normalised embeddings")
    return _png(figure)


# --- the report ---------------------------------------------------------------------------------


def markdown(rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    used = [r for r in rows if r["users"]]
    dead = [r["intent"] for r in rows if not r["users"]]
    lines = [
        f"# Intent report: {summary['model']}",
        "",
        f"Dataset `{summary['data']}`: {summary['users']} users, {summary['items']} items; "
        f"{len(rows)} intents, **{len(used)} used, {len(dead)} dead**; effective number of "
        f"intents (exp of the entropy of users per intent) {summary['effective_intents']:.1f}.",
        "",
        "A user's intent is the centre nearest to the normalised mean-pooled embedding of its "
        "training input (highest cosine), as the intent-contrastive loss assigns it.",
        "",
    ]
    if summary.get("recovery"):
        rec = summary["recovery"]
        lines += [
            f"**Planted intents recovered**: NMI {rec['nmi']:.3f} against chance "
            f"{rec['nmi_chance']:.4f} (ARI {rec['ari']:.3f}; {rec['planted_intents']} planted "
            f"intents). A k-means of the users' embeddings into {rec['planted_intents']} "
            f"clusters reaches NMI {rec['nmi_embeddings_kmeans']:.3f}: what the encoder "
            f"separates, whatever the centres do.",
            "",
        ]
    lines += ["![users per intent](users_per_intent.png)", "",
              "![2-D projection of users](projection.png)", "",
              "## Intents by size", "",
              "| intent | users | share | mean cosine | top-10 items' share | most typical items "
              "(original id, lift) |",
              "|---:|---:|---:|---:|---:|---|"]
    for r in sorted(used, key=lambda r: (-r["users"], r["intent"])):
        typical = ", ".join(f"{t['item']} ({t['lift']:.1f}x)" for t in r["typical_items"][:6])
        lines.append(f"| {r['intent']} | {r['users']} | {r['share']:.1%} | {r['mean_cosine']:.3f} "
                     f"| {r['top_items_share']:.1%} | {typical} |")
    lines += ["", f"Dead intents ({len(dead)}): " + (", ".join(map(str, dead)) or "none"), ""]
    return "\n".join(lines)


def report_request(trained: TrainedModel, fingerprint: dict[str, Any]) -> dict[str, Any]:
    return {"model_sha256": trained.sha256, "dataset": fingerprint}


def write_report(trained: TrainedModel, data: StreamingDataset, idmaps: IdMaps, out: OutputFolder,
                 *, batch_size: int) -> dict[str, Any]:
    """Assign every user, then write report.md, intents.json and the plots; manifest last."""
    assignment = assign_users(trained, data, batch_size=batch_size)
    rows = intent_table(assignment, idmaps)
    shares = assignment.totals.users / max(int(assignment.totals.users.sum()), 1)
    nonzero = shares[shares > 0]
    summary = {
        "model": str(trained.path), "data": data.url, "users": len(assignment.intents),
        "items": data.info.num_items, "intents": len(rows),
        "used": int((assignment.totals.users > 0).sum()),
        "dead": [r["intent"] for r in rows if not r["users"]],
        "effective_intents": float(math.exp(-(nonzero * np.log(nonzero)).sum())),
        "recovery": recovery(assignment),
    }
    centres = F.normalize(trained.model.cluster_centers.detach().float().cpu(), dim=-1).numpy()
    out.begin()
    files: list[FileRecord] = [
        out.put_bytes("users_per_intent.png", users_plot(rows)),
        out.put_bytes("projection.png", projection_plot(assignment, centres)),
        out.put_bytes("intents.json", (json.dumps({"summary": summary, "intents": rows}, indent=1)
                                       + "\n").encode()),
        out.put_bytes("report.md", markdown(rows, summary).encode()),
    ]
    out.commit(files, {"summary": summary})
    return summary
