"""Run the stages: all of them on one machine, or one stage as one worker of a Kubernetes job.

Single machine: plan -> map (``jobs`` processes) -> reduce (``jobs`` processes, over buckets)
-> k-core -> write (``jobs`` processes, over shards) -> commit, with a progress bar per stage.

Kubernetes (every command with the same ``--input``, ``--output`` and config)::

    --stage plan                                  optional: lists and probes the inputs once
    --stage map    --worker-index i --num-workers n   Indexed Job (JOB_COMPLETION_INDEX)
    --stage reduce --worker-index i --num-workers m   Indexed Job over buckets
    --stage commit                                    k-core, any unwritten shard, manifest
    (or, to write shards in parallel: --stage kcore, then --stage write -i/-n, then commit)

Each unit (a map worker, a bucket, a shard) is skipped when its done marker exists, so a failed
or preempted pod is simply run again.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import queue as queue_module
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from typing import Any

from data_prep.build import layout
from data_prep.build.commit import existing_dataset, run_commit
from data_prep.build.config import BuildConfig
from data_prep.build.idmap import ensure_item_table, map_markers
from data_prep.build.inputs import list_inputs
from data_prep.build.kcore import run_kcore
from data_prep.build.mapper import run_map
from data_prep.build.plan import Plan, ensure_plan, fingerprint
from data_prep.build.reducer import run_reduce
from data_prep.build.shards import run_write
from data_prep.build.stats import check_rejects
from data_prep.build.store import Store
from data_prep.writer import PrepError

THREAD_VARIABLES = ("POLARS_MAX_THREADS", "OMP_NUM_THREADS")
# Polars' jemalloc: keep freed pages ten seconds rather than handing them back at once (read at
# process start, so it is set for the worker processes; set it in a pod's environment too).
JEMALLOC_CONF = ("_RJEM_MALLOC_CONF", "dirty_decay_ms:10000,muzzy_decay_ms:10000")


def tune_allocator() -> None:
    """Keep freed memory in the process for reuse (glibc; a no-op elsewhere).

    Every batch allocates and frees numpy arrays of tens of MB. By default glibc maps each with
    mmap and unmaps it on free, and the next batch pays a page fault per 4 KiB to get it back:
    about a fifth of a map worker's CPU time. Raising the mmap and trim thresholds makes freed
    arrays reusable; peak RSS stays what the largest step needs.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, 1 << 31)
    libc.mallopt(m_top_pad, 64 << 20)


STAGES = ("all", "plan", "map", "reduce", "kcore", "write", "commit")


def stores(config: BuildConfig) -> tuple[Store, Store]:
    out = Store(config.output)
    work = Store(config.work_dir) if config.work_dir else out.sub("_work")
    return out, work


def already_built(config: BuildConfig, out: Store) -> bool:
    return existing_dataset(
        out, fingerprint(config, list_inputs(config.input, config.format, output=config.output))
    )


def start_over(out: Store, work: Store) -> None:
    """Remove the work and partial outputs of an earlier, different build (never a dataset)."""
    work.rm()
    for name in ("quarantine", "user_map", layout.ITEM_MAP, layout.STATS):
        out.rm(name)
    for name in out.glob("part-*.parquet"):
        out.rm(name)


def plan_for(config: BuildConfig, *, reset: bool) -> tuple[Plan, Store, Store]:
    out, work = stores(config)
    if reset and work.exists("plan.json"):
        stored = work.read_json("plan.json").get("fingerprint")
        if stored != fingerprint(
            config, list_inputs(config.input, config.format, output=config.output)
        ):
            start_over(out, work)
    return ensure_plan(config, work, reset=reset), out, work


def run_stage(config: BuildConfig, stage: str, worker: int, workers: int) -> str:
    """One stage as one worker (``stage`` other than ``all``); returns a line for the log."""
    out, _ = stores(config)
    if already_built(config, out):
        return f"{config.output} is complete (manifest.json); nothing to do"
    plan, out, work = plan_for(config, reset=stage == "plan")
    if stage == "plan":
        return (
            f"planned {len(plan.inputs)} input file(s) into {plan.buckets} bucket(s): "
            f"{work.show('plan.json')}"
        )
    if stage == "map":
        run_map(plan, work, out, worker, workers)
        return f"map worker {worker} of {workers} done"
    if stage == "reduce":
        run_reduce(plan, work, worker, workers)
        return f"reduce worker {worker} of {workers} done"
    if stage == "kcore":
        marker = run_kcore(plan, work, out)
        return f"k-core done in {len(marker['rounds'])} round(s)"
    if stage == "write":
        run_write(plan, work, out, worker, workers)
        return f"write worker {worker} of {workers} done"
    if stage == "commit":
        run_kcore(plan, work, out)
        run_write(plan, work, out, 0, 1)
        manifest = run_commit(plan, work, out)
        return summary(config.output, manifest)
    raise PrepError(f"--stage must be one of {', '.join(STAGES)}, got {stage!r}")


def summary(output: str, manifest: dict[str, Any]) -> str:
    return (
        f"wrote {output}: {manifest['num_users']:,} users, {manifest['num_items']:,} items, "
        f"{manifest['num_interactions']:,} interactions in {len(manifest['files'])} shard(s)"
    )


