"""Where lakead may write an output directory: one policy, followed by every command that writes one.

An output directory (a model, an export, an explain report, an evaluation, an ablation or
baselines table, a saved backbone) is built under a temporary name and renamed into place when
complete (:func:`~lakead.fileio.atomic_directory`): the old copy stays until the new one is whole.

An existing ``--out`` is replaced only when it holds nothing but what lakead itself wrote
there: an output of the same kind, recognised by its marker file (a model's ``lakead.json``, an
export's ``lakead-export.json``, ...), and no entry that kind does not write. Anything else (a
folder of images, notes, another kind of output, an empty marker) is refused with one line naming
the folder and a few of the names in it. An ``--out`` that is an input, lies inside one or holds
one is refused too. Replacing means replacing lakead's own output, never deleting a folder.

:func:`output_directory` is the one way to write such a directory; :func:`check_output` runs the
same checks early, before any work. ``lakead predict`` writes its results into a folder that may
hold other files and removes an earlier run's results only when :func:`owned_by` recognises them.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import LakeadError
from .fileio import TargetExistsError, atomic_directory, check_directory_target, recover_directory


class OutputRefused(TargetExistsError):
    """``--out`` holds something lakead did not write, or is (or holds) an input: nothing was written."""


def _format_is(name: str) -> Callable[[Any], bool]:
    return lambda doc: isinstance(doc, dict) and doc.get("format") == name


def _written_by_lakead(doc: Any) -> bool:
    """An evaluation's or a grid's JSON: its settings name the lakead version that wrote it."""
    return isinstance(doc, dict) and isinstance(doc.get("settings"), dict) and "lakead_version" in doc["settings"]


def _explain_report(doc: Any) -> bool:
    return isinstance(doc, dict) and "lakead_version" in doc and "variance" in doc


@dataclass(frozen=True)
class OutputKind:
    """One kind of directory lakead writes."""

    what: str  # how messages name it: "a lakead model"
    marker: str  # the JSON file every output of this kind holds
    recognise: Callable[[Any], bool] = field(repr=False)  # the marker's parsed content -> is it lakead's
    names: tuple[str, ...] = ()  # the entries (fnmatch patterns) it writes at the top; () = listed in the marker's "files"

    def holds(self, folder: Path) -> bool:
        """Whether ``folder`` has this kind's marker file, written by lakead."""
        marker = folder / self.marker
        if not marker.is_file():
            return False
        try:
            return bool(self.recognise(json.loads(marker.read_text(encoding="utf-8"))))
        except (OSError, UnicodeDecodeError, ValueError):
            return False

    def foreign(self, folder: Path, entries: Iterable[str]) -> list[str]:
        """The entries of ``folder`` that this kind does not write."""
        names = self.names
        if not names:
            try:
                names = tuple(json.loads((folder / self.marker).read_text(encoding="utf-8")).get("files", ()))
            except (OSError, ValueError, AttributeError):
                names = ()
            names = (self.marker, *names)
        return [e for e in entries if not any(fnmatch.fnmatchcase(e, p) for p in names)]


MODEL = OutputKind("a lakead model", "lakead.json", _format_is("lakead-model"),
                   ("lakead.json", "tensors.safetensors", "versions"))  # versions/: lakead.line.versions
EXPORT = OutputKind("a lakead export", "lakead-export.json", _format_is("lakead-export"),
                    ("lakead-export.json", "model.onnx", "model.xml", "model.bin",  # one graph; bf16: the backbone's and the head's
                     "backbone.onnx", "backbone.xml", "backbone.bin", "head.onnx", "head.xml", "head.bin"))
REPORT = OutputKind("a lakead explain report", "report.json", _explain_report, ("report.json", "index.html", "img"))
EVALUATION = OutputKind("a lakead evaluation", "metrics.json", _written_by_lakead,
                        ("metrics.json", "metrics.csv", "scores.csv", "report.md", "figures", "overlays", "maps"))
ABLATION = OutputKind("a lakead ablation", "ablation.json", _written_by_lakead, ("ablation.json", "ablation.csv", "ablation.md"))
BASELINES = OutputKind("a lakead baselines table", "baselines.json", _written_by_lakead,
                       ("baselines.json", "baselines.csv", "baselines.md"))
BACKBONE_FORMAT = "lakead-backbone"
BACKBONE = OutputKind("a backbone saved by lakead download-backbone", "lakead-backbone.json", _format_is(BACKBONE_FORMAT))
RESULTS = OutputKind("the results of a lakead predict run", "run.json", _format_is("lakead-predict-run"),
                     ("run.json", "scores.csv", "errors.csv", "regions.csv", "overlays", "maps", "masks"))
TUNING = OutputKind("a lakead tuning (lakead tune)", "tuning.json", _written_by_lakead,
                    ("tuning.json", "candidates.csv", "candidates.md", "model"))
#: Every kind, to say which one a folder holds.
KINDS = (MODEL, EXPORT, REPORT, EVALUATION, ABLATION, BASELINES, BACKBONE, RESULTS, TUNING)
#: Names shown when a folder is refused; the rest are counted.
SHOWN = 4


def owned_by(path: str | os.PathLike) -> OutputKind | None:
    """The kind of lakead output ``path`` holds (by its marker file), or None."""
    return next((kind for kind in KINDS if kind.holds(Path(path))), None)


