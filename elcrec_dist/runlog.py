"""One logging interface: ``RunLogger.log(metrics, step)``.

Scalars go to TensorBoard (``RUN/tb``) and to ``RUN/metrics.jsonl`` (one JSON object per call, for
scripts and tests); only rank 0 writes. Human-readable messages use the standard ``logging``
module under the ``elcrec_dist`` name.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

import torch

logger = logging.getLogger("elcrec_dist")
T = TypeVar("T")


def setup_console(*, main: bool) -> None:
    """Messages to stderr: INFO on rank 0, WARNING elsewhere."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    logger.setLevel(logging.INFO if main else logging.WARNING)


# Rows written after training ends (test metrics of the best model, baselines): never before
# the last checkpoint.
END_OF_RUN = ("test/", "baseline/")


def _kept(row: dict[str, Any], step: int) -> bool:
    if row["step"] != step:
        return bool(row["step"] < step)
    return not any(name.startswith(END_OF_RUN) for name in row if name != "step")


class RunLogger:
    def __init__(self, run_dir: str | Path, *, enabled: bool) -> None:
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self._writer: Any = None
        self._jsonl: Any = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(log_dir=str(self.run_dir / "tb"))
            self._jsonl = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Record scalar ``metrics`` (names like ``loss/next_item``, ``valid/NDCG@20``) at ``step``."""
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items()}
        for name, value in clean.items():
            if math.isfinite(value):
                self._writer.add_scalar(name, value, global_step=step)
        self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        self._jsonl.flush()

    def rewind(self, step: int) -> None:
        """Forget everything logged after ``step`` (a resumed run logs those steps again), and the
        end-of-run rows (``END_OF_RUN``) at ``step`` itself: they follow the last checkpoint, so a
        run resumed from it logs them again. TensorBoard keeps its events at ``step``."""
        if not self.enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self._jsonl.close()
        path = self.run_dir / "metrics.jsonl"
        kept = [line for line in path.read_text(encoding="utf-8").splitlines() if _kept(json.loads(line), step)]
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        tmp.replace(path)
        self._jsonl = open(path, "a", encoding="utf-8")  # noqa: SIM115
        self._writer.close()
        self._writer = SummaryWriter(log_dir=str(self.run_dir / "tb"), purge_step=step + 1)

    def histogram(self, name: str, values: torch.Tensor, step: int) -> None:
        if self.enabled:
            self._writer.add_histogram(name, values, global_step=step)

    def close(self) -> None:
        if self.enabled:
            self._writer.close()
            self._jsonl.close()
            self.enabled = False


def progress(iterable: Iterable[T], *, desc: str, main: bool, total: int | None) -> Iterable[T]:
    """A progress bar over ``iterable`` on rank 0 when stderr is a terminal (``main``), else
    the iterable itself: no bar fills a pod's log."""
    if not main or not sys.stderr.isatty():
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=desc == "epochs")
