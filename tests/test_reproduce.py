"""The reproduction harness ``bench.reproduce``: parsing the spec's published figures, the report
block and its numbers, one file per block, resuming/skipping runs and failures, and one tiny real
run."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from bench import reproduce as rp

REPO = Path(__file__).resolve().parents[1]


# The structure of shared/docs/elcrec-method.md, with figures of our own (so nothing can pass by
# matching the real ones by accident). Another table comes first; sentences wrap across lines.
FAKE_SPEC = """\
# ELCRec: what the model computes

## Per-dataset settings (from the reference run)

| dataset | layers | k (clusters) | α (trade-off) | fusion |
|---|---|---|---|---|
| Beauty | 1 | 256 | 10 | shift |

## Published numbers (test set; Table 1; a single seed-1 run each)

| dataset | HR@5 | NDCG@5 | HR@20 | NDCG@20 |
|---|---|---|---|---|
| Sports_and_Outdoors | 0.0300 | 0.0200 | 0.0700 | 0.0310 |
| Beauty | 0.0500 | 0.0300 | 0.1000 | 0.0500 |
| Toys_and_Games | 0.0600 | 0.0400 | 0.1200 | 0.0550 |
| Yelp | 0.0250 | 0.0160 | 0.0660 | 0.0270 |

Baseline for context (ICLRec, k-means intents recomputed over the full data every epoch; its
authors' released checkpoints): Beauty 0.0450 / 0.0280 / 0.0950 / 0.0420; Sports 0.0280 / 0.0180 /
0.0640 / 0.0290. SASRec in the paper's table: Beauty 0.0350 / 0.0220 / 0.0880 / 0.0360.

Ablation in the paper (sum of the four metrics): Beauty B 0.2000, B+ICL 0.2100, B+ELCM 0.2200,
ELCRec 0.2300; Sports 0.1300 / 0.1310 / 0.1320 / 0.1330.

Efficiency claim: on Beauty, training took 2922 s.
"""


@pytest.fixture
def fake_shared(tmp_path: Path) -> Path:
    shared = tmp_path / "shared"
    (shared / "docs").mkdir(parents=True)
    (shared / "docs" / "elcrec-method.md").write_text(FAKE_SPEC)
    return shared


# ------------------------------------------------------------------------------------------
# Parsing the spec
# ------------------------------------------------------------------------------------------

def test_parses_the_published_table_baselines_and_ablation_of_the_fake_spec(
    fake_shared: Path,
) -> None:
    figures = rp.parse_spec(fake_shared / "docs" / "elcrec-method.md")
    assert figures.metrics == ("HR@5", "NDCG@5", "HR@20", "NDCG@20")
    assert figures.table["Sports_and_Outdoors"] == {
        "HR@5": 0.03,
        "NDCG@5": 0.02,
        "HR@20": 0.07,
        "NDCG@20": 0.031,
    }
    assert set(figures.table) == {"Sports_and_Outdoors", "Beauty", "Toys_and_Games", "Yelp"}
    assert figures.iclrec == {
        "Beauty": {"HR@5": 0.045, "NDCG@5": 0.028, "HR@20": 0.095, "NDCG@20": 0.042},
        # wrapped over a line break
        "Sports": {"HR@5": 0.028, "NDCG@5": 0.018, "HR@20": 0.064, "NDCG@20": 0.029},
    }
    assert figures.sasrec == {
        "Beauty": {"HR@5": 0.035, "NDCG@5": 0.022, "HR@20": 0.088, "NDCG@20": 0.036}
    }
    assert figures.ablation == {
        "Beauty": {"B": 0.2, "B+ICL": 0.21, "B+ELCM": 0.22, "ELCRec": 0.23},
        # bare values take the names
        "Sports": {"B": 0.13, "B+ICL": 0.131, "B+ELCM": 0.132, "ELCRec": 0.133},
    }
    # Dataset keys find rows named by the full name ("Sports_and_Outdoors") or the short one
    # ("Sports").
    sports = rp.paper_metrics(figures, "sports")
    assert (
        sports["elcrec"]["NDCG@20"] == 0.031
        and sports["iclrec"]["HR@5"] == 0.028
        and "sasrec" not in sports
    )
    assert set(rp.paper_metrics(figures, "toys")) == {"elcrec"}
    assert rp.paper_ablation(figures, "sports") == {
        "sasrec": 0.13,
        "b_icl": 0.131,
        "b_elcm": 0.132,
        "elcrec": 0.133,
    }
    assert rp.paper_ablation(figures, "yelp") == {}


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        (
            ("Ablation in the paper (sum of the four metrics)", "Ablation study"),
            r"no sentence starting 'Ablation in the paper",
        ),
        (
            ("SASRec in the paper's table", "SASRec elsewhere"),
            r"no sentence starting \"SASRec in the paper's table\"",
        ),
        (
            (
                "| dataset | HR@5 | NDCG@5 | HR@20 | NDCG@20 |",
                "| dataset | HR@5 | NDCG@5 | HR@10 | NDCG@20 |",
            ),
            r"no column HR@20",
        ),
        (("## Published numbers", "## Numbers"), r"no heading starting '## Published numbers'"),
        (
            ("Sports 0.0280 / 0.0180 /", "Sports 0.0280 / 0.0180 /,"),
            r"ICLRec.*Sports: expected 4 numbers",
        ),
        (("| Yelp | 0.0250 |", "| Yelp | n/a |"), r"published table row"),
    ],
)
def test_a_spec_that_does_not_parse_is_an_error_naming_the_file_and_what_is_missing(
    tmp_path: Path, broken: tuple[str, str], message: str
) -> None:
    assert broken[0] in FAKE_SPEC
    spec = tmp_path / "spec.md"
    spec.write_text(FAKE_SPEC.replace(*broken))
    with pytest.raises(rp.HarnessError, match=message) as info:
        rp.parse_spec(spec)
    assert str(spec) in str(info.value)
    with pytest.raises(rp.HarnessError, match=r"spec not found: .*absent\.md"):
        rp.parse_spec(tmp_path / "absent.md")


def test_the_real_spec_parses_to_the_figures_read_by_hand(shared_dir: Path) -> None:
    figures = rp.parse_spec(shared_dir / "docs" / "elcrec-method.md")
    metrics = ("HR@5", "NDCG@5", "HR@20", "NDCG@20")

    def row(*values: float) -> dict[str, float]:
        return dict(zip(metrics, values, strict=True))

    assert figures.table == {
        "Sports_and_Outdoors": row(0.0286, 0.0185, 0.0648, 0.0286),
        "Beauty": row(0.0529, 0.0355, 0.1079, 0.0509),
        "Toys_and_Games": row(0.0585, 0.0403, 0.1138, 0.0560),
        "Yelp": row(0.0236, 0.0150, 0.0653, 0.0266),
    }
    assert figures.iclrec == {
        "Beauty": row(0.0500, 0.0326, 0.1058, 0.0483),
        "Sports": row(0.0290, 0.0191, 0.0646, 0.0291),
    }
    assert figures.sasrec == {"Beauty": row(0.0374, 0.0241, 0.0901, 0.0387)}
    assert rp.paper_ablation(figures, "beauty") == {
        "sasrec": 0.2390,
        "b_icl": 0.2398,
        "b_elcm": 0.2432,
        "elcrec": 0.2473,
    }
    assert rp.paper_ablation(figures, "sports") == {
        "sasrec": 0.1343,
        "b_icl": 0.1379,
        "b_elcm": 0.1396,
        "elcrec": 0.1405,
    }


# ------------------------------------------------------------------------------------------
# Numbers and names
# ------------------------------------------------------------------------------------------

def test_mean_sd_and_relative_difference_against_hand_computed_numbers() -> None:
    assert rp.format_mean_sd([0.0529]) == "0.0529"
    # mean 0.055; sample sd = sqrt(2 * 0.005^2 / 1) = 0.00707
    assert rp.format_mean_sd([0.05, 0.06]) == "0.0550 ± 0.0071"
    assert rp.format_mean_sd([]) == "—"
    # -0.0008 / 0.0529
    assert math.isclose(rp.relative_difference(0.0521, 0.0529), -1.5122873, rel_tol=1e-6)
    assert rp.format_percent(rp.relative_difference(0.0521, 0.0529)) == "-1.5%"
    assert rp.format_percent(rp.relative_difference(0.0520, 0.0500)) == "+4.0%"
    assert (rp.format_duration(4.44), rp.format_duration(725), rp.format_duration(7380)) == (
        "4.4 s",
        "12 min 5 s",
        "2 h 3 min",
    )
    assert rp.eval_epochs(evaluations=3, eval_every=2, max_epochs=5) == (1, 3, 4)
    assert rp.eval_epochs(evaluations=2, eval_every=1, max_epochs=300) == (0, 1)


def _invocation(**changes: Any) -> Any:
    fields: dict[str, Any] = dict(
        dataset="beauty",
        variants=("sasrec", "elcrec"),
        seeds=(2, 1),
        epochs=None,
        overrides=(),
        data=None,
        dataset_config=None,
    )
    fields.update(changes)
    return rp.Invocation(**fields)


def test_key_and_run_folders_separate_budgets_and_overrides() -> None:
    plain = _invocation()
    assert plain.key() == "beauty:elcrec+sasrec:seeds=1,2:full"
    assert plain.run_dir(Path("runs/r"), "sasrec", 2) == Path("runs/r/beauty/sasrec-seed2")
    budget = _invocation(epochs=5)
    assert budget.key() == "beauty:elcrec+sasrec:seeds=1,2:e5"
    assert budget.run_dir(Path("r"), "elcrec", 1) == Path("r/beauty/elcrec-seed1-e5")
    changed = _invocation(epochs=5, overrides=("train.lr=0.002",))
    again = _invocation(epochs=5, overrides=("train.lr=0.002",), variants=("elcrec", "sasrec"))
    suffix = changed.variation()
    assert suffix is not None and len(suffix) == 8 and suffix == again.variation()  # stable
    assert changed.key() == again.key() == f"beauty:elcrec+sasrec:seeds=1,2:e5:set-{suffix}"
    assert changed.run_dir(Path("r"), "elcrec", 1) == Path(f"r/beauty/elcrec-seed1-e5-{suffix}")
    # another dataset never mixes
    assert _invocation(data="/tmp/other").variation() not in (None, suffix)
    assert changed.slug() == f"reproduce-beauty-elcrec-sasrec-seeds-1-2-e5-set-{suffix}"
    assert changed.name() == f"beauty-elcrec-sasrec-seeds-1-2-e5-set-{suffix}"
    # one file per key, beside the others in the results folder
    assert rp.block_path(Path("docs/results"), plain) == (
        Path("docs/results/beauty-elcrec-sasrec-seeds-1-2-full.md"))
    assert rp.block_path(Path("d"), changed) != rp.block_path(Path("d"), budget)


def test_the_regenerating_command_leaves_out_defaults_and_no_run() -> None:
    parser = rp.build_parser()
    args = parser.parse_args(["--dataset", "beauty", "--variants", "sasrec", "elcrec", "--no-run"])
    assert rp.regenerate_command(args) == (
        "python -m bench.reproduce --dataset beauty --variants sasrec elcrec --seeds 1"
    )
    args = parser.parse_args(["--dataset", "toys", "--seeds", "1", "2", "--epochs", "20",
                              "--parallel", "2", "--results-dir", "docs/other",
                              "--set", "train.lr=0.002 ",
                              "--variants", "elcrec"])
    assert rp.regenerate_command(args) == (
        "python -m bench.reproduce --dataset toys --variants elcrec --seeds 1 2 --epochs 20 "
        "--parallel 2 --results-dir docs/other --set 'train.lr=0.002 '"
    )
    with pytest.raises(SystemExit):  # the old --results FILE is no abbreviation of --results-dir
        parser.parse_args(["--dataset", "toys", "--results", "docs/RESULTS.md"])


# ------------------------------------------------------------------------------------------
# The report block
# ------------------------------------------------------------------------------------------

def test_a_block_is_appended_then_replaced_in_place_keeping_the_rest() -> None:
    before = "# Results\n\nhand-written intro\n"
    one = rp.insert_block(
        before, "k1", "<!-- reproduce:BEGIN k1 -->\nold\n<!-- reproduce:END k1 -->"
    )
    assert one == before + "\n<!-- reproduce:BEGIN k1 -->\nold\n<!-- reproduce:END k1 -->\n"
    two = rp.insert_block(
        one + "\n## Later, by hand\n\ntext\n",
        "k2",
        "<!-- reproduce:BEGIN k2 -->\nb\n<!-- reproduce:END k2 -->",
    )
    replaced = rp.insert_block(
        two, "k1", "<!-- reproduce:BEGIN k1 -->\nnew\nlines\n<!-- reproduce:END k1 -->"
    )
    assert replaced == two.replace("\nold\n", "\nnew\nlines\n")
    assert rp.insert_block("", "k", "B") == "B\n"
    assert rp.insert_block("no newline", "k", "B") == "no newline\n\nB\n"
    with pytest.raises(rp.HarnessError, match="markers of 'k1'"):
        rp.insert_block(replaced.replace("<!-- reproduce:END k1 -->\n", ""), "k1", "x")


def _finish(run_dir: Path, test: Mapping[str, float], *, history: list[float], best_epoch: int,
            train_seconds: float = 12.0, harness: list[dict[str, object]] | None = None) -> None:
    """What the trainer (and, with ``harness``, the harness) leaves in a finished run folder."""
    run_dir.mkdir(parents=True, exist_ok=True)
    results = {"test": {**test, "HR@10": 0.0, "NDCG@10": 0.0, "MRR": 0.0}, "best_epoch": best_epoch,
               "best_valid": max(history), "epochs_run": len(history),
               "global_steps": 10 * len(history),
               "valid_history": history, "train_seconds": train_seconds, "world_size": 1,
               "finished_at": "2026-11-28T12:00:00Z"}
    (run_dir / "results.json").write_text(json.dumps(results))
    (run_dir / "config.yaml").write_text("train:\n  epochs: 300\n  eval_every: 1\n")
    if harness is not None:
        (run_dir / "harness.json").write_text(json.dumps(harness))


def _metrics(hr5: float, n5: float, hr20: float, n20: float) -> dict[str, float]:
    return {"HR@5": hr5, "NDCG@5": n5, "HR@20": hr20, "NDCG@20": n20}


def test_an_unfinished_run_reports_the_validation_passes_it_has_logged(
    tmp_path: Path, fake_shared: Path
) -> None:
    """A run killed from outside (a session's end, an evicted pod) has no results.json and no
    harness record; its block line says how far it got, from metrics.jsonl, by the config's
    evaluation schedule (every 2nd epoch here: passes after epochs 1, 3, 5)."""
    inv = _invocation(variants=("elcrec",), seeds=(1,))
    run_dir = inv.run_dir(tmp_path / "runs", "elcrec", 1)
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("train:\n  epochs: 300\n  eval_every: 2\n")
    rows = [
        {"step": 5, "loss/total": 3.0},
        {"step": 10, "valid/NDCG@20": 0.01, "valid/HR@20": 0.2},
        {"step": 20, "valid/NDCG@20": 0.03},
        {"step": 25, "loss/total": 2.0},
        {"step": 30, "valid/NDCG@20": 0.03},
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = rp.collect_run("elcrec", 1, run_dir)
    assert (
        not run.finished
        and run.curve == ((), ())
        and run.progress == ((1, 3, 5), (0.01, 0.03, 0.03))
    )
    ctx = rp.ReportContext(
        inv, "to early stopping", "python bench/reproduce.py", "data/beauty", "configs/beauty.yaml"
    )
    lines = rp.render_block(
        ctx, [run], rp.parse_spec(fake_shared / "docs" / "elcrec-method.md"), None
    ).splitlines()
    assert (
        f"- `elcrec` seed 1: `{run_dir}` — not finished "
        "(running, or stopped from outside the harness); "
        "3 validation passes so far, the last after epoch 5, "
        "best valid NDCG@20 0.0300 after epoch 3"
    ) in lines
    # no test metrics yet
    assert "| `elcrec` | 0/1 | — | — | — | — | — | — | — | — | — | — | — |" in lines
    assert not rp.plot_curves([run], tmp_path / "x.png", title="t")  # plots hold finished runs only

    rp.append_harness_record(
        run_dir,
        {"command": ["x"], "exit_code": 75, "started_at": "t", "wall_s": 1.0, "peak_rss_mib": 1.0},
    )
    lines = rp.render_block(
        ctx,
        [rp.collect_run("elcrec", 1, run_dir)],
        rp.parse_spec(fake_shared / "docs" / "elcrec-method.md"),
        None,
    ).splitlines()
    assert any(
        "last exit code 75" in line and line.endswith("best valid NDCG@20 0.0300 after epoch 3")
        for line in lines
    )

    (run_dir / "metrics.jsonl").write_text(json.dumps(rows[0]) + "\n{not json\n")
    with pytest.raises(rp.HarnessError, match=r"metrics\.jsonl:2: not JSON"):
        rp.collect_run("elcrec", 1, run_dir)
    (run_dir / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": i, "valid/NDCG@20": 0.1}) + "\n" for i in range(151))
    )
    with pytest.raises(
        rp.HarnessError, match="151 validation passes, but the config schedules 150"
    ):
        rp.collect_run("elcrec", 1, run_dir)


def test_the_block_holds_means_sds_and_the_comparison_with_the_paper(
    tmp_path: Path, fake_shared: Path
) -> None:
    inv = _invocation(variants=("elcrec", "sasrec", "b_icl"), seeds=(1, 2))
    root = tmp_path / "runs"
    record = {"command": ["x"], "exit_code": 0, "started_at": "t"}
    _finish(
        inv.run_dir(root, "elcrec", 1),
        _metrics(0.0510, 0.0310, 0.1010, 0.0490),
        history=[0.01, 0.03, 0.02],
        best_epoch=1,
        harness=[
            {**record, "wall_s": 10.0, "peak_rss_mib": 400.0},
            {**record, "wall_s": 20.0, "peak_rss_mib": 512.4},
        ],
    )
    _finish(
        inv.run_dir(root, "elcrec", 2),
        _metrics(0.0530, 0.0330, 0.1030, 0.0510),
        history=[0.02, 0.04],
        best_epoch=1,
        harness=[{**record, "wall_s": 50.0, "peak_rss_mib": 300.0}],
    )
    _finish(
        inv.run_dir(root, "sasrec", 1),
        _metrics(0.0350, 0.0220, 0.0880, 0.0360),
        history=[0.02],
        best_epoch=0,
    )
    inv.run_dir(root, "b_icl", 1).mkdir(parents=True)
    rp.append_harness_record(
        inv.run_dir(root, "b_icl", 1),
        {**record, "exit_code": 75, "wall_s": 1.0, "peak_rss_mib": 1.0},
    )
    runs = [rp.collect_run(v, s, inv.run_dir(root, v, s)) for v in inv.variants for s in inv.seeds]
    assert runs[0].curve == ((0, 1, 2), (0.01, 0.03, 0.02))
    ctx = rp.ReportContext(
        inv,
        "to early stopping (at most 300 epochs, patience 40)",
        "python bench/reproduce.py --dataset beauty",
        "data/beauty",
        "configs/beauty.yaml",
    )
    block = rp.render_block(
        ctx, runs, rp.parse_spec(fake_shared / "docs" / "elcrec-method.md"), "figures/x.png"
    )
    lines = block.splitlines()
    assert (
        lines[0] == f"<!-- reproduce:BEGIN {inv.key()} -->"
        and lines[-1] == f"<!-- reproduce:END {inv.key()} -->"
    )
    assert "# Reproduction: Beauty, to early stopping (at most 300 epochs, patience 40)" in lines
    assert "## Against the paper" in lines and "## Runs" in lines
    assert "python bench/reproduce.py --dataset beauty" in lines
    # Main table: means ± sample sd over the two seeds; the sums 0.2320 and 0.2400; wall (10+20, 50)
    # -> 40 s.
    assert (
        "| `elcrec` | 2/2 | 0.0520 ± 0.0014 | 0.0320 ± 0.0014 | 0.1020 ± 0.0014 | 0.0500 ± 0.0014 "
        "| 0.2360 ± 0.0057 | 1, 1 | 3, 2 | 40.0 s | 512 | — | — |"
    ) in lines
    # One seed of two finished, its wall time from the trainer (marked *).
    assert (
        "| `sasrec` | 1/2 | 0.0350 | 0.0220 | 0.0880 | 0.0360 | 0.1810 | 0 | 1 | 12.0 s* "
        "| — | — | — |"
        in lines
    )
    assert "| `b_icl` | 0/2 | — | — | — | — | — | — | — | — | — | — | — |" in lines
    # Against the paper: 0.0520 vs 0.0500 is +4.0%; 0.0350 vs the SASRec row's 0.0350 is +0.0%.
    assert ("| `elcrec` | ELCRec, Table 1 | 0.0520 vs 0.0500 (+4.0%) | 0.0320 vs 0.0300 (+6.7%) "
            "| 0.1020 vs 0.1000 (+2.0%) | 0.0500 vs 0.0500 (+0.0%) |") in lines
    assert (
        "| `sasrec` | SASRec, Table 1 | 0.0350 vs 0.0350 (+0.0%) | 0.0220 vs 0.0220 (+0.0%) "
        "| 0.0880 vs 0.0880 (+0.0%) | 0.0360 vs 0.0360 (+0.0%) |"
        in lines
    )
    assert "| `b_icl` | — | — | — | — | — |" in lines
    # Ablation sums: 0.2360 vs 0.2300 is +2.6%; 0.1810 vs 0.2000 is -9.5%.
    assert "| `elcrec` | ELCRec | 0.2360 ± 0.0057 | 0.2300 | +2.6% |" in lines
    assert "| `sasrec` | B | 0.1810 | 0.2000 | -9.5% |" in lines
    assert "| `b_icl` | B+ICL | — | 0.2100 | — |" in lines
    assert (
        f"- `elcrec` seed 2: `{inv.run_dir(root, 'elcrec', 2)}` — finished 2026-11-28T12:00:00Z"
        in lines
    )
    assert f"- `sasrec` seed 2: `{inv.run_dir(root, 'sasrec', 2)}` — not run yet" in lines
    assert any(
        line.startswith("- `b_icl` seed 1:") and "last exit code 75" in line and "train.log" in line
        for line in lines
    )
    assert "![validation NDCG@20 per epoch, Beauty](figures/x.png)" in lines
    assert rp.plot_curves(runs, tmp_path / "figures" / "x.png", title="t")
    assert (tmp_path / "figures" / "x.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------
# The harness without training: skipping, failures, bad invocations
# ------------------------------------------------------------------------------------------

def _args(tmp_path: Path, shared: Path, *extra: str) -> list[str]:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    (data / "manifest.json").write_text("{}")  # the runner below never reads it
    return ["--dataset", "beauty", "--dataset-config", str(REPO / "configs" / "demo.yaml"),
            "--data", str(data),
            "--runs-root", str(tmp_path / "runs"), "--results-dir", str(tmp_path / "results"),
            "--shared", str(shared), *extra]


def test_finished_runs_are_skipped_and_a_failed_run_is_reported_after_the_others(
    tmp_path: Path,
    fake_shared: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    calls: list[tuple[str, int]] = []
    folders: dict[str, Path] = {}
    failing = {"elcrec"}

    def runner(spec: Any, env: Mapping[str, str]) -> Any:
        calls.append((spec.variant, spec.seed))
        folders[spec.variant] = spec.run_dir
        spec.run_dir.mkdir(parents=True, exist_ok=True)
        assert (
            spec.command[-2:] == ("--resume", "auto") and f"train.seed={spec.seed}" in spec.command
        )
        assert "train.epochs=2" in spec.command and "--run-dir" in spec.command
        code = 3 if spec.variant in failing else 0
        if code == 0:
            _finish(
                spec.run_dir, _metrics(0.05, 0.03, 0.1, 0.05), history=[0.01, 0.02], best_epoch=1
            )
        rp.append_harness_record(
            spec.run_dir,
            {
                "command": list(spec.command),
                "wall_s": 1.5,
                "peak_rss_mib": 100.0,
                "exit_code": code,
                "started_at": "t",
            },
        )
        return rp.Outcome(spec, code, 1.5, 100.0)

    monkeypatch.setattr(rp, "execute_run", runner)
    monkeypatch.setattr(rp, "running_on_cpu", lambda: True)
    inv = _invocation(variants=("sasrec", "elcrec", "b_icl"), seeds=(1,), epochs=2,
                      data=str(tmp_path / "data"),
                      dataset_config=str(REPO / "configs" / "demo.yaml"))
    block_file = rp.block_path(tmp_path / "results", inv)
    block_file.parent.mkdir()
    block_file.write_text("# Results\n\nkept\n")
    argv = _args(tmp_path, fake_shared, "--variants", "sasrec", "elcrec", "b_icl",
                 "--seeds", "1", "--epochs", "2")
    assert rp.main(argv) == 1
    assert calls == [("sasrec", 1), ("elcrec", 1), ("b_icl", 1)]  # the failure did not stop b_icl
    err = capsys.readouterr().err
    assert (
        "elcrec seed 1 failed with exit code 3" in err
        and f"log {folders['elcrec'] / 'train.log'}" in err
    )
    assert (
        folders["elcrec"].parent == tmp_path / "runs" / "beauty"
        and folders["elcrec"].name.startswith("elcrec-seed1-e2-")
    )
    assert [p.name for p in (tmp_path / "results").glob("*.md")] == [block_file.name]
    text = block_file.read_text()
    assert text.startswith(
        "# Results\n\nkept\n\n<!-- reproduce:BEGIN beauty:b_icl+elcrec+sasrec:seeds=1:e2:set-"
    )
    assert "# Reproduction: Beauty, equal budget of 2 epochs" in text
    assert (
        "| `sasrec` | 1/1 | 0.0500 |" in text
        and "| `elcrec` | 0/1 |" in text
        and "last exit code 3" in text
    )

    calls.clear()
    failing.clear()
    assert rp.main(argv) == 0
    assert calls == [("elcrec", 1)]  # only the unfinished run ran again
    out = capsys.readouterr().out
    assert "skip sasrec seed 1: finished" in out and "skip b_icl seed 1: finished" in out
    again = block_file.read_text()
    assert again.count("<!-- reproduce:BEGIN") == 1 and "| `elcrec` | 1/1 |" in again

    calls.clear()
    assert rp.main([*argv, "--no-run"]) == 0 and calls == []
    assert block_file.read_text() == again

    # Another budget is another key: a file of its own, the first one untouched.
    assert argv[-2:] == ["--epochs", "2"]
    assert rp.main([*argv[:-2], "--epochs", "3", "--no-run"]) == 0 and calls == []
    other = rp.block_path(tmp_path / "results", dataclasses.replace(inv, epochs=3))
    assert block_file.read_text() == again
    assert "<!-- reproduce:BEGIN beauty:b_icl+elcrec+sasrec:seeds=1:e3:" in other.read_text()


def test_an_unknown_variant_is_an_error_before_anything_runs(
    tmp_path: Path,
    fake_shared: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(rp, "execute_run", lambda *a: pytest.fail("nothing may run"))
    assert rp.main(_args(tmp_path, fake_shared, "--variants", "sasrec", "nosuch")) == 2
    err = capsys.readouterr().err
    # the missing file and those that exist
    assert "nosuch.yaml" in err and "sasrec" in err and "elcrec" in err
    assert not (tmp_path / "results").exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("extra", "message"), [
    (["--set", "train.seed=3"], "set by the harness; use --seeds"),
    (["--set", "train.nosuch=3"], "train.nosuch"),
    (["--set", "noequals"], "key=value"),
])
def test_bad_overrides_are_errors_before_anything_runs(
    tmp_path: Path,
    fake_shared: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    monkeypatch.setattr(rp, "execute_run", lambda *a: pytest.fail("nothing may run"))
    assert rp.main(_args(tmp_path, fake_shared, "--variants", "sasrec", *extra)) == 2
    assert message in capsys.readouterr().err


def test_a_results_dir_that_is_a_file_is_an_error_before_anything_runs(
    tmp_path: Path, fake_shared: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The old ``--results docs/RESULTS.md`` habit, spelled as the new option: refused, the file
    untouched, nothing run."""
    monkeypatch.setattr(rp, "execute_run", lambda *a: pytest.fail("nothing may run"))
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n")
    argv = [*_args(tmp_path, fake_shared, "--variants", "sasrec"), "--results-dir", str(results)]
    assert rp.main(argv) == 2
    assert f"--results-dir {results}: a file, not a folder" in capsys.readouterr().err
    assert results.read_text() == "# Results\n" and not (tmp_path / "runs").exists()


def test_a_missing_benchmark_file_is_an_error_naming_it(
    tmp_path: Path,
    fake_shared: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)  # data/beauty does not exist here
    monkeypatch.setattr(rp, "execute_run", lambda *a: pytest.fail("nothing may run"))
    argv = ["--dataset", "beauty", "--variants", "sasrec", "--shared", str(fake_shared),
            "--results-dir", "R"]
    assert rp.main(argv) == 2
    assert (
        f"benchmark file not found: {fake_shared / 'data' / 'Beauty.txt'}"
        in capsys.readouterr().err
    )


def test_an_unprepared_dataset_is_prepared_from_the_benchmark_file_before_the_runs(
    tmp_path: Path, fake_shared: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (fake_shared / "data").mkdir()
    (fake_shared / "data" / "Beauty.txt").write_text(
        "".join(f"{u} {u} {u + 1} {u + 2} {u + 3} {u + 4}\n" for u in range(1, 21))
    )
    monkeypatch.chdir(tmp_path)
    seen: list[bool] = []

    def runner(spec: Any, env: Mapping[str, str]) -> Any:
        seen.append((tmp_path / "data" / "beauty" / "manifest.json").is_file())
        assert spec.command[spec.command.index("--data") + 1] == "data/beauty"
        return rp.Outcome(spec, 2, 0.1, 1.0)

    monkeypatch.setattr(rp, "execute_run", runner)
    monkeypatch.setattr(rp, "running_on_cpu", lambda: True)
    argv = ["--dataset", "beauty", "--variants", "sasrec", "--shared", str(fake_shared),
            "--results-dir", "R"]
    assert rp.main(argv) == 1
    assert seen == [True]
    (block_file,) = (tmp_path / "R").glob("*.md")
    assert "| `sasrec` | 0/1 |" in block_file.read_text()


def test_children_get_a_share_of_the_cores_on_cpu_unless_threads_are_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert rp.child_environment(parallel=2, ranks=2, on_cpu=True)["OMP_NUM_THREADS"] == "4"
    assert rp.child_environment(parallel=32, ranks=1, on_cpu=True)["OMP_NUM_THREADS"] == "1"
    assert "OMP_NUM_THREADS" not in rp.child_environment(parallel=2, ranks=1, on_cpu=False)
    assert rp.child_environment(parallel=2, ranks=1, on_cpu=True)["PATH"] == os.environ["PATH"]
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert rp.child_environment(parallel=2, ranks=1, on_cpu=True)["OMP_NUM_THREADS"] == "3"


# ------------------------------------------------------------------------------------------
# End to end: the real trainer on a tiny synthetic dataset
# ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_harness_trains_collects_skips_and_writes_the_block(
    tmp_path: Path, fake_shared: Path
) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    data = tmp_path / "data"
    subprocess.run([sys.executable, "-m", "data_prep.synthetic", "--output", str(data),
                    "--users", "200", "--items", "80", "--intents", "4", "--max-len", "20",
                    "--seed", "3"], cwd=REPO, env=env, check=True, capture_output=True)
    inv = _invocation(variants=("sasrec", "elcrec"), seeds=(1,), epochs=1, data=str(data),
                      dataset_config="configs/demo.yaml",
                      overrides=("train.batch_size=64", "kmeans.sample_users=200",
                                 "model.num_clusters=4"))
    results_dir = tmp_path / "docs" / "results"
    results_dir.mkdir(parents=True)
    results = rp.block_path(results_dir, inv)
    results.write_text("# Results\n\nhand-written\n")
    cmd = [sys.executable, "-m", "bench.reproduce", "--dataset", "beauty",
           "--dataset-config", "configs/demo.yaml",
           "--data", str(data), "--variants", "sasrec", "elcrec", "--seeds", "1", "--epochs", "1",
           "--parallel", "1",
           "--runs-root", str(tmp_path / "runs"), "--results-dir", str(results_dir),
           "--shared", str(fake_shared),
           "--set", "train.batch_size=64", "--set", "kmeans.sample_users=200",
           "--set", "model.num_clusters=4"]
    first = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    for variant in ("sasrec", "elcrec"):
        run_dir = inv.run_dir(tmp_path / "runs", variant, 1)
        result = json.loads((run_dir / "results.json").read_text())
        assert result["epochs_run"] == 1 and len(result["valid_history"]) == 1
        (record,) = json.loads((run_dir / "harness.json").read_text())
        # torch alone is more
        assert record["exit_code"] == 0 and record["wall_s"] > 0 and record["peak_rss_mib"] > 50
        assert (
            record["command"][-2:] == ["--resume", "auto"] and "train.seed=1" in record["command"]
        )
        assert "run folder:" in (run_dir / "train.log").read_text()
    text = results.read_text()
    assert text.startswith("# Results\n\nhand-written\n\n<!-- reproduce:BEGIN ")
    assert f"<!-- reproduce:END {inv.key()} -->" in text
    assert (
        "--variants sasrec elcrec --seeds 1 --epochs 1 --runs-root" in text
        and "--set train.batch_size=64" in text
    )
    assert "| `sasrec` | 1/1 |" in text and "| `elcrec` | 1/1 |" in text
    figure = results_dir / "figures" / f"{inv.slug()}.png"
    assert figure.read_bytes()[:4] == b"\x89PNG" and f"](figures/{figure.name})" in text

    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr[-2000:]
    assert (
        "skip sasrec seed 1: finished" in second.stdout
        and "skip elcrec seed 1: finished" in second.stdout
    )
    for variant in ("sasrec", "elcrec"):
        assert (
            len(
                json.loads(
                    (inv.run_dir(tmp_path / "runs", variant, 1) / "harness.json").read_text()
                )
            )
            == 1
        )
    assert results.read_text() == text  # same block, replaced in place


def test_wall_time_prefers_the_harness_then_the_time_split_then_train_seconds(
    tmp_path: Path,
) -> None:
    """A run resumed outside the harness reports the trainer's split (it survives resumes), not
    the last process's train_seconds."""
    def status(results: dict[str, Any] | None, harness: list[dict[str, Any]]) -> Any:
        return rp.RunStatus("elcrec", 1, tmp_path, results, harness, ((), ()))

    split = {"clustering_s": 9.5, "train_s": 400.0, "eval_s": 30.25}
    assert status({"train_seconds": 18.0, "time_split": split}, []).wall_s() == (439.75, False)
    assert status({"train_seconds": 18.0}, []).wall_s() == (18.0, False)
    assert status(
        {"train_seconds": 18.0, "time_split": split}, [{"wall_s": 5.0}, {"wall_s": 7.5}]
    ).wall_s() == (12.5, True)
    assert status(None, []).wall_s() is None