def grid_kind(title: str) -> OutputKind:
    """The output of a grid of settings (``lakead ablate``, ``lakead baselines``) titled ``title``."""
    known = {"ablation": ABLATION, "baselines": BASELINES}
    if title in known:
        return known[title]
    return OutputKind(f"a lakead {title} table", f"{title}.json", _written_by_lakead,
                      tuple(f"{title}.{ext}" for ext in ("json", "csv", "md")))


def _names(entries: list[str]) -> str:
    shown = ", ".join(sorted(entries)[:SHOWN])
    return shown + (f" and {len(entries) - SHOWN} more" if len(entries) > SHOWN else "")


def _inside(inner: str, outer: str) -> bool:
    return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)


def check_inputs(out: str | os.PathLike, inputs: Iterable[str | os.PathLike], *, inside: bool = True,
                 holds: bool = True) -> None:
    """Refuse an ``out`` that is an input, lies inside one (unless not ``inside``), or holds one
    (unless not ``holds``), by real path. ``lakead predict``, which replaces no folder, allows
    the two last for its images (its results inside the image folder are not listed as input)."""
    real = os.path.realpath(out)
    for item in inputs:
        r = os.path.realpath(item)
        if r == real:
            raise OutputRefused(f"--out {out}: is the input {item}; give a new folder for the output")
        if inside and _inside(real, r):
            raise OutputRefused(f"--out {out}: is inside the input {item}; give a folder outside it")
        if holds and _inside(r, real):
            raise OutputRefused(f"--out {out}: holds the input {item}, which replacing it would delete; give another folder")


def check_output(out: str | os.PathLike, kind: OutputKind, *, inputs: Iterable[str | os.PathLike] = ()) -> None:
    """Raise :class:`OutputRefused` unless ``out`` may become ``kind``'s output directory: it is
    missing, empty, or holds only an earlier output of the same kind; and it is no input, inside
    none and holds none. Call it before the work; :func:`output_directory` calls it again."""
    check_directory_target(out)
    check_inputs(out, inputs)
    folder = Path(out)
    recover_directory(folder)
    if folder.is_symlink():
        raise OutputRefused(f"--out {out}: is a symbolic link ({os.readlink(folder)}); give the folder itself or a new one")
    if not folder.is_dir():
        return
    try:
        entries = os.listdir(folder)
    except OSError as exc:
        raise OutputRefused(f"--out {out}: cannot be read ({exc.strerror or exc})") from None
    if not entries:
        return
    if not kind.holds(folder):
        found = owned_by(folder)
        if found is not None:
            raise OutputRefused(f"--out {out}: holds {found.what}, not {kind.what}; give another folder")
        raise OutputRefused(f"--out {out}: holds files lakead did not write ({_names(entries)}); "
                            f"lakead replaces only {kind.what} there: give a new folder")
    foreign = kind.foreign(folder, entries)
    if foreign:
        raise OutputRefused(f"--out {out}: holds {kind.what} and files lakead did not write ({_names(foreign)}); "
                            "move them or give another folder")


@contextlib.contextmanager
def output_directory(out: str | os.PathLike, kind: OutputKind, *,
                     inputs: Iterable[str | os.PathLike] = ()) -> Iterator[Path]:
    """Build ``kind``'s output under a temporary name (yielded) and put it at ``out`` when
    complete, replacing an earlier output of the same kind there; checked (:func:`check_output`)
    before and again just before the swap."""
    inputs = list(inputs)
    check_output(out, kind, inputs=inputs)
    with atomic_directory(out, before_replace=lambda: check_output(out, kind, inputs=inputs)) as tmp:
        yield tmp


def write_backbone_marker(folder: str | os.PathLike, **facts: Any) -> None:
    """Write ``lakead-backbone.json`` into a saved backbone: ``facts`` and every entry of
    ``folder`` now (what a later download may replace); call it last, when the folder is complete."""
    from ._version import __version__

    root = Path(folder)
    files = sorted(e for e in os.listdir(root) if e != BACKBONE.marker)
    doc = {"format": BACKBONE_FORMAT, "lakead_version": __version__, **facts, "files": files}
    (root / BACKBONE.marker).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")


def refuse_foreign_results(out: str | os.PathLike) -> None:
    """For ``predict --overwrite``: refuse when ``out`` holds entries named like a run's results
    (``scores.csv``, ``overlays/``, ...) that no earlier run recognisably wrote (no ``run.json``)."""
    folder = Path(out)
    if not folder.is_dir() or owned_by(folder) is RESULTS:
        return
    clash = [n for n in RESULTS.names if os.path.lexists(folder / n)]
    if clash:
        raise OutputRefused(f"--out {out}: holds {_names(clash)} that no lakead predict run wrote there (no run.json); "
                            "--overwrite replaces only lakead's own results: move them or give another folder")


__all__ = ["ABLATION", "BACKBONE", "BASELINES", "EVALUATION", "EXPORT", "KINDS", "MODEL", "REPORT", "RESULTS",
           "OutputKind", "OutputRefused", "check_inputs", "check_output", "grid_kind", "output_directory", "owned_by",
           "refuse_foreign_results", "write_backbone_marker"]
