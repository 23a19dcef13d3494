"""Scoring many image files and writing the results to a directory.

Layout of an output directory::

    scores.csv            path, score, visual, semantic, anomalous (one row per scored image)
    errors.csv            path, error (only when some inputs could not be read)
    overlays/<name>.png   the heat map over the image
    maps/<name>.npy       the raw float32 map at the image's own size

``<name>`` is the image's path relative to the common folder of all inputs, so that
``test/crack/000.png`` and ``test/good/000.png`` do not overwrite each other. Images are read
and scored one batch at a time, so memory does not grow with the number of images; each
overlay and map is written atomically and ``scores.csv`` grows a batch at a time.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .detector import LakeDetector
from .errors import ImageLoadError
from .fileio import atomic_write_bytes, atomic_write_text
from .viz import npy_bytes, overlay, png_bytes

SCORES_FILE = "scores.csv"
ERRORS_FILE = "errors.csv"
SCORE_COLUMNS = ("path", "score", "visual", "semantic", "anomalous")


@dataclass
class BatchSummary:
    """What a :func:`predict_to_dir` run did."""

    scored: int = 0
    anomalous: int = 0
    errors: list[tuple[str, str]] = field(default_factory=list)  # (path, problem)
    threshold: float = float("nan")


def output_names(paths: Sequence[Path]) -> list[str]:
    """Names of output files: each path relative to the common folder of all paths, suffix dropped."""
    if not paths:
        return []
    absolute = [p.resolve() for p in paths]
    root = Path(os.path.commonpath([str(p.parent) for p in absolute]))
    return [str(p.relative_to(root).with_suffix("")) for p in absolute]


def predict_to_dir(
    detector: LakeDetector,
    paths: Sequence[Path],
    out_dir: Path,
    *,
    threshold: float | None = None,
    write_overlays: bool = True,
    write_maps: bool = True,
    on_progress: Callable[[int], None] | None = None,
    on_error: Callable[[str, str], None] | None = None,
) -> BatchSummary:
    """Score ``paths`` and write the results to ``out_dir`` (layout in the module docstring).

    Unreadable inputs are reported through ``on_error(path, problem)``, listed in
    ``errors.csv`` and skipped; the others are still scored.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    names = output_names(paths)
    summary = BatchSummary(threshold=detector.threshold_ if threshold is None else float(threshold))
    vmin, vmax = detector.map_range_
    bs = detector.config.batch_size
    scores_path = out_dir / SCORES_FILE
    with scores_path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(SCORE_COLUMNS)
        fh.flush()
        for start in range(0, len(paths), bs):
            chunk = list(range(start, min(start + bs, len(paths))))
            arrays, kept = [], []
            for i in chunk:
                try:
                    arrays.append(detector.read_image(paths[i], str(paths[i])))
                    kept.append(i)
                except ImageLoadError as exc:
                    summary.errors.append((str(paths[i]), exc.problem))
                    if on_error is not None:
                        on_error(str(paths[i]), exc.problem)
            if arrays:
                pred = detector.predict(arrays, names=[str(paths[i]) for i in kept], threshold=threshold)
                for j, (arr, i) in enumerate(zip(arrays, kept)):
                    writer.writerow([
                        str(paths[i]), f"{pred.scores[j]:.6g}", f"{pred.visual[j]:.6g}", f"{pred.semantic[j]:.6g}",
                        str(bool(pred.anomalous[j])).lower(),
                    ])
                    summary.scored += 1
                    summary.anomalous += int(pred.anomalous[j])
                    if write_overlays:
                        atomic_write_bytes(out_dir / "overlays" / f"{names[i]}.png", png_bytes(overlay(arr, pred.maps[j], vmin, vmax)))
                    if write_maps:
                        atomic_write_bytes(out_dir / "maps" / f"{names[i]}.npy", npy_bytes(pred.maps[j]))
                fh.flush()
            if on_progress is not None:
                on_progress(len(chunk))
    errors_path = out_dir / ERRORS_FILE
    if summary.errors:
        lines = [["path", "error"], *summary.errors]
        atomic_write_text(errors_path, "".join(_csv_line(row) for row in lines))
    elif errors_path.exists():
        errors_path.unlink()
    return summary


def _csv_line(row: Sequence[str]) -> str:
    import io

    buf = io.StringIO()
    csv.writer(buf).writerow(row)
    return buf.getvalue()
