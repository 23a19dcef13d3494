"""``lakead-runtime``: score images with an exported model on a machine without torch.

On the torch-free install (docs/DEPLOY.md) the ``lakead`` command only says what to install (its
command line imports the torch detectors); this one needs only :mod:`lakead.runtime` and :mod:`lakead.batch`, and
writes the same ``scores.csv``, overlays, maps and masks as ``lakead predict``::

    lakead-runtime predict exported/ images/ --out results/
    lakead-runtime info exported/

Exit status: 0 on success; 1 when an error stopped it or some inputs could not be read; 2 for
a usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .errors import LakeadError


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lakead-runtime", description="Run a model written by 'lakead export' (no torch needed).")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="Score images; write scores.csv, overlays/ and maps/ to --out.")
    p.add_argument("model", help="A directory written by 'lakead export'.")
    p.add_argument("inputs", nargs="+", help="Image files or folders (searched recursively).")
    p.add_argument("--out", "-o", required=True, help="Directory for scores.csv, overlays/ and maps/.")
    p.add_argument("--threshold", type=float, default=None, help="Decision threshold for this run (default: the model's).")
    p.add_argument("--maps", default="png,npy", help="Map files to write: png, npy, png,npy or none.")
    p.add_argument("--masks", action="store_true", help="Also write masks/ and regions.csv.")
    earlier = p.add_mutually_exclusive_group()
    earlier.add_argument("--resume", action="store_true", help="Keep the rows already in --out/scores.csv and score the others.")
    earlier.add_argument("--overwrite", action="store_true", help="Replace the results of an earlier run in --out (scores.csv, "
                         "overlays/, maps/, ...; other files are left alone); without it or --resume such a folder is refused.")
    p.add_argument("--engine", choices=("onnxruntime", "openvino"), default=None, help="Default: onnxruntime for ONNX, openvino for IR.")
    p.add_argument("--batch-size", type=int, default=None, help="Images per graph call (a fixed-batch export uses its own).")
    p.add_argument("--threads", type=int, default=None, help="Intra-op threads of the engine (default: the engine's).")
    i = sub.add_parser("info", help="Print what an exported model holds.")
    i.add_argument("model")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .runtime import ExportedDetector, read_export_meta

    try:
        if args.command == "info":
            det = ExportedDetector.load(args.model)
            print(json.dumps({**det.summary(), "check": read_export_meta(args.model).get("check")}, indent=2, default=str))
            return 0
        from .batch import predict_to_dir

        det = ExportedDetector.load(args.model, engine=args.engine, batch_size=args.batch_size, threads=args.threads)

        def report(path: str, problem: str) -> None:
            print(f"cannot read {path}: {problem}", file=sys.stderr)

        summary = predict_to_dir(det, args.inputs, args.out, threshold=args.threshold, maps=args.maps, masks=args.masks,
                                 resume=args.resume, overwrite=args.overwrite, on_error=report)
    except LakeadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # the output folder or a file: read-only, full disk, permissions
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    print(f"scored {summary.scored} image(s), {summary.anomalous} above the threshold {summary.threshold:.4g}; "
          f"results in {args.out}/scores.csv; ran {det.ran}")
    return 1 if summary.failed else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
