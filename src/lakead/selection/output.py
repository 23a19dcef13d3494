"""What ``lakead tune --out DIR`` writes (one directory, built under a temporary name and put in
place when complete, :func:`lakead.outputs.output_directory`): ``model/`` (the chosen candidate
fitted on every support image, a lakead model directory), ``tuning.json`` (the settings, every
candidate's synthetic scores, the choice and why, the times), and the same table as
``candidates.md`` and ``candidates.csv``."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .._version import __version__
from ..errors import LakeadError
from ..outputs import TUNING, output_directory
from .search import TuneResult


def _num(v: float) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{100 * v:.1f}"


def tuning_doc(result: TuneResult, *, command: str | None = None) -> dict[str, Any]:
    """The content of ``tuning.json``."""
    c = result.chosen
    return {
        "settings": {"lakead_version": __version__, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                     "command": command, **result.settings},
        "chosen": {"candidate": c.candidate.label, "method": c.candidate.method, "options": c.candidate.options,
                   "synthetic_image_auroc": c.image_auroc, "synthetic_separation": c.separation,
                   "synthetic_pixel_auroc": c.pixel_auroc,
                   "why": f"{result.settings['rule']}: image AUROC {_num(c.image_auroc)}, separation {c.separation:.2f} "
                          f"of {sum(r.scored for r in result.results)} candidates scored"},
        "candidates": [r.row() for r in result.results],
        "seconds": result.seconds,
    }


def candidates_markdown(doc: dict[str, Any]) -> str:
    s = doc["settings"]
    lines = [f"# lakead tune: {doc['chosen']['candidate']}", "",
             f"{s['support_images']} support images, {s['folds']} folds, {s['synthetic_images']} synthetic defects "
             f"({', '.join(s['kinds'])}), seed {s['seed']}; {doc['chosen']['why']}. Times (s): "
             + ", ".join(f"{k} {v}" for k, v in doc["seconds"].items()) + ".", "",
             "| candidate | synthetic image AUROC | separation | synthetic pixel AUROC | image AUROC per fold | seconds | chosen |",
             "|---|---:|---:|---:|---|---:|---|"]
    for r in doc["candidates"]:
        folds = " ".join(f"{100 * f:.1f}" if math.isfinite(f) else "-" for f in r["folds"]) if r["scored"] else "not scored (budget)"
        chosen = "**yes**" if r["candidate"] == doc["chosen"]["candidate"] else ""
        sep = r["synthetic_separation"]
        lines.append(f"| {r['candidate']} | {_num(r['synthetic_image_auroc'])} | {'-' if not math.isfinite(sep) else f'{sep:.2f}'} | "
                     f"{_num(r['synthetic_pixel_auroc'])} | "
                     f"{folds} | {r['seconds']} | {chosen} |")
    return "\n".join(lines) + "\n"


def candidates_csv(doc: dict[str, Any]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["candidate", "method", "options", "synthetic_image_auroc", "synthetic_separation", "synthetic_pixel_auroc", "folds",
                "seconds", "scored", "chosen"])
    for r in doc["candidates"]:
        w.writerow([r["candidate"], r["method"], json.dumps(r["options"]), r["synthetic_image_auroc"], r["synthetic_separation"],
                    r["synthetic_pixel_auroc"],
                    " ".join(map(str, r["folds"])), r["seconds"], r["scored"], r["candidate"] == doc["chosen"]["candidate"]])
    return buf.getvalue()


def write_tuning(result: TuneResult, out: str | Path, *, inputs: Iterable[str | Path] = (), command: str | None = None
                 ) -> dict[str, Any]:
    """Write ``out`` (see the module docstring); refuses a folder holding anything lakead did not
    write there (:func:`lakead.outputs.check_output`). Returns the ``tuning.json`` content."""
    doc = tuning_doc(result, command=command)
    with output_directory(out, TUNING, inputs=inputs) as tmp:
        result.detector.save(tmp / "model")
        (tmp / "candidates.md").write_text(candidates_markdown(doc), encoding="utf-8")
        (tmp / "candidates.csv").write_text(candidates_csv(doc), encoding="utf-8")
        (tmp / "tuning.json").write_text(json.dumps(doc, indent=2, default=str) + "\n", encoding="utf-8")
    return doc


def read_tuning(folder: str | Path) -> dict[str, Any]:
    """``tuning.json`` of a folder written by :func:`write_tuning`; a :class:`LakeadError` naming
    the file when it cannot be read or lacks what tune writes."""
    path = Path(folder) / "tuning.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        doc["chosen"]["candidate"], doc["chosen"]["why"], doc["candidates"], doc["seconds"]  # noqa: B018
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LakeadError(f"{path}: not a tuning lakead wrote ({type(exc).__name__}: {exc})") from None
    return doc
