"""``lakead layers BACKBONE``: every block ``--layer`` can read on a backbone (its name, channels
and token grid), and the checks the fit makes of its blocks and class name before any work
(registered on the app of :mod:`lakead.cli_common`; :mod:`lakead.cli` imports this module)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from .cli_common import app, check_hub, errors_as_messages, loading, out
from .errors import ConfigError, printable

#: Folder names that say nothing about what the images show (skipped when a class name is
#: taken from the folders).
GENERIC_FOLDERS = frozenset({"good", "train", "normal", "ok", "images", "image", "img", "imgs", "data", "test", "."})


@app.command()
def layers(
    backbone: str = typer.Argument(..., help="Hub id, local save_pretrained directory, or onnx:PATH.", show_default=False),
) -> None:
    """List every block --layer can read on BACKBONE: its name, channels and token grid."""
    from .backbones import load_backbone
    from .methods.lake import LakeConfig

    with errors_as_messages():
        check_hub(LakeConfig(backbone=backbone))
        with loading(f"the backbone {backbone}"):
            bb = load_backbone(backbone, need_text=False)
        found = bb.layers()
    default = None
    try:
        default = str(bb.default_layer())
    except ConfigError:  # an ONNX backbone has none
        pass
    size = bb.info.image_size
    table = Table(title=f"{bb.info.source}: {len(found)} layers --layer can read (grids at its {size} x {size} input)",
                  title_justify="left")
    for name, justify in (("--layer", "left"), ("channels", "right"), ("grid (H x W)", "right"), ("", "left")):
        table.add_column(name, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for lay in found:
        note = "; ".join(x for x in ("default" if lay.name == default else "", lay.note) if x)
        table.add_row(escape(printable(lay.name)), str(lay.channels), f"{lay.grid[0]} x {lay.grid[1]}", escape(note))
    out.print(table)


def check_blocks(det: Any) -> None:
    """Resolve the configured blocks on the detector's loaded backbone now: a bad ``--layer``
    is one message (naming ``lakead layers``) before any image is read."""
    for block in getattr(det.config, "blocks", ()) or ():
        if block is not None:
            det.backbone.resolve_layer(block)


def needs_class_name(det: Any, method: Any) -> bool:
    """Whether the fit fills text prompts with the class name: the method needs text, or its
    text probe is on and has a text tower (the backbone's, or ``--text-backbone``'s)."""
    if getattr(method, "needs_text", False):
        return True
    cfg = det.config
    if not getattr(cfg, "use_text", False):
        return False
    return bool(det.backbone.has_text or getattr(cfg, "text_backbone", None) is not None)


def class_name_from(paths: Sequence[Path]) -> str:
    """A class name for a fit without a text probe, from the first folder's name (skipping
    names such as ``good`` or ``train``): ``data/bottle/train/good`` -> ``bottle``."""
    for p in paths[:1]:
        folder = Path(p).resolve()
        folder = folder if folder.is_dir() else folder.parent
        for part in (folder, *folder.parents):
            if part.name and part.name.lower() not in GENERIC_FOLDERS:
                return part.name
    return "object"
