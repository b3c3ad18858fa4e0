"""Reproduce the paper's tables: train every (variant, seed) of one dataset, compare with the spec.

    python -m bench.reproduce --dataset beauty --variants sasrec b_icl b_elcm elcrec iclrec \\
        --seeds 1 [--epochs N] [--parallel K] [--ranks R] [--runs-root runs/reproduce]
        [--results-dir docs/results] [--shared ../shared] [--set key=value ...] [--no-run]
        [--data DIR] [--dataset-config PATH]

What it does, in order:

1. Checks everything that can be checked before any training: every variant has a file
   ``configs/variants/{variant}.yaml``, every layered config (dataset config, variant, ``--set``)
   loads, and the published figures parse out of ``{shared}/docs/elcrec-method.md``.
2. Prepares ``data/{dataset}`` from ``{shared}/data/{file}.txt`` with ``python -m
   data_prep.benchmark`` when that folder has no ``manifest.json`` (``--data`` names an existing
   prepared dataset instead).
3. Runs each (variant, seed) as ``launcher/train.py ... --resume auto`` in its own folder
   ``{runs_root}/{dataset}/{variant}-seed{S}[-e{N}][-{hash}]`` (``-eN`` with ``--epochs N``;
   the hash covers ``--set``, ``--data`` and ``--dataset-config`` when given), up to ``--parallel``
   at once, each run's output in ``RUN/train.log``. A folder with ``results.json`` is finished and
   skipped; any other is continued from its newest checkpoint. Wall time and peak RSS of each
   run (``os.wait4``) are appended to ``RUN/harness.json``. A failed run is reported with its
   exit code and log; the others go on, and the harness exits 1 at the end.
4. Writes one generated block, a file of its own per KEY (KEY names dataset, variants, seeds,
   budget and the override hash): ``{results_dir}/{name}.md``, the block between
   ``<!-- reproduce:BEGIN KEY -->`` and ``<!-- reproduce:END KEY -->``, replaced in place when
   present, appended otherwise; text around the markers is kept as it is. The block holds the
   command that regenerates it, the test metrics per variant (mean and sample sd over seeds), the
   comparison with the paper's Table 1, ICLRec and SASRec rows and ablation sums, where each run
   lives, and a plot of validation NDCG@20 per epoch saved in ``{results_dir}/figures/``.
   ``--no-run`` only collects finished runs and writes the block. ``docs/RESULTS.md`` links each
   block file it reports on (by hand: the harness writes only the block and the plot).

Exit codes: 0 when every run finished, 1 when a run failed, 2 for a bad invocation (unknown
variant, missing raw file, a config that does not load, a spec that does not parse).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from elcrec_dist.config import ConfigError, load_config
from elcrec_dist.errors import EXIT_OK, EXIT_PERMANENT

REPO = Path(__file__).resolve().parents[1]

TRAIN_SCRIPT = REPO / "launcher" / "train.py"
CONFIG_DIR = REPO / "configs"
VARIANT_DIR = CONFIG_DIR / "variants"
# Dataset key -> stem of the benchmark file in {shared}/data and the name the spec's tables use.
DATASET_FILES = {
    "beauty": "Beauty",
    "sports": "Sports_and_Outdoors",
    "toys": "Toys_and_Games",
    "yelp": "Yelp",
}
DEFAULT_VARIANTS = ("sasrec", "b_icl", "b_elcm", "elcrec", "iclrec")
REPORT_METRICS = ("HR@5", "NDCG@5", "HR@20", "NDCG@20")  # the four the paper reports
CURVE_METRIC = "NDCG@20"  # what valid_history holds (eval.select_metric of the paper's settings)
# Which of the spec's published rows stands beside which variant (names only; figures are parsed).
PAPER_ROW_OF_VARIANT = {
    "elcrec": "ELCRec, Table 1",
    "iclrec": "ICLRec baseline",
    "sasrec": "SASRec, Table 1",
}
ABLATION_NAME_OF_VARIANT = {"sasrec": "B", "b_icl": "B+ICL", "b_elcm": "B+ELCM", "elcrec": "ELCRec"}
# Set by the harness itself; a --set of these would silently disagree with the run folder.
RESERVED_OVERRIDES = {
    "train.seed": "--seeds",
    "train.epochs": "--epochs",
    "train.run_dir": "--runs-root",
    "data.path": "--data",
}
DEFAULTS = {"runs_root": "runs/reproduce", "results_dir": "docs/results", "shared": "../shared",
            "parallel": 1, "ranks": 1}
SPEC_RELATIVE = Path("docs") / "elcrec-method.md"
# run i of an invocation gets port 29510 + i (deepspeed's default 29500 left free)
MASTER_PORT_BASE = 29510


class HarnessError(Exception):
    """A bad invocation or input: reported as ``error: ...`` with exit code 2, before any run."""


# --------------------------------------------------------------------------------------------
# The published figures, parsed from the spec
# --------------------------------------------------------------------------------------------

TABLE_HEADING = "## Published numbers"
ICLREC_MARKER = "Baseline for context (ICLRec"
SASREC_MARKER = "SASRec in the paper's table"
ABLATION_MARKER = "Ablation in the paper (sum of the four metrics)"
_NUMBER = r"\d+(?:\.\d+)?"
_SEGMENT = re.compile(r"\s*([A-Za-z][\w]*)\s+(.+?)\s*")


@dataclass(frozen=True)
class PublishedFigures:
    """What the spec says the paper reports. Row labels are as the spec writes them."""

    metrics: tuple[str, ...]  # columns of the published table, in order
    table: dict[str, dict[str, float]]  # "Beauty" -> metric -> value (Table 1, ELCRec)
    iclrec: dict[str, dict[str, float]]  # "Beauty" -> metric -> value
    sasrec: dict[str, dict[str, float]]
    ablation: dict[str, dict[str, float]]  # "Beauty" -> "B+ICL" -> sum of the four metrics


def parse_published_table(
    text: str, *, source: str
) -> tuple[tuple[str, ...], dict[str, dict[str, float]]]:
    """The first markdown table under the ``## Published numbers`` heading -> (metrics, rows)."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(TABLE_HEADING)), None)
    if start is None:
        raise HarnessError(f"{source}: no heading starting {TABLE_HEADING!r}")
    table: list[str] = []
    for line in lines[start + 1:]:
        if line.startswith("#"):
            break
        if line.lstrip().startswith("|"):
            table.append(line.strip())
        elif table:
            break
    if len(table) < 3:
        raise HarnessError(f"{source}: no table (header, separator, rows) under {TABLE_HEADING!r}")
    header = _cells(table[0])
    metrics = tuple(header[1:])
    missing = [m for m in REPORT_METRICS if m not in metrics]
    if missing:
        raise HarnessError(
            f"{source}: the published table has no column {', '.join(missing)} (columns: {header})"
        )
    rows: dict[str, dict[str, float]] = {}
    for line in table[2:]:
        cells = _cells(line)
        if len(cells) != len(header) or not all(re.fullmatch(_NUMBER, c) for c in cells[1:]):
            raise HarnessError(
                f"{source}: published table row {line!r} does not hold {len(metrics)} numbers"
            )
        rows[cells[0]] = {m: float(v) for m, v in zip(metrics, cells[1:], strict=True)}
    return metrics, rows


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def sentence_after(text: str, marker: str, *, source: str) -> str:
    """The words after ``marker``'s colon up to the sentence's full stop, line breaks folded.

    The colon is the first one outside parentheses; the full stop is a ``.`` followed by a space
    or the end (so decimal points do not end the sentence).
    """
    flat = " ".join(text.split())
    start = flat.find(marker)
    if start < 0:
        raise HarnessError(f"{source}: no sentence starting {marker!r}")
    depth, colon = 0, -1
    for i in range(start, len(flat)):
        depth += {"(": 1, ")": -1}.get(flat[i], 0)
        if flat[i] == ":" and depth == 0:
            colon = i
            break
    if colon < 0:
        raise HarnessError(f"{source}: no ':' after {marker!r}")
    rest = flat[colon + 1:]
    end = re.search(r"\.(?=\s|$)", rest)
    if end is None:
        raise HarnessError(f"{source}: the sentence starting {marker!r} has no full stop")
    return rest[:end.start()].strip()