def run_all(
    config: BuildConfig, *, jobs: int, show_progress: bool, timings: dict[str, float] | None = None
) -> dict[str, Any] | None:
    """Every stage on this machine; None when the dataset was already complete. Seconds spent
    per stage go into ``timings`` when given."""
    out, _ = stores(config)
    if already_built(config, out):
        return None
    clock = _Clock(timings if timings is not None else {})
    with _Workers(jobs) as workers:
        with clock("plan"):
            plan, out, work = plan_for(config, reset=True)
        with clock("map"):
            if not _map_complete(work):
                n = max(1, min(jobs, len(plan.inputs)))
                with _bar("map", plan.total_rows, "rows", show_progress) as bar:
                    workers.run(run_map, [(plan, work, out, w, n) for w in range(n)], bar)
            check_rejects(plan, map_markers(work))
            ensure_item_table(plan, work)
        with clock("reduce"):
            n = max(1, min(jobs, plan.buckets))
            with _bar("reduce", plan.buckets, "buckets", show_progress) as bar:
                workers.run(run_reduce, [(plan, work, w, n) for w in range(n)], bar)
        with clock("kcore"), _bar("k-core", None, "rounds", show_progress) as bar:
            run_kcore(plan, work, out, progress=bar)
        with clock("write"):
            n = max(1, min(jobs, plan.config.shards))
            with _bar("write", plan.config.shards, "shards", show_progress) as bar:
                workers.run(run_write, [(plan, work, out, w, n) for w in range(n)], bar)
        with clock("commit"):
            return run_commit(plan, work, out)


class _Clock:
    def __init__(self, timings: dict[str, float]) -> None:
        self.timings = timings

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] = round(time.perf_counter() - start, 3)


def _map_complete(work: Store) -> bool:
    try:
        map_markers(work)
    except PrepError:
        return False
    return True


@contextlib.contextmanager
def _bar(name: str, total: int | None, unit: str, show: bool) -> Iterator[Callable[[int], None]]:
    """A tqdm bar on stderr when ``show`` (people at a terminal), else a no-op counter."""
    if not show:
        yield lambda n: None
        return
    from tqdm import tqdm

    with tqdm(
        total=total,
        desc=f"{name:7s}",
        unit=f" {unit}",
        unit_scale=unit == "rows",
        file=sys.stderr,
        leave=True,
    ) as bar:
        yield bar.update


class _Workers:
    """The build's worker processes: started on first use (spawned, each with its share of
    the cores), reused by every stage, forwarding their progress to the bars here."""

    def __init__(self, jobs: int) -> None:
        self.jobs = jobs
        self.pool: ProcessPoolExecutor | None = None
        self.queue: Any = None
        self.saved_env: dict[str, str | None] = {}
        self.token = 0

    def __enter__(self) -> _Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        for key, value in self.saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    def _start(self) -> ProcessPoolExecutor:
        if self.pool is None:
            threads = str(max(1, (os.cpu_count() or 1) // self.jobs))
            # Children start on demand, read these when they start and import Polars then:
            # the variables stay set as long as the pool lives.
            names = (*THREAD_VARIABLES, JEMALLOC_CONF[0])
            self.saved_env = {k: os.environ.get(k) for k in names}
            os.environ.update(dict.fromkeys(THREAD_VARIABLES, threads))
            os.environ.setdefault(*JEMALLOC_CONF)
            context = multiprocessing.get_context("spawn")
            self.queue = context.Queue()
            self.pool = ProcessPoolExecutor(
                max_workers=self.jobs,
                mp_context=context,
                initializer=_worker_init,
                initargs=(self.queue, int(threads)),
            )
        return self.pool

    def run(
        self, fn: Callable[..., None], tasks: list[tuple[Any, ...]], progress: Callable[[int], None]
    ) -> None:
        """``fn(*task, progress=...)`` for every task; here when there is one job or task.

        Workers send progress while they run and return what they had not sent yet; messages
        carry the call's token, so one that arrives late is not counted for the next stage."""
        if self.jobs <= 1 or len(tasks) <= 1:
            for task in tasks:
                fn(*task, progress=progress)
            return
        pool = self._start()
        self.token += 1
        pending = {pool.submit(_call, fn, task, self.token) for task in tasks}
        while pending:
            done, pending = wait(pending, timeout=0.2, return_when=FIRST_EXCEPTION)
            self._drain(progress)
            for future in done:
                error = future.exception()
                if error is not None:
                    for other in pending:
                        other.cancel()
                    raise error
                progress(future.result())

    def _drain(self, progress: Callable[[int], None]) -> None:
        while True:
            try:
                token, count = self.queue.get_nowait()
            except queue_module.Empty:
                return
            if token == self.token:
                progress(count)


_progress_queue: Any = None


def _worker_init(queue: Any, threads: int) -> None:
    global _progress_queue
    import pyarrow as pa

    _progress_queue = queue
    tune_allocator()
    pa.set_cpu_count(threads)
    pa.set_io_thread_count(max(threads, 2))


def _call(fn: Callable[..., None], task: tuple[Any, ...], token: int) -> int:
    """Run one task in a worker; returns the progress not sent yet."""
    pending = [0]
    last = [time.monotonic()]

    def report(n: int) -> None:  # batched: one message per ~0.2 s per worker
        pending[0] += n
        now = time.monotonic()
        if now - last[0] > 0.2:
            _progress_queue.put((token, pending[0]))
            pending[0], last[0] = 0, now

    fn(*task, progress=report)
    return pending[0]
