"""One logging interface: ``RunLogger.log(metrics, step)``.

Scalars go to TensorBoard (``RUN/tb``) and to ``RUN/metrics.jsonl`` (one JSON object per call, for
scripts and tests); only rank 0 writes. Human-readable messages use the standard ``logging``
module under the ``elcrec_dist`` name.

In a local (or mounted) run folder both files are written in place. In an object store, which
has no appending, they are written in a local scratch folder and synced: each changed file is
uploaded whole (and checked, ``rundir.Folder.upload``) at every flush of the logger, which is
when ``sync_every_s`` has passed at a ``log`` call, before every checkpoint commit (so that a
resumed run finds every row up to its checkpoint), and at ``close``. TensorBoard reads the
event files from the bucket (``tensorboard --logdir s3://BUCKET/RUN/tb``). Writing the event
files straight to the bucket through TensorBoard's own S3 client was the alternative; it is not
used because that client uploads from the writer's background thread, outside this project's
retry configuration, where a failure is neither retried under the documented budget nor turned
into the retryable exit code, and because it too rewrites the whole object on every flush.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

import torch

from elcrec_dist.rundir import Folder, StorageError, sha256_file

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


METRICS = "metrics.jsonl"
TENSORBOARD = "tb"
SYNC_EVERY_S = 30.0  # an object-store run folder's logs are at most this old while it trains


class RunLogger:
    """Scalars of one run to TensorBoard and ``metrics.jsonl`` in ``run_dir`` (rank 0 only:
    ``enabled``), a local path or a URL; see the module docstring for object stores."""

    def __init__(self, run_dir: str | Path | Folder, *, enabled: bool,
                 sync_every_s: float = SYNC_EVERY_S) -> None:
        self.enabled = enabled
        self.folder = Folder.of(run_dir)
        self.run_dir = self.folder.url
        self.sync_every_s = sync_every_s
        self._writer: Any = None
        self._jsonl: Any = None
        self._scratch: Path | None = None
        self._uploaded: dict[str, str] = {}  # relative path -> sha256 of the stored copy
        self._last_sync = time.monotonic()
        if not enabled:
            return
        if self.folder.local:
            self.folder.makedirs()
            self._local = self.folder.local_path()
        else:
            self._scratch = self._local = Path(tempfile.mkdtemp(prefix="elcrec-log-"))
            if self.folder.is_file(METRICS):  # a resumed run continues the stored file
                self.folder.download(METRICS, self._local / METRICS)
                self._uploaded[METRICS] = sha256_file(self._local / METRICS)
        self._open(purge_step=None)

    def _open(self, *, purge_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(self._local / TENSORBOARD), purge_step=purge_step)
        self._jsonl = open(self._local / METRICS, "a", encoding="utf-8")  # noqa: SIM115

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Record scalar ``metrics`` (names like ``loss/next_item``, ``valid/NDCG@20``) at
        ``step``."""
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items()}
        if "loss/total" in clean:  # a step's losses: also on the console, for `kubectl logs`
            terms = " ".join(f"{k[5:]} {v:.4f}" for k, v in clean.items() if k.startswith("loss/"))
            logger.info("step %d: %s", step, terms)
        for name, value in clean.items():
            if math.isfinite(value):
                self._writer.add_scalar(name, value, global_step=step)
        self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        self._jsonl.flush()
        if self._scratch is not None and time.monotonic() - self._last_sync >= self.sync_every_s:
            try:
                self.sync()
            except StorageError as exc:  # not fatal here: the next sync uploads it all again
                logger.warning(
                    "the run log could not be stored yet (%s); retrying at the next flush", exc
                )

    def sync(self) -> None:
        """Flush both files and, for an object-store run folder, upload each one that changed
        since its last upload. Raises ``StorageError`` when that fails past the retries."""
        if not self.enabled:
            return
        self._writer.flush()
        self._jsonl.flush()
        self._upload_changed()

    def _upload_changed(self) -> None:
        if self._scratch is None:
            return
        self._last_sync = time.monotonic()
        for path in sorted(p for p in self._local.rglob("*") if p.is_file()):
            relative = path.relative_to(self._local).as_posix()
            digest = sha256_file(path)
            if self._uploaded.get(relative) != digest:
                self._uploaded[relative] = self.folder.upload(path, relative).sha256

    def rewind(self, step: int) -> None:
        """Forget everything logged after ``step`` (a resumed run logs those steps again), and the
        end-of-run rows (``END_OF_RUN``) at ``step`` itself: they follow the last checkpoint, so a
        run resumed from it logs them again. TensorBoard keeps its events at ``step``."""
        if not self.enabled:
            return
        self._jsonl.close()
        path = self._local / METRICS
        kept = [
            line
            for line in path.read_text(encoding="utf-8").splitlines()
            if _kept(json.loads(line), step)
        ]
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        tmp.replace(path)
        self._writer.close()
        self._open(purge_step=step + 1)

    def histogram(self, name: str, values: torch.Tensor, step: int) -> None:
        if self.enabled:
            self._writer.add_histogram(name, values, global_step=step)

    def text(self, tag: str, text: str, step: int) -> None:
        """Markdown text (e.g. the resolved config) in TensorBoard's text tab."""
        if self.enabled:
            self._writer.add_text(tag, text, global_step=step)

    def hparams(self, params: dict[str, Any], metrics: dict[str, float]) -> None:
        """One row of the HParams tab: the run's settings and its result metrics."""
        if self.enabled:
            self._writer.add_hparams(params, metrics, run_name="hparams")

    def embedding(self, matrix: torch.Tensor, labels: list[list[str]], *, header: list[str],
                  tag: str, step: int) -> None:
        """Points [n, D] with metadata rows for TensorBoard's projector."""
        if self.enabled:
            self._writer.add_embedding(matrix, metadata=labels, metadata_header=header, tag=tag,
                                       global_step=step)

    def close(self, *, quiet: bool = False) -> None:
        """Close both files and store them a last time (``quiet``: on the way out of a failed
        run, a failure to store them is only logged, so the run's own error is the one raised)."""
        if not self.enabled:
            return
        self.enabled = False
        self._writer.close()
        self._jsonl.close()
        if self._scratch is None:
            return
        try:
            self._upload_changed()
        except StorageError as exc:
            if not quiet:
                raise
            logger.warning("the run log could not be stored: %s", exc)
        finally:
            shutil.rmtree(self._scratch, ignore_errors=True)


def progress(iterable: Iterable[T], *, desc: str, main: bool, total: int | None) -> Iterable[T]:
    """A progress bar over ``iterable`` on rank 0 when stderr is a terminal (``main``), else
    the iterable itself: no bar fills a pod's log."""
    if not main or not sys.stderr.isatty():
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=desc == "epochs")