def _slash_values(body: str, count: int, *, where: str) -> list[float]:
    parts = [p.strip() for p in body.split("/")]
    if len(parts) != count or not all(re.fullmatch(_NUMBER, p) for p in parts):
        raise HarnessError(f"{where}: expected {count} numbers separated by '/', got {body!r}")
    return [float(p) for p in parts]


def parse_baseline(
    text: str, marker: str, metrics: Sequence[str], *, source: str
) -> dict[str, dict[str, float]]:
    """``MARKER ...: Beauty a / b / c / d; Sports e / f / g / h.``
    -> {"Beauty": {metric: a, ...}, ...}.

    The values are in the order of the published table's columns (``metrics``).
    """
    sentence = sentence_after(text, marker, source=source)
    rows: dict[str, dict[str, float]] = {}
    for segment in sentence.split(";"):
        match = _SEGMENT.fullmatch(segment)
        if match is None:
            raise HarnessError(
                f"{source}: after {marker!r}: cannot read {segment!r} as 'Dataset a / b / ...'"
            )
        values = _slash_values(
            match.group(2), len(metrics), where=f"{source}: after {marker!r}, {match.group(1)}"
        )
        rows[match.group(1)] = dict(zip(metrics, values, strict=True))
    return rows


def parse_ablation(text: str, *, source: str) -> dict[str, dict[str, float]]:
    """``Ablation ...: Beauty B 0.2390, B+ICL 0.2398, ...; Sports 0.1343 / 0.1379 / ....``
    -> {"Beauty": {"B": 0.2390, ...}, "Sports": {"B": 0.1343, ...}}.

    A segment written as bare ``/``-separated values takes the names of the last named segment.
    """
    sentence = sentence_after(text, ABLATION_MARKER, source=source)
    names: list[str] = []
    rows: dict[str, dict[str, float]] = {}
    for segment in sentence.split(";"):
        match = _SEGMENT.fullmatch(segment)
        if match is None:
            raise HarnessError(f"{source}: ablation: cannot read {segment!r}")
        dataset, body = match.group(1), match.group(2)
        where = f"{source}: ablation, {dataset}"
        if "," in body or re.search(r"[A-Za-z]", body):
            pairs = [
                re.fullmatch(rf"(\S+)\s+({_NUMBER})", item.strip()) for item in body.split(",")
            ]
            if not all(pairs):
                raise HarnessError(f"{where}: expected 'Name value, Name value, ...', got {body!r}")
            rows[dataset] = {p.group(1): float(p.group(2)) for p in pairs if p is not None}
            names = list(rows[dataset])
        elif names:
            rows[dataset] = dict(
                zip(names, _slash_values(body, len(names), where=where), strict=True)
            )
        else:
            raise HarnessError(f"{where}: bare values before any segment naming the variants")
    return rows


