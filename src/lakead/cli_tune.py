"""``lakead tune``: choose the method and its configuration from normal images alone, on
synthetic defects (:mod:`lakead.selection`; registered on the app of :mod:`lakead.cli_common`,
imported by :mod:`lakead.cli`)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from .api import Runtime
from .errors import CONTROL_CHARACTERS, printable
from .fields import SHARED_OPTIONS
from .options import runtime_options
from .outputs import TUNING, check_output
from .cli_common import app, check_hub, err, errors_as_messages, out, state


def candidate_layers(value: Optional[str], backbone) -> list:
    """``--layer`` of tune: candidates separated by commas, blocks of one candidate joined by
    ``+`` (``365+400,426``: two candidates). Default on a numbered backbone: the blocks at 1/2
    and 3/4 of the depth and the last; an ONNX model needs them given."""
    if value:
        out_ = []
        for part in (p.strip() for p in value.split(",")):
            if not part:
                continue
            blocks = [int(b) if b.strip().isdigit() and backbone.info.num_layers else b.strip() for b in part.split("+")]
            out_.append(blocks if len(blocks) > 1 else blocks[0])
        if not out_:
            raise typer.BadParameter("no block given", param_hint="--layer")
        return out_
    n = backbone.info.num_layers
    if n < 1:
        backbone.resolve_layer(None)  # raises, listing the tensors an ONNX model offers
    return sorted({max(1, round(0.5 * n)), max(1, round(0.75 * n)), n})


@app.command()
@runtime_options()
def tune(
    normal: list[Path] = typer.Argument(..., help="Folders (searched recursively) or files of normal images.", show_default=False),
    class_name: str = typer.Option(..., "--class-name", "-c", help="What the images show, e.g. 'screw'."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Directory to write to: model/ (the chosen configuration "
                                 "fitted on every image), tuning.json, candidates.md and candidates.csv. A new folder, or "
                                 "one holding only an earlier tuning; anything else is refused."),
    backbone: str = typer.Option(SHARED_OPTIONS["backbone"][0], help=SHARED_OPTIONS["backbone"][1]),
    layer: Optional[str] = typer.Option(None, help="Candidate blocks, comma-separated; '+' joins the blocks of one candidate "
                                        "(365+400,426). Default: 1/2 and 3/4 of the depth and the last block; ONNX: tensor names."),
    image_size: Optional[int] = typer.Option(None, min=1, help=SHARED_OPTIONS["image_size"][1]),
    shots: Optional[int] = typer.Option(None, min=1, help="Use only this many normal images (default: all)."),
    seed: int = typer.Option(0, help="Seed of the shots (with --shots) and of the synthetic defects."),
    folds: int = typer.Option(4, min=2, help="Groups of support images, each held out in turn."),
    defects_per_image: Optional[int] = typer.Option(None, min=1, help="Synthetic defects made on each held-out image "
                                                    "(default: 2, more on few images: at least 32 in all)."),
    budget_seconds: Optional[float] = typer.Option(None, min=0, help="Stop scoring candidates after this many seconds "
                                                   "(the first is always scored; the rest listed as not scored)."),
    false_alarm_rate: float = typer.Option(SHARED_OPTIONS["false_alarm_rate"][0], help=SHARED_OPTIONS["false_alarm_rate"][1]),
    *,
    runtime: Runtime,
) -> None:
    """Choose the method and configuration from normal images alone: score candidate configurations
    (LAKE, LAKE with cosine distance, AnomalyDINO, the residual subspace; per candidate block) on
    synthetic defects of held-out normal images, fit the best on every image (docs/SELECTION.md)."""
    from .backbones import load_backbone
    from .data import select_shots
    from .images import list_images
    from .methods.lake.config import LakeConfig
    from .selection import default_candidates, tune as run_tune
    from .selection.output import write_tuning

    if CONTROL_CHARACTERS.search(class_name):
        raise typer.BadParameter(f"has a control character: '{printable(class_name)}'; give printable text", param_hint="--class-name")
    with errors_as_messages():
        check_output(out_dir, TUNING, inputs=normal)
        base = LakeConfig(backbone=backbone, image_size=image_size, false_alarm_rate=false_alarm_rate, use_text=False).validate()
        check_hub(base)
        chosen, rule = select_shots(list_images(normal), shots, seed if shots else None)
        bb = load_backbone(backbone, need_text=False)
        bb.to(runtime.validate().torch_device())
        candidates = default_candidates(candidate_layers(layer, bb))
        log = logging.getLogger("lakead")
        log.info("support set: %s; %d candidates", rule, len(candidates))

        def shown(r) -> None:
            if not state["quiet"]:
                err.print(f"  {r.candidate.label}: synthetic image AUROC {100 * r.image_auroc:.1f}, separation "
                          f"{r.separation:.2f}, pixel AUROC {100 * r.pixel_auroc:.1f} ({r.seconds:.1f} s)", highlight=False, markup=False)

        result = run_tune([str(p) for p in chosen], class_name, candidates, base, backbone=bb, runtime=runtime,
                          support_rule=rule, folds=folds, defects_per_image=defects_per_image, seed=seed,
                          budget_seconds=budget_seconds, on_candidate=shown)
        doc = write_tuning(result, out_dir, inputs=normal, command=" ".join(sys.argv))
    out.print(f"chosen: {doc['chosen']['candidate']} ({doc['chosen']['why']})", highlight=False, markup=False, soft_wrap=True)
    out.print(f"written to {out_dir}: model/, tuning.json, candidates.md, candidates.csv ({result.seconds['total']:.0f} s)",
              highlight=False, markup=False, soft_wrap=True)

