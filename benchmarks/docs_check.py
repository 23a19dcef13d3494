"""Rerun the quick commands of docs/*.md and compare the figures they print with the figures
written there (issue 25: a figure in the docs must come from a command anyone can rerun).

    python benchmarks/docs_check.py [--only NAME,...] [--show] [--keep DIR]

Each check is marked in its document: ``<!-- docs-check: NAME -->`` right before the fenced
block of commands it reruns (exactly as written there; ``VAR=value`` lines are substituted, a
``\\`` continues a line), and ``<!-- docs-check: NAME figures -->`` right before the block or
table of figures it compares. The commands run in a scratch folder beside ../shared (so that
``../shared/...`` resolves as from the repository root), in this process (``lakead`` through
its typer app, so no torch import per command). Words must match; numbers must agree within
the check's tolerance (a unit of the last digit printed for the percent tables; 1e-4 relative
for full-precision scores, whose last digits depend on the CPU's kernels). ``--show`` prints
what the commands gave, in the document's format, to paste where a figure changed.

Exit status 0 when every figure agrees, 1 otherwise (each difference is printed). The test
suite runs the checks that take a minute or less (tests/test_docs_figures.py, marked slow).
"""

from __future__ import annotations

import argparse
import csv
import re
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

MARK = re.compile(r"<!-- docs-check: (?P<name>[\w-]+)(?P<figures> figures)? -->")


def marked_block(doc: Path, name: str, figures: bool) -> str:
    """The fenced block (or the markdown table) right after the marker ``name`` in ``doc``."""
    lines = doc.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        m = MARK.search(line)
        if m and m["name"] == name and bool(m["figures"]) == figures:
            rest = lines[i + 1:]
            while rest and not rest[0].strip():
                rest = rest[1:]
            if rest and rest[0].startswith("```"):
                end = next(j for j in range(1, len(rest)) if rest[j].startswith("```"))
                return "\n".join(rest[1:end])
            if rest and rest[0].startswith("|"):
                return "\n".join(line for line in _takewhile(rest, lambda s: s.startswith("|")))
            raise ValueError(f"{doc}: the marker {line.strip()} is not followed by a fenced block or a table")
    raise ValueError(f"{doc}: no marker <!-- docs-check: {name}{' figures' if figures else ''} -->")


def _takewhile(lines: list[str], keep: Callable[[str], bool]) -> list[str]:
    out = []
    for line in lines:
        if not keep(line):
            break
        out.append(line)
    return out


def commands(block: str) -> list[list[str]]:
    """The ``lakead`` commands of a shell block as argument lists (variables substituted,
    continuations joined, comments dropped)."""
    env: dict[str, str] = {}
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        while words and re.fullmatch(r"\w+=.*", words[0]):  # D=...; B=... (one line may hold several)
            key, _, value = words.pop(0).rstrip(";").partition("=")
            env[key] = value.rstrip(";")
        if not words:
            continue
        words = [re.sub(r"\$(\w+)", lambda m: env[m[1]], w) for w in words]
        if words[0] != "lakead":
            raise ValueError(f"only lakead commands are rerun here, not: {line}")
        out.append(words[1:])
    return out


def run_lakead(args: list[str]) -> str:
    """``lakead ARGS`` in this process; its stdout (a failure raises with its output)."""
    from typer.testing import CliRunner

    from lakead.cli import app

    r = CliRunner().invoke(app, ["-q", *args], env={"COLUMNS": "240"})
    if r.exit_code != 0:
        raise RuntimeError(f"lakead {' '.join(args)} failed ({r.exit_code}):\n{r.output}")
    return r.stdout


# -- the checks ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    name: str
    doc: str  # under docs/ (or README.md)
    tolerance: Callable[[float], float]  # number as written -> largest allowed difference
    extra: tuple[str, ...] = ()  # added to the (last) command: a part of a slow command
    prepare: Callable[[Path], None] | None = None  # before the commands, in the scratch folder
    result: Callable[[Path, list[str]], str] | None = None  # the figures from the outputs (default: stdout)
    select: Callable[[str], bool] = lambda line: True  # which lines of the figures block are compared


def _percent(value: float) -> float:
    return 0.1 + 1e-9  # one unit of the last digit (rounding on another CPU)


def _scores(value: float) -> float:
    return max(abs(value) * 1e-4, 1e-6)


def _medical_data(work: Path) -> None:
    from medical_example import build

    build(work / "runs" / "medical" / "data")  # what `python benchmarks/medical_example.py --out runs/medical` builds first


def _medical_scores(work: Path, _: list[str]) -> str:
    return (work / "runs" / "medical" / "pred-nii-nii" / "scores.csv").read_text(encoding="utf-8").rstrip("\n")