def parse_spec(path: Path) -> PublishedFigures:
    """Every published figure the report compares with, from the spec markdown at ``path``."""
    if not path.is_file():
        raise HarnessError(
            f"spec not found: {path} (pass --shared, the folder holding docs/elcrec-method.md)"
        )
    text = path.read_text()
    source = str(path)
    metrics, table = parse_published_table(text, source=source)
    return PublishedFigures(
        metrics=metrics,
        table=table,
        iclrec=parse_baseline(text, ICLREC_MARKER, metrics, source=source),
        sasrec=parse_baseline(text, SASREC_MARKER, metrics, source=source),
        ablation=parse_ablation(text, source=source),
    )


def row_for_dataset(rows: Mapping[str, Any], dataset: str) -> Any | None:
    """The row whose label is the dataset key or its full name ("Sports" or
    "Sports_and_Outdoors")."""
    names = {dataset.lower(), DATASET_FILES[dataset].lower()}
    found = [value for label, value in rows.items() if label.lower() in names]
    return found[0] if found else None


def paper_metrics(figures: PublishedFigures, dataset: str) -> dict[str, dict[str, float]]:
    """Variant -> the published metrics that stand beside it on ``dataset`` (where there are
    any)."""
    sources = {"elcrec": figures.table, "iclrec": figures.iclrec, "sasrec": figures.sasrec}
    out: dict[str, dict[str, float]] = {}
    for variant, rows in sources.items():
        row = row_for_dataset(rows, dataset)
        if row is not None:
            out[variant] = row
    return out


def paper_ablation(figures: PublishedFigures, dataset: str) -> dict[str, float]:
    """Variant -> the paper's ablation sum on ``dataset`` (where there is one)."""
    row = row_for_dataset(figures.ablation, dataset) or {}
    return {v: row[name] for v, name in ABLATION_NAME_OF_VARIANT.items() if name in row}


# --------------------------------------------------------------------------------------------
# Number formatting
# --------------------------------------------------------------------------------------------

def format_mean_sd(values: Sequence[float], digits: int = 4) -> str:
    """``0.0529`` for one value; ``mean ± sample sd`` for several."""
    if not values:
        return "—"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def relative_difference(ours: float, published: float) -> float:
    """(ours − published) / published, in percent."""
    if published == 0:
        raise ValueError("relative difference to a published value of 0")
    return 100.0 * (ours - published) / published


def format_percent(value: float) -> str:
    return f"{value:+.1f}%"


def format_duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60)} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60)} min"


# --------------------------------------------------------------------------------------------
# Invocation: key, run folders, commands
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Invocation:
    """What identifies the runs and the block of one harness invocation."""

    dataset: str
    variants: tuple[str, ...]
    seeds: tuple[int, ...]
    epochs: int | None
    overrides: tuple[str, ...]
    data: str | None  # --data, when given
    dataset_config: str | None  # --dataset-config, when given

    def variation(self) -> str | None:
        """Short stable hash of what changes results beyond variant, seed and epochs; None if
        nothing."""
        items = [*self.overrides]
        if self.data is not None:
            items.append(f"data={self.data}")
        if self.dataset_config is not None:
            items.append(f"config={self.dataset_config}")
        if not items:
            return None
        return hashlib.sha256("\n".join(items).encode()).hexdigest()[:8]

    def key(self) -> str:
        """``beauty:b_elcm+elcrec:seeds=1,2:full[:set-1a2b3c4d]`` (order of variants and seeds
        ignored)."""
        parts = [
            self.dataset,
            "+".join(sorted(self.variants)),
            "seeds=" + ",".join(str(s) for s in sorted(self.seeds)),
            f"e{self.epochs}" if self.epochs is not None else "full",
        ]
        if (variation := self.variation()) is not None:
            parts.append(f"set-{variation}")
        return ":".join(parts)

    def name(self) -> str:
        """The key as a file name: ``beauty-b_elcm-elcrec-seeds-1-2-full[-set-1a2b3c4d]``."""
        return re.sub(r"[^A-Za-z0-9_]+", "-", self.key()).strip("-")

    def slug(self) -> str:
        """The plot's file name (without ``.png``)."""
        return "reproduce-" + self.name()

    def run_dir(self, runs_root: Path, variant: str, seed: int) -> Path:
        name = f"{variant}-seed{seed}"
        if self.epochs is not None:
            name += f"-e{self.epochs}"
        if (variation := self.variation()) is not None:
            name += f"-{variation}"
        return runs_root / self.dataset / name


def check_overrides(overrides: Sequence[str]) -> None:
    """``key=value`` each, and none of the keys the harness sets itself."""
    for text in overrides:
        key = text.split("=", 1)[0].strip()
        if "=" not in text or not key:
            raise HarnessError(f"--set expects key=value, got {text!r}")
        if key in RESERVED_OVERRIDES:
            raise HarnessError(f"--set {key}: set by the harness; use {RESERVED_OVERRIDES[key]}")


def variant_files(variants: Sequence[str], variant_dir: Path = VARIANT_DIR) -> dict[str, Path]:
    """Each variant's config layer; an error naming the missing files and listing those that
    exist."""
    files = {v: variant_dir / f"{v}.yaml" for v in variants}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        known = sorted(p.stem for p in variant_dir.glob("*.yaml"))
        raise HarnessError(
            f"no variant config {', '.join(missing)}; "
            f"variants in {variant_dir}: {', '.join(known) or 'none'}"
        )
    return files


def train_overrides(inv: Invocation, seed: int) -> list[str]:
    out = [f"train.seed={seed}"]
    if inv.epochs is not None:
        out.append(f"train.epochs={inv.epochs}")
    return [*out, *inv.overrides]


def check_configs(
    inv: Invocation, dataset_config: Path, files: Mapping[str, Path]
) -> tuple[int, int]:
    """Load every layered config once (errors name the file or key); -> (max epochs, patience)."""
    try:
        for variant_file in files.values():
            load_config([dataset_config, variant_file], train_overrides(inv, inv.seeds[0]))
        base = load_config(dataset_config, train_overrides(inv, inv.seeds[0]))
    except ConfigError as exc:
        raise HarnessError(str(exc)) from None
    return base.train.epochs, base.train.patience


