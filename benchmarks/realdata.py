"""What the real-image benchmarks share (decisions.py, ranking.py, shift.py): the data and the
backbone they read, as command-line options."""

from __future__ import annotations

import argparse
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def add_options(ap: argparse.ArgumentParser) -> None:
    """``--data`` (MVTec layout, default ../shared/data), ``--model`` (the MobileNetV2 ONNX of
    ../shared/models), ``--layer`` (tensor, default 400) and ``--k`` (sensitive neurons, default 32)."""
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--model", default=str(REPO.parent / "shared" / "models" / "mobilenetv2-12-int8.onnx"))
    ap.add_argument("--layer", default="400")
    ap.add_argument("--k", type=int, default=32)