def _eval_table(work: Path, _: list[str]) -> str:
    text = (work / "runs" / "benchmarks" / "eval" / "report.md").read_text(encoding="utf-8")
    return "\n".join(line for line in text.splitlines() if line.startswith("| mpdd/metal_plate ("))


def _decisions_line(work: Path, stdout: list[str]) -> str:
    regions = list(csv.DictReader((work / "out" / "regions.csv").open(newline="", encoding="utf-8")))
    with_region = {r["path"] for r in regions}
    masks = sorted((work / "out" / "masks").rglob("*.png"))
    defective = sum(1 for p in with_region if "/defective/" in p)
    good = sum(1 for p in with_region if "/good/" in p)
    printed = stdout[-1].strip().split(";")[0]
    return f"{printed}\n{len(masks)} masks; defective images with a region: {defective}; good images with a region: {good}"


CHECKS = {
    c.name: c
    for c in (
        Check("benchmarks-eval", "BENCHMARKS.md", _percent, extra=("--categories", "mpdd/metal_plate"),
              result=_eval_table, select=lambda line: line.startswith("| mpdd/metal_plate (")),
        Check("medical-nifti", "MEDICAL.md", _scores, prepare=_medical_data, result=_medical_scores),
        Check("decisions-cli", "DECISIONS.md", _scores, result=_decisions_line),
    )
}
#: The checks the test suite runs (a minute or less each on 2 CPU cores).
QUICK = ("benchmarks-eval", "medical-nifti", "decisions-cli")


def tokens(text: str) -> list[str | float]:
    """Words and numbers, in order (a number: digits with an optional sign, point and exponent)."""
    out: list[str | float] = []
    for t in re.findall(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?|[^\s\d|,]+", text):
        try:
            out.append(float(t))
        except ValueError:
            out.append(t)
    return out


def differences(expected: str, actual: str, tolerance: Callable[[float], float]) -> list[str]:
    """Line by line: what differs, as ``doc: ...`` / ``now: ...`` pairs."""
    exp, act = expected.splitlines(), actual.splitlines()
    problems = []
    if len(exp) != len(act):
        problems.append(f"{len(exp)} lines in the doc, {len(act)} now")
    for e, a in zip(exp, act):
        te, ta = tokens(e), tokens(a)
        same = len(te) == len(ta) and all(
            (isinstance(x, float) and isinstance(y, float) and abs(x - y) <= tolerance(x)) or x == y for x, y in zip(te, ta))
        if not same:
            problems.append(f"doc: {e}\n  now: {a}")
    return problems


def run_check(check: Check, scratch: Path) -> tuple[str, str]:
    """Run a check's commands in ``scratch``; ``(expected, actual)`` figures."""
    doc = REPO / ("README.md" if check.doc == "README.md" else f"docs/{check.doc}")
    cmds = commands(marked_block(doc, check.name, figures=False))
    expected = "\n".join(line for line in marked_block(doc, check.name, figures=True).splitlines() if check.select(line))
    work = scratch / "work"
    work.mkdir(parents=True)
    (scratch / "shared").symlink_to(SHARED.resolve(), target_is_directory=True)
    import os

    here = Path.cwd()
    os.chdir(work)
    try:
        if check.prepare is not None:
            check.prepare(work)
        printed = []
        for i, args in enumerate(cmds):
            printed += run_lakead([*args, *(check.extra if i == len(cmds) - 1 else ())]).splitlines()
        actual = check.result(work, printed) if check.result is not None else "\n".join(printed)
    finally:
        os.chdir(here)
    return expected, actual


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=None, help=f"comma-separated checks (default: all): {', '.join(CHECKS)}")
    ap.add_argument("--show", action="store_true", help="print what the commands gave, in the doc's format")
    ap.add_argument("--keep", type=Path, default=None, help="run in this folder (kept) instead of a temporary one")
    args = ap.parse_args(argv)
    names = args.only.split(",") if args.only else list(CHECKS)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        ap.error(f"no check {', '.join(unknown)}; there are {', '.join(CHECKS)}")
    if not (SHARED / "data").is_dir():
        print(f"docs_check: {SHARED / 'data'} is absent: nothing to rerun", file=sys.stderr)
        return 1
    failed = 0
    for name in names:
        check = CHECKS[name]
        scratch = (args.keep / name) if args.keep else Path(tempfile.mkdtemp(prefix=f"docs-check-{name}-"))
        if args.keep and scratch.exists():
            shutil.rmtree(scratch)
        scratch.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        try:
            expected, actual = run_check(check, scratch)
        finally:
            if not args.keep:
                shutil.rmtree(scratch, ignore_errors=True)
        problems = differences(expected, actual, check.tolerance)
        print(f"{name} ({check.doc}, {time.perf_counter() - t0:.0f} s): "
              + ("the figures agree" if not problems else f"{len(problems)} difference(s)"))
        for p in problems:
            print("  " + p)
        if args.show:
            print(actual)
        failed += bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