def launcher_prefix(ranks: int, port: int) -> list[str]:
    """How a run starts: this Python for one rank, the deepspeed launcher beside it for several."""
    if ranks == 1:
        return [sys.executable]
    deepspeed = shutil.which(
        "deepspeed",
        path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    )
    if deepspeed is None:
        raise HarnessError(
            "--ranks > 1 needs the deepspeed launcher, found neither beside Python nor on PATH"
        )
    return [deepspeed, "--num_gpus", str(ranks), "--master_port", str(port)]


def train_command(inv: Invocation, *, prefix: Sequence[str], dataset_config: Path,
                  variant_file: Path, data: Path, run_dir: Path, seed: int) -> list[str]:
    cmd = [*prefix, str(TRAIN_SCRIPT), "--config", str(dataset_config),
           "--config", str(variant_file), "--data", str(data), "--run-dir", str(run_dir)]
    for text in train_overrides(inv, seed):
        cmd += ["--set", text]
    return [*cmd, "--resume", "auto"]


def regenerate_command(args: argparse.Namespace) -> str:
    """The copy-pasteable command that regenerates the block (``--no-run`` and defaults left
    out)."""
    parts = ["python", "-m", "bench.reproduce", "--dataset", args.dataset,
             "--variants", *args.variants,
             "--seeds", *(str(s) for s in args.seeds)]
    if args.epochs is not None:
        parts += ["--epochs", str(args.epochs)]
    for name in ("parallel", "ranks", "runs_root", "results_dir", "shared"):
        value = getattr(args, name)
        if value != DEFAULTS[name]:
            parts += [f"--{name.replace('_', '-')}", str(value)]
    for name in ("data", "dataset_config"):
        if getattr(args, name) is not None:
            parts += [f"--{name.replace('_', '-')}", getattr(args, name)]
    for text in args.overrides:
        parts += ["--set", text]
    return shlex.join(parts)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------

def ensure_prepared(dataset: str, *, data: Path, shared: Path, explicit: bool) -> None:
    """Prepare ``data`` from the benchmark file unless it already holds a manifest."""
    if (data / "manifest.json").is_file():
        return
    if explicit:
        raise HarnessError(f"--data {data}: no manifest.json there (not a prepared dataset)")
    raw = shared / "data" / f"{DATASET_FILES[dataset]}.txt"
    if not raw.is_file():
        raise HarnessError(
            f"benchmark file not found: {raw} (needed to prepare {data}; pass --shared)"
        )
    cmd = [sys.executable, "-m", "data_prep.benchmark", "--input", str(raw), "--output", str(data)]
    print(f"preparing {data} from {raw}", flush=True)
    proc = subprocess.run(cmd, check=False)
    if proc.returncode != 0:
        raise HarnessError(f"preparing {data} failed (exit {proc.returncode}): {shlex.join(cmd)}")


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunSpec:
    variant: str
    seed: int
    run_dir: Path
    command: tuple[str, ...]


@dataclass(frozen=True)
class Outcome:
    spec: RunSpec
    exit_code: int
    wall_s: float
    peak_rss_mib: float


def is_finished(run_dir: Path) -> bool:
    return (run_dir / "results.json").is_file()


def write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)


