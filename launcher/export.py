"""Export a trained model for serving (see elcrec_dist/export.py for the files).

    python -m launcher.export RUN --output DIR [--data DIR] [--k 20]

RUN is a run folder (its best_model.pt holds the resolved config) or a model file. The dataset
(default: the model's stored data.path) gives the original item ids of items.parquet; its
catalogue must be the model's. Writes safetensors weights, Parquet item and intent tables, and
the user encoder and top-K scorer as ONNX and torch.export archives, each checked against the
PyTorch model; manifest.json last. Prints a JSON summary as the last stdout line.
"""

from __future__ import annotations

import argparse

from elcrec_dist.config import ConfigError
from elcrec_dist.export import FORMAT, export_request, write_export
from elcrec_dist.idmaps import IdMaps
from elcrec_dist.outputs import OutputFolder
from elcrec_dist.runlog import setup_console
from launcher.common import (
    print_json_line,
    run_main,
    trained_model_and_data,
    trained_model_arguments,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    trained_model_arguments(parser, data_help="prepared dataset for the id maps")
    parser.add_argument(
        "--k", type=int, default=20, help="items the top-K scorer returns (default 20)"
    )
    args = parser.parse_args()
    setup_console(main=True)

    trained, data, info = trained_model_and_data(args.run, args.data)
    if not 1 <= args.k <= info.num_items:
        raise ConfigError(f"--k {args.k} must be in 1..{info.num_items} (the catalogue)")
    idmaps = IdMaps.open(data, info)
    out = OutputFolder(args.output, kind=FORMAT,
                       request=export_request(trained, info.fingerprint(), args.k))
    if out.claim():
        print_json_line({"output": args.output, "already_complete": True})
        return 0
    manifest = write_export(trained, idmaps, out, k=args.k)
    print_json_line({"output": args.output, "files": [f["path"] for f in manifest["files"]],
                     "checks": manifest["checks"]})
    return 0


if __name__ == "__main__":
    run_main(main, hard_exit=True)
