"""Argument parsing and error handling shared by the entry points."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from elcrec_dist.errors import EXIT_BUG, EXIT_OK, failure_of

if TYPE_CHECKING:
    from elcrec_dist.inference import TrainedModel
    from elcrec_dist.prepared import DatasetInfo


def config_arguments(parser: argparse.ArgumentParser, *, config_required: bool = True) -> None:
    parser.add_argument(
        "--config",
        required=config_required,
        action="append",
        help="experiment YAML (see configs/); repeat to layer files, "
        "e.g. a dataset config then configs/variants/sasrec.yaml",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.epochs=5 "
        "(repeatable; applied after the file)",
    )
    parser.add_argument("--data", help="prepared dataset folder or URL (overrides data.path)")


def trained_model_arguments(parser: argparse.ArgumentParser, *, data_help: str) -> None:
    """RUN, --data and --output of the commands that start from a trained model."""
    parser.add_argument("run", metavar="RUN", help="run folder (best_model.pt) or a model file")
    parser.add_argument("--data", help=f"{data_help} (default: the model's data.path)")
    parser.add_argument("--output", required=True, help="output folder or s3:// URL (new or empty)")


def trained_model_and_data(run: str, data: str | None) -> tuple[TrainedModel, str, DatasetInfo]:
    """The model of ``run`` (with its stored config), the dataset URL (``data``, else the
    model's ``data.path``) and that dataset's info, checked to be the model's catalogue."""
    from elcrec_dist.config import ConfigError
    from elcrec_dist.inference import check_catalogue, load_trained
    from elcrec_dist.prepared import read_info

    trained = load_trained(run)
    url = data or trained.config.data.path
    if not url:
        raise ConfigError("no dataset: pass --data (the model's config names none)")
    info = read_info(url)
    check_catalogue(trained, info, data=url)
    return trained, url, info


def print_json_line(payload: Mapping[str, object]) -> None:
    """The machine-readable result: one JSON object as the last stdout line."""
    sys.stdout.flush()
    print(json.dumps(payload), flush=True)


def run_main(main: Callable[[], int], *, hard_exit: bool = False) -> None:
    """Run ``main`` and exit with the documented code for whatever it raised
    (``elcrec_dist.errors.failure_of``): a known failure family prints one line, ``error: ...``,
    and exits 2 or 75; anything else is a bug and keeps its traceback (exit 1).

    ``hard_exit`` ends the process with ``os._exit`` once output is flushed, skipping the
    interpreter's shutdown: there, Arrow's I/O threads can drop the last reference to a Python
    file object after the interpreter lock is gone, which aborts the process (exit 250 after a
    successful run; seen on one of two ranks in about one run in ten), and a C++ thread still
    joinable at exit aborts it too ("terminate called without an active exception", exit -6,
    seen once after ``evaluate.py`` had printed its error). Under a scheduler that turns a
    finished run into a retried one and a permanent error into a crash, so every entry point
    that loads torch or Arrow uses it.
    """
    try:
        code = main()
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        failure = failure_of(exc)
        if failure.code == EXIT_BUG:
            raise
        print(f"error: {failure.message}", file=sys.stderr)
        code = failure.code
    code = code if code is not None else EXIT_OK
    if hard_exit:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