def read_harness_records(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "harness.json"
    if not path.is_file():
        return []
    records = json.loads(path.read_text())
    if not isinstance(records, list):
        raise HarnessError(f"{path}: expected a JSON list of invocation records")
    return records


def append_harness_record(run_dir: Path, record: dict[str, Any]) -> None:
    write_json_atomic(run_dir / "harness.json", [*read_harness_records(run_dir), record])


def child_environment(*, parallel: int, ranks: int, on_cpu: bool) -> dict[str, str]:
    """This environment, with a fair share of threads per process on CPU.

    PATH is left alone on purpose: the deepspeed launcher is called by its full path (its ranks
    run its own Python), and a PATH with the venv's ``ninja`` first builds DeepSpeed's shm op with
    another ninja than a plain run does, so the two rebuild the shared extension cache in turn
    (about 50 s of compiling at each switch).
    """
    env = dict(os.environ)
    if on_cpu and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // (parallel * ranks)))
    return env


def execute_run(spec: RunSpec, env: Mapping[str, str]) -> Outcome:
    """Run one training to its exit, output to ``RUN/train.log``; record it in ``RUN/harness.json``.

    ``os.wait4`` reaps exactly this child and returns its resource usage: ``ru_maxrss`` (KiB on
    Linux) is the peak RSS of the largest single process among the child and the descendants
    it waited for (with ``--ranks`` > 1, the largest rank, not their sum).
    """
    spec.run_dir.mkdir(parents=True, exist_ok=True)
    started_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with (spec.run_dir / "train.log").open("ab") as log:
        log.write(f"=== bench/reproduce.py {started_at}: {shlex.join(spec.command)}\n".encode())
        log.flush()
        t0 = time.monotonic()
        proc = subprocess.Popen(spec.command, stdout=log, stderr=subprocess.STDOUT, env=dict(env))
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.monotonic() - t0
    code = os.waitstatus_to_exitcode(status)
    proc.returncode = code  # reaped here; keeps Popen from waiting on a pid that is gone
    outcome = Outcome(spec, code, wall, usage.ru_maxrss / 1024.0)
    append_harness_record(
        spec.run_dir,
        {
            "command": list(spec.command),
            "wall_s": round(wall, 3),
            "peak_rss_mib": round(outcome.peak_rss_mib, 1),
            "exit_code": code,
            "started_at": started_at,
        },
    )
    return outcome


def run_all(specs: Sequence[RunSpec], *, runner: Callable[[RunSpec, Mapping[str, str]], Outcome],
            env: Mapping[str, str], parallel: int) -> list[Outcome]:
    """Up to ``parallel`` runs at once; each reports as it ends."""

    def one(spec: RunSpec) -> Outcome:
        print(
            f"start {spec.variant} seed {spec.seed}: {spec.run_dir} "
            f"(log {spec.run_dir / 'train.log'})",
            flush=True,
        )
        outcome = runner(spec, env)
        state = "finished" if outcome.exit_code == 0 and is_finished(spec.run_dir) else "FAILED"
        print(
            f"{state} {spec.variant} seed {spec.seed}: exit {outcome.exit_code}, "
            f"{format_duration(outcome.wall_s)}, peak RSS {outcome.peak_rss_mib:.0f} MiB",
            flush=True,
        )
        return outcome

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        return list(pool.map(one, specs))


def running_on_cpu() -> bool:
    import torch

    return not torch.cuda.is_available()


# --------------------------------------------------------------------------------------------
# Collecting
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunStatus:
    """One (variant, seed) as found on disk."""

    variant: str
    seed: int
    run_dir: Path
    results: dict[str, Any] | None  # results.json, when finished
    harness: list[dict[str, Any]]
    curve: tuple[tuple[int, ...], tuple[float, ...]]  # (epochs, valid NDCG@20), when finished
    # (epochs, valid NDCG@20) an unfinished run has logged so far (metrics.jsonl); empty otherwise
    progress: tuple[tuple[int, ...], tuple[float, ...]] = ((), ())

    @property
    def finished(self) -> bool:
        return self.results is not None

    def wall_s(self) -> tuple[float, bool] | None:
        """(seconds, whether they come from harness.json) — the sum over this harness's invocations,
        else the trainer's own time: its clustering + training + validation seconds
        (``time_split``, kept in checkpoints, so it covers every process of a resumed run) or,
        from older runs without it, ``train_seconds`` (the last process only)."""
        if self.harness:
            return sum(float(r["wall_s"]) for r in self.harness), True
        split = (self.results or {}).get("time_split")
        if split:
            return sum(float(v) for v in split.values()), False
        if self.results is not None and "train_seconds" in self.results:
            return float(self.results["train_seconds"]), False
        return None

    def peak_rss_mib(self) -> float | None:
        if self.harness:
            return max(float(r["peak_rss_mib"]) for r in self.harness)
        memory = (self.results or {}).get("peak_memory") or {}
        return float(memory["rss_mib"]) if memory.get("rss_mib") is not None else None

    def peak_gpu_mib(self) -> float | None:
        memory = (self.results or {}).get("peak_memory") or {}
        value = memory.get("cuda_max_allocated_mib")
        return float(value) if value is not None else None


def eval_epochs(*, evaluations: int, eval_every: int, max_epochs: int) -> tuple[int, ...]:
    """The (0-based) epochs after which the trainer evaluated, as ``fit`` schedules them."""
    epochs = [e for e in range(max_epochs) if (e + 1) % eval_every == 0 or e + 1 == max_epochs]
    return tuple(epochs[:evaluations])


def _train_schedule(run_dir: Path) -> tuple[int, int]:
    """(eval_every, epochs) from the run's resolved ``config.yaml``."""
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise HarnessError(f"{config_path} is missing (needed for the evaluation schedule)")
    train = yaml.safe_load(config_path.read_text())["train"]
    return int(train["eval_every"]), int(train["epochs"])


def logged_progress(run_dir: Path) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """(epochs, valid NDCG@20) of the validation passes an unfinished run has logged so far, from
    ``metrics.jsonl`` (which a resume rewinds to its checkpoint, so no pass appears twice);
    empty when the run has logged none."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return (), ()
    name = f"valid/{CURVE_METRIC}"
    values = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise HarnessError(f"{path}:{number}: not JSON ({exc})") from exc
        if name in row:
            values.append(float(row[name]))
    if not values:
        return (), ()
    eval_every, max_epochs = _train_schedule(run_dir)
    epochs = eval_epochs(evaluations=len(values), eval_every=eval_every, max_epochs=max_epochs)
    if len(epochs) != len(values):
        raise HarnessError(
            f"{path}: {len(values)} validation passes, but the config schedules {len(epochs)}"
        )
    return epochs, tuple(values)


def collect_run(variant: str, seed: int, run_dir: Path) -> RunStatus:
    harness = read_harness_records(run_dir)
    results_path = run_dir / "results.json"
    if not results_path.is_file():
        return RunStatus(variant, seed, run_dir, None, harness, ((), ()), logged_progress(run_dir))
    results = json.loads(results_path.read_text())
    missing = [k for k in ("test", "best_epoch", "epochs_run", "valid_history") if k not in results]
    missing += (
        [f"test.{m}" for m in REPORT_METRICS if m not in results.get("test", {})]
        if "test" in results
        else []
    )
    if missing:
        raise HarnessError(f"{results_path}: no {', '.join(missing)}")
    eval_every, max_epochs = _train_schedule(run_dir)
    history = tuple(float(v) for v in results["valid_history"])
    epochs = eval_epochs(evaluations=len(history), eval_every=eval_every, max_epochs=max_epochs)
    if len(epochs) != len(history):
        raise HarnessError(
            f"{results_path}: {len(history)} validation values, "
            f"but {run_dir / 'config.yaml'} schedules {len(epochs)}"
        )
    return RunStatus(variant, seed, run_dir, results, harness, (epochs, history))


# --------------------------------------------------------------------------------------------
# The report block
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ReportContext:
    invocation: Invocation
    budget: str
    command: str
    data: str
    dataset_config: str


def budget_text(*, epochs: int | None, max_epochs: int, patience: int) -> str:
    if epochs is None:
        return f"to early stopping (at most {max_epochs} epochs, patience {patience})"
    text = f"equal budget of {epochs} epoch{'s' if epochs > 1 else ''}"
    if patience < epochs:
        text += f" (early stopping with patience {patience} may end a run sooner)"
    return text


def _by_variant(runs: Sequence[RunStatus]) -> dict[str, list[RunStatus]]:
    out: dict[str, list[RunStatus]] = {}
    for run in runs:
        out.setdefault(run.variant, []).append(run)
    return out


def _metric_values(runs: Sequence[RunStatus], metric: str) -> list[float]:
    return [float(r.results["test"][metric]) for r in runs if r.results is not None]


def _sums(runs: Sequence[RunStatus]) -> list[float]:
    return [
        sum(float(r.results["test"][m]) for m in REPORT_METRICS)
        for r in runs
        if r.results is not None
    ]


def _main_row(variant: str, runs: Sequence[RunStatus]) -> tuple[str, bool]:
    """A row of the main table, and whether its wall time came from the trainer, not the harness."""
    done = [r for r in runs if r.finished]
    cells = [f"`{variant}`", f"{len(done)}/{len(runs)}"]
    cells += [format_mean_sd(_metric_values(done, m)) for m in REPORT_METRICS]
    cells.append(format_mean_sd(_sums(done)))
    cells.append(
        ", ".join(str(r.results["best_epoch"]) for r in done if r.results is not None) or "—"
    )
    cells.append(
        ", ".join(str(r.results["epochs_run"]) for r in done if r.results is not None) or "—"
    )
    walls = [w for w in (r.wall_s() for r in done) if w is not None]
    from_trainer = any(not from_harness for _, from_harness in walls)
    wall = (
        format_duration(statistics.fmean(s for s, _ in walls)) + ("*" if from_trainer else "")
        if walls
        else "—"
    )
    cells.append(wall)
    rss = [v for v in (r.peak_rss_mib() for r in done) if v is not None]
    gpu = [v for v in (r.peak_gpu_mib() for r in done) if v is not None]
    cells.append(f"{max(rss):.0f}" if rss else "—")
    cells.append(f"{max(gpu):.0f}" if gpu else "—")
    splits = [
        r.results["time_split"]
        for r in done
        if r.results is not None and r.results.get("time_split")
    ]
    if splits:
        parts = [
            statistics.fmean(float(s[k]) for s in splits)
            for k in ("clustering_s", "train_s", "eval_s")
        ]
        cells.append(" / ".join(f"{p:.0f}" if p >= 10 else f"{p:.1f}" for p in parts))
    else:
        cells.append("—")
    return "| " + " | ".join(cells) + " |", from_trainer


def _comparison_cell(ours: Sequence[float], published: float | None) -> str:
    """``ours vs paper (difference)``; a dash for whichever is missing."""
    if published is None:
        return f"{statistics.fmean(ours):.4f} vs —" if ours else "—"
    if not ours:
        return f"— vs {published:.4f}"
    mean = statistics.fmean(ours)
    return f"{mean:.4f} vs {published:.4f} ({format_percent(relative_difference(mean, published))})"


def render_block(ctx: ReportContext, runs: Sequence[RunStatus], figures: PublishedFigures,
                 figure_link: str | None) -> str:
    """The generated markdown between (and including) the BEGIN/END markers."""
    inv = ctx.invocation
    key = inv.key()
    grouped = _by_variant(runs)
    seeds = ", ".join(str(s) for s in inv.seeds)
    lines = [
        f"<!-- reproduce:BEGIN {key} -->",
        f"# Reproduction: {DATASET_FILES[inv.dataset]}, {ctx.budget}",
        "",
        "Generated by `bench/reproduce.py` (edits between the markers are overwritten); "
        "regenerate with",
        "",
        "```bash",
        ctx.command,
        "```",
        "",
        f"Dataset `{ctx.data}`, config `{ctx.dataset_config}` "
        "layered with `configs/variants/VARIANT.yaml`"
        + (f", overrides `{' '.join(inv.overrides)}`" if inv.overrides else "")
        + ".",
        f"Test metrics of the best-validation checkpoint, mean over seeds {seeds}"
        + (" (± sample sd)" if len(inv.seeds) > 1 else "")
        + "; best epoch and epochs run per seed.",
        "",
        "| variant | runs | HR@5 | NDCG@5 | HR@20 | NDCG@20 | sum of four | best epoch "
        "| epochs run | wall / run | peak RSS (MiB) | peak GPU (MiB) "
        "| clustering / train / eval (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    any_trainer_wall = False
    for variant in inv.variants:
        row, from_trainer = _main_row(variant, grouped.get(variant, []))
        lines.append(row)
        any_trainer_wall |= from_trainer
    lines.append("")
    lines.append(
        "Wall time is the harness's, summed over the invocations that ran a run, mean over seeds"
        + (
            "; * marks the trainer's own time where the harness did not run it "
            "(clustering + training + validation seconds, summed over resumed processes)"
            if any_trainer_wall
            else ""
        )
        + ". Peak memory is the largest over seeds."
    )
    lines += ["", "## Against the paper", ""]
    published = paper_metrics(figures, inv.dataset)
    lines += [
        "Ours (mean over seeds) vs the spec's published figure, "
        "relative difference (ours − paper) / paper.",
        "",
        "| variant | paper's row | " + " | ".join(REPORT_METRICS) + " |",
        "|---|---|" + "---|" * len(REPORT_METRICS),
    ]
    for variant in inv.variants:
        done = [r for r in grouped.get(variant, []) if r.finished]
        paper = published.get(variant)
        source = PAPER_ROW_OF_VARIANT[variant] if paper is not None else "—"
        cells = [
            _comparison_cell(_metric_values(done, m), paper[m] if paper else None)
            for m in REPORT_METRICS
        ]
        lines.append(f"| `{variant}` | {source} | " + " | ".join(cells) + " |")
    ablation = paper_ablation(figures, inv.dataset)
    lines += [
        "",
        "Ablation, sum of the four metrics (the paper's names: B, B+ICL, B+ELCM, ELCRec):",
        "",
        "| variant | paper's name | ours | paper | difference |",
        "|---|---|---|---|---|",
    ]
    for variant in inv.variants:
        if variant not in ABLATION_NAME_OF_VARIANT:
            continue
        sums = _sums([r for r in grouped.get(variant, []) if r.finished])
        paper_sum = ablation.get(variant)
        ours = format_mean_sd(sums)
        diff = (
            format_percent(relative_difference(statistics.fmean(sums), paper_sum))
            if sums and paper_sum is not None
            else "—"
        )
        paper_text = f"{paper_sum:.4f}" if paper_sum is not None else "—"
        lines.append(
            f"| `{variant}` | {ABLATION_NAME_OF_VARIANT[variant]} | "
            f"{ours} | {paper_text} | {diff} |"
        )
    lines += ["", "## Runs", ""]
    for run in runs:
        if run.results is not None:
            state = f"finished {run.results.get('finished_at', '')}".rstrip()
        elif run.harness:
            last = run.harness[-1]
            state = (
                f"not finished (last exit code {last['exit_code']}; "
                f"log `{run.run_dir / 'train.log'}`)"
            )
        elif run.progress[0]:
            state = "not finished (running, or stopped from outside the harness)"
        else:
            state = "not run yet"
        if run.progress[0]:  # only unfinished runs have one
            epochs, values = run.progress
            # the first of equal bests
            best = max(range(len(values)), key=lambda i: (values[i], -i))
            state += (
                f"; {len(values)} validation passes so far, the last after epoch {epochs[-1]}, "
                f"best valid {CURVE_METRIC} {values[best]:.4f} after epoch {epochs[best]}"
            )
        lines.append(f"- `{run.variant}` seed {run.seed}: `{run.run_dir}` — {state}")
    lines.append("")
    if figure_link is not None:
        lines.append(
            f"![validation {CURVE_METRIC} per epoch, {DATASET_FILES[inv.dataset]}]({figure_link})"
        )
    else:
        lines.append(f"(No finished run yet: no plot of validation {CURVE_METRIC}.)")
    lines.append(f"<!-- reproduce:END {key} -->")
    return "\n".join(lines)


def insert_block(text: str, key: str, block: str) -> str:
    """``text`` with the block of ``key`` replaced in place, or appended when absent."""
    begin, end = f"<!-- reproduce:BEGIN {key} -->", f"<!-- reproduce:END {key} -->"
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.rstrip("\r\n") == begin]
    ends = [i for i, line in enumerate(lines) if line.rstrip("\r\n") == end]
    if not starts and not ends:
        sep = "" if not text else ("\n" if text.endswith("\n") else "\n\n")
        return text + sep + block + "\n"
    if len(starts) != 1 or len(ends) != 1 or ends[0] < starts[0]:
        raise HarnessError(
            f"the markers of {key!r} are not one BEGIN followed by one END "
            f"(BEGIN at lines {[i + 1 for i in starts]}, END at {[i + 1 for i in ends]})"
        )
    tail = lines[ends[0]]
    newline = tail[len(tail.rstrip("\r\n")):] or ""
    return "".join(lines[:starts[0]]) + block + newline + "".join(lines[ends[0] + 1:])


def block_path(results_dir: Path, inv: Invocation) -> Path:
    """The file that holds the block of ``inv``: one file per key."""
    return results_dir / f"{inv.name()}.md"


def write_results(path: Path, key: str, block: str) -> None:
    """Insert the block into ``path`` (created when absent), atomically."""
    text = path.read_text() if path.is_file() else ""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(insert_block(text, key, block))
    tmp.replace(path)


def plot_curves(runs: Sequence[RunStatus], path: Path, *, title: str) -> bool:
    """Validation NDCG@20 per epoch, one colour per variant (thin lines per seed when several);
    saved as PNG at ``path``. False (nothing written) when no run has a curve."""
    finished = [r for r in runs if r.finished and r.curve[0]]
    if not finished:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    grouped = _by_variant(finished)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (variant, group) in enumerate(grouped.items()):
        several = len(group) > 1
        for j, run in enumerate(group):
            ax.plot(
                run.curve[0],
                run.curve[1],
                color=colours[i % len(colours)],
                linewidth=0.9 if several else 1.8,
                alpha=0.8 if several else 1.0,
                label=variant if j == 0 else None,
                marker="o" if len(run.curve[0]) <= 20 else None,
                markersize=3,
            )  # short curves stay visible
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(-0.5, max(max(r.curve[0]) for r in finished) + 0.5)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"valid {CURVE_METRIC}")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return True


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------

def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    # no abbreviations: the old ``--results FILE`` would otherwise pass as ``--results-dir``
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--dataset",
        required=True,
        choices=sorted(DATASET_FILES),
        help="benchmark: configs/DATASET.yaml, data/DATASET, {shared}/data/<file>.txt",
    )
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), metavar="VARIANT",
                        help="config layers configs/variants/VARIANT.yaml (default: %(default)s)")
    parser.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=[1],
        metavar="S",
        help="train.seed values (default: 1)",
    )
    parser.add_argument(
        "--epochs",
        type=_positive,
        default=None,
        help="equal budget of N epochs per run (default: the config's, with early stopping)",
    )
    parser.add_argument(
        "--parallel",
        type=_positive,
        default=DEFAULTS["parallel"],
        metavar="K",
        help="runs at once (default: 1); "
        "on CPU each gets OMP_NUM_THREADS = cpus // (K*R) unless set",
    )
    parser.add_argument(
        "--ranks",
        type=_positive,
        default=DEFAULTS["ranks"],
        metavar="R",
        help="processes per run: > 1 starts them with `deepspeed --num_gpus R` (default: 1)",
    )
    parser.add_argument(
        "--runs-root",
        default=DEFAULTS["runs_root"],
        help="run folders go to RUNS_ROOT/DATASET/ (default: %(default)s)",
    )
    parser.add_argument("--results-dir", default=DEFAULTS["results_dir"], metavar="DIR",
                        help="the block goes to DIR/NAME.md (one file per key), the plot to "
                             "DIR/figures/ (default: %(default)s)")
    parser.add_argument(
        "--shared",
        default=DEFAULTS["shared"],
        help="folder with data/*.txt and docs/elcrec-method.md (default: %(default)s)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for every run (repeatable); "
        "run folders and the block key carry its hash",
    )
    parser.add_argument(
        "--data", default=None, help="an existing prepared dataset instead of data/DATASET"
    )
    parser.add_argument(
        "--dataset-config", default=None, metavar="PATH", help="instead of configs/DATASET.yaml"
    )
    parser.add_argument(
        "--no-run",
        action="store_true",
        help="run nothing: collect what is finished and write the block",
    )
    return parser


def _unique(items: Sequence[Any]) -> tuple[Any, ...]:
    return tuple(dict.fromkeys(items))


def reproduce(args: argparse.Namespace) -> int:
    """Check, run what is not finished, collect, write the block; -> exit code."""
    check_overrides(args.overrides)
    inv = Invocation(
        args.dataset,
        _unique(args.variants),
        _unique(args.seeds),
        args.epochs,
        tuple(args.overrides),
        args.data,
        args.dataset_config,
    )
    files = variant_files(inv.variants)
    dataset_config = (
        Path(args.dataset_config) if args.dataset_config else CONFIG_DIR / f"{inv.dataset}.yaml"
    )
    if not dataset_config.is_file():
        raise HarnessError(f"dataset config not found: {dataset_config}")
    max_epochs, patience = check_configs(inv, dataset_config, files)
    figures = parse_spec(Path(args.shared) / SPEC_RELATIVE)
    data = Path(args.data) if args.data else Path("data") / inv.dataset
    runs_root = Path(args.runs_root)
    results_dir = Path(args.results_dir)
    if results_dir.exists() and not results_dir.is_dir():
        raise HarnessError(f"--results-dir {results_dir}: a file, not a folder "
                           "(each block is a file of its own in it)")

    specs: list[RunSpec] = []
    for i, (variant, seed) in enumerate((v, s) for v in inv.variants for s in inv.seeds):
        run_dir = inv.run_dir(runs_root, variant, seed)
        # --no-run starts nothing, so it needs no launcher (its commands are never used)
        prefix = (
            launcher_prefix(args.ranks, MASTER_PORT_BASE + i)
            if not args.no_run
            else [sys.executable]
        )
        command = train_command(
            inv,
            prefix=prefix,
            dataset_config=dataset_config,
            variant_file=files[variant],
            data=data,
            run_dir=run_dir,
            seed=seed,
        )
        specs.append(RunSpec(variant, seed, run_dir, tuple(command)))

    failed: list[Outcome] = []
    if not args.no_run:
        pending = []
        for spec in specs:
            if is_finished(spec.run_dir):
                print(
                    f"skip {spec.variant} seed {spec.seed}: "
                    f"finished ({spec.run_dir / 'results.json'})",
                    flush=True,
                )
            else:
                pending.append(spec)
        if pending:
            ensure_prepared(
                inv.dataset, data=data, shared=Path(args.shared), explicit=args.data is not None
            )
            env = child_environment(
                parallel=args.parallel, ranks=args.ranks, on_cpu=running_on_cpu()
            )
            outcomes = run_all(pending, runner=execute_run, env=env, parallel=args.parallel)
            failed = [o for o in outcomes if o.exit_code != 0 or not is_finished(o.spec.run_dir)]

    runs = [collect_run(s.variant, s.seed, s.run_dir) for s in specs]
    block_file = block_path(results_dir, inv)
    figure = results_dir / "figures" / f"{inv.slug()}.png"
    title = f"{DATASET_FILES[inv.dataset]}: validation {CURVE_METRIC}"
    link = f"figures/{figure.name}" if plot_curves(runs, figure, title=title) else None
    ctx = ReportContext(
        inv,
        budget_text(epochs=inv.epochs, max_epochs=max_epochs, patience=patience),
        regenerate_command(args),
        str(data),
        args.dataset_config or f"configs/{inv.dataset}.yaml",
    )
    write_results(block_file, inv.key(), render_block(ctx, runs, figures, link))
    print(f"wrote the block {inv.key()} into {block_file}" + (f" (plot {figure})" if link else ""),
          flush=True)

    for outcome in failed:
        print(
            f"error: {outcome.spec.variant} seed {outcome.spec.seed} "
            f"failed with exit code {outcome.exit_code}"
            f"{'' if outcome.exit_code else ' and no results.json'}; "
            f"log {outcome.spec.run_dir / 'train.log'}",
            file=sys.stderr,
        )
    return 1 if failed else EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return reproduce(args)
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_PERMANENT


if __name__ == "__main__":
    sys.exit(main())
