"""The intent report of a trained model on a prepared dataset (see elcrec_dist/report.py).

    python -m launcher.intents RUN --data DIR --output DIR

RUN is a run folder (its best_model.pt holds the resolved config) or a model file; --data
defaults to the model's stored data.path. Writes report.md (per intent: users, concentration,
most typical items by original id; dead intents; planted-intent recovery where the dataset has
planted intents), intents.json, users_per_intent.png and projection.png; manifest.json last.
Prints the summary as one JSON object on the last stdout line.
"""

from __future__ import annotations

import argparse

from elcrec_dist.idmaps import IdMaps
from elcrec_dist.outputs import OutputFolder
from elcrec_dist.report import FORMAT, report_request, write_report
from elcrec_dist.runlog import setup_console
from elcrec_dist.stream import StreamingDataset
from launcher.common import (
    print_json_line,
    run_main,
    trained_model_and_data,
    trained_model_arguments,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    trained_model_arguments(parser, data_help="prepared dataset folder or URL")
    args = parser.parse_args()
    setup_console(main=True)

    trained, url, info = trained_model_and_data(args.run, args.data)
    data = StreamingDataset.open(url, info=info)
    idmaps = IdMaps.open(url, data.info)
    out = OutputFolder(
        args.output, kind=FORMAT, request=report_request(trained, data.info.fingerprint())
    )
    if out.claim():
        print_json_line({"output": args.output, "already_complete": True})
        return 0
    summary = write_report(trained, data, idmaps, out, batch_size=trained.config.eval.batch_size)
    print_json_line({"output": args.output, **summary})
    return 0


if __name__ == "__main__":
    run_main(main, hard_exit=True)
