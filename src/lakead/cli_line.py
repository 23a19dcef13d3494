"""On the inspection line (issue 29): ``lakead update``, ``history`` and ``rollback`` (registered
on the app of :mod:`lakead.cli_common`; :mod:`lakead.cli` imports this module). docs/LINE.md."""

from __future__ import annotations

import getpass
import json
import math
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .api import Runtime
from .cli_common import app, errors_as_messages, out, progress_bar
from .options import runtime_options

_MODEL = typer.Argument(..., help="A model directory written by 'lakead fit'.", show_default=False)


def _who(by: Optional[str]) -> Optional[str]:
    if by is not None:
        return by
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return None


def _level(v: Optional[float]) -> str:
    return "-" if v is None else "inf" if math.isinf(v) else f"{v:.4g}"


@app.command()
@runtime_options()
def update(
    model_dir: Path = _MODEL,
    add_normal: list[Path] = typer.Option(..., "--add-normal", help="Image files or folders (searched recursively) to add "
                                          "as normal: their tokens join the gallery, the decision level is derived again "
                                          "(repeat the option for several).", show_default=False),
    by: Optional[str] = typer.Option(None, help="Who asked, for the history (default: the user running the command)."),
    as_json: bool = typer.Option(False, "--json", help="Print what the update did as one JSON object."),
    *,
    runtime: Runtime,
) -> None:
    """Add normal images to a fitted model without a refit; writes a new version (lakead history)."""
    from .images import list_images
    from .line.update import update_model

    with errors_as_messages():
        paths = list_images(add_normal)
        with progress_bar("update", len(paths)) as advance:
            upd, version = update_model(model_dir, [str(p) for p in paths], by=_who(by), device=runtime.device,
                                        batch_size=runtime.batch_size, precision=runtime.precision, on_progress=advance)
    if as_json:
        print(json.dumps({**upd.to_dict(), "version": version}))
        return
    out.print(f"version {version} of {model_dir}: {len(upd.added)} image(s) added as normal ({upd.support_before} -> "
              f"{upd.support_after} support images), threshold {_level(upd.threshold_before)} -> "
              f"{_level(upd.threshold_after)}, in {upd.seconds['total']:.1f} s", highlight=False, soft_wrap=True)
    for note in upd.inexact:
        out.print(f"not as a refit: {note}", highlight=False, markup=False, soft_wrap=True)


@app.command()
def history(model_dir: Path = _MODEL,
            as_json: bool = typer.Option(False, "--json", help="Print the history as JSON.")) -> None:
    """List a model's versions: when, what was added, by whom, the threshold before and after."""
    from .line.versions import read_history

    with errors_as_messages():
        hist = read_history(model_dir)
    if as_json:
        print(json.dumps(hist, indent=2))
        return
    table = Table(title=str(model_dir), title_justify="left")
    for col in ("version", "time", "action", "added", "by", "support", "threshold"):
        table.add_column(col)
    for e in hist["versions"]:
        added = e.get("added") or []
        shown = ", ".join(added[:3]) + (f" and {len(added) - 3} more" if len(added) > 3 else "")
        mark = " (current)" if e["version"] == hist["current"] else ""
        table.add_row(f"{e['version']}{mark}", str(e.get("time") or "-"), e.get("action", "-"),
                      f"{len(added)}: {shown}" if added else "-", str(e.get("by") or "-"), str(e.get("support", "-")),
                      f"{_level(e.get('threshold_before'))} -> {_level(e.get('threshold_after'))}")
    out.print(table)
    for r in hist.get("rollbacks", []):
        out.print(f"rolled back from {r['from']} to {r['version']} at {r['time']}" + (f" by {r['by']}" if r.get("by") else ""),
                  highlight=False)


@app.command()
def rollback(model_dir: Path = _MODEL,
             version: int = typer.Argument(..., help="The version to make current again (lakead history lists them).",
                                           show_default=False),
             by: Optional[str] = typer.Option(None, help="Who asked, for the history (default: the user running the command).")) -> None:
    """Make an earlier version of a model the current one again (its files, byte for byte)."""
    from .line.versions import rollback as do_rollback

    with errors_as_messages():
        entry = do_rollback(model_dir, version, by=_who(by))
    if entry["from"] == version:
        out.print(f"version {version} of {model_dir} is already the current one", highlight=False)
    else:
        out.print(f"{model_dir}: version {version} is current again (was {entry['from']})", highlight=False)
