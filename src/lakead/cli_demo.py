"""``lakead demo``: the first run of the README, on one category folder in the MVTec layout:
fit on its normal images, score its test images, say where the results are (registered on
the app of :mod:`lakead.cli_common`; :mod:`lakead.cli` imports this module).

The backbone is the default CLIP when it can be had (the Hugging Face Hub is reachable, or the
model is in the cache). Without network and without a cached copy, the demo says so and uses a
tiny CLIP with random weights written next to the results: the whole pipeline runs for real
on the images, but its scores mean nothing. ``--backbone`` picks any other backbone.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from .api import Runtime
from .cli_common import DEFAULT_BACKBONE, app, err, errors_as_messages, fail, loading, model_options, out, progress_bar
from .errors import printable
from .methods.lake import LakeConfig
from .options import option_specs, option_text, runtime_options

#: What the demo writes under --out.
MODEL, RESULTS, TINY = "model", "results", "tiny-clip"


def choose_backbone(given: Optional[str], out_dir: Path) -> tuple[str, str | None]:
    """``(backbone, warning)``: ``given`` if any; else the default CLIP when the hub can be
    used or it is cached; else a tiny random-weight CLIP written to ``out_dir/tiny-clip``, with
    a warning that says why and what its scores are worth."""
    from .backbones.hub import is_cached, offline_reason

    if given is not None:
        return given, None
    reason = offline_reason()
    if reason is None or is_cached(DEFAULT_BACKBONE):
        return DEFAULT_BACKBONE, None
    from .backbones.clip import _quiet_transformers
    from .testing import save_random_clip

    tiny = out_dir / TINY
    if not (tiny / "config.json").is_file():
        with _quiet_transformers():
            save_random_clip(tiny, "tiny")
    return str(tiny), (
        f"no network to the Hugging Face Hub ({reason}) and {DEFAULT_BACKBONE} is not in the cache: "
        f"using a tiny CLIP with random weights ({tiny}), which needs no download. Everything below runs for "
        "real on your images, but the scores mean nothing. With network, or with --backbone DIR|onnx:PATH, "
        "the same command uses real weights (see 'The backbone' in the README).")


@app.command()
@runtime_options()
@model_options()
def demo(
    category: Path = typer.Argument(..., help="One category in the MVTec layout: CATEGORY/train/good (normal images) "
                                              "and CATEGORY/test/ (images to score, in sub-folders).", show_default=False),
    out_dir: Path = typer.Option(Path("lakead-demo"), "--out", "-o", help="Where the model (model/) and the results "
                                 "(results/) go; an earlier demo's are replaced (nothing else is: a folder lakead did not write is refused)."),
    backbone: Optional[str] = typer.Option(None, help="Hub id, local save_pretrained directory, or onnx:PATH (default: "
                                           "the default CLIP, or without network a tiny random-weight CLIP)."),
    *,
    config: LakeConfig,
    runtime: Runtime,
) -> None:
    """Try lakead on one category: fit on its train/good images, score its test images, write the results."""
    import dataclasses
    import shlex

    from .batch import check_target, predict_to_dir
    from .cli_layers import check_blocks
    from .outputs import MODEL as MODEL_OUTPUT
    from .outputs import check_inputs, check_output
    from .images import list_images
    from .methods import get_method

    normal, test = category / "train" / "good", category / "test"
    with errors_as_messages():
        for folder in (normal, test):
            if not folder.is_dir():
                raise fail(f"{folder}: no such folder; the demo reads a category in the MVTec layout "
                           "(CATEGORY/train/good and CATEGORY/test/)" + _categories_inside(category))
        check_inputs(out_dir, [category], holds=False)  # never into the category's own folders
        check_output(out_dir / MODEL, MODEL_OUTPUT)
        check_target(out_dir / RESULTS, overwrite=True)
        with loading("looking for the backbone"):
            spec, warning = choose_backbone(backbone, out_dir)
        if warning:
            err.print(f"[yellow]note:[/] {escape(warning)}", highlight=False)
        class_name = category.name
        with loading(f"importing torch and transformers, loading the backbone {spec}"):
            det = get_method("lake").build(dataclasses.replace(config, backbone=spec), runtime=runtime)
            det.backbone  # noqa: B018 - loaded before the progress bar: a missing backbone is one message, no bar
        check_blocks(det)  # a bad --layer: one message before any work
        images = list_images(normal)
        with progress_bar("fit", len(images)) as advance:
            det.fit(images, class_name, support_rule=f"all {len(images)} images", on_progress=advance)
        det.save(out_dir / MODEL)
        results = out_dir / RESULTS
        total = len(list_images(test, warn=False))
        with progress_bar("predict", total) as advance:
            summary = predict_to_dir(det, [test], results, overwrite=True, on_progress=advance)
    q = shlex.quote
    out.print(f"fitted on {len(images)} normal images of {escape(printable(class_name))} (backbone {escape(printable(spec))}); "
              f"scored {summary.scored} test images, {summary.anomalous} called anomalous.", highlight=False, soft_wrap=True)
    auroc = _test_auroc(results / "scores.csv", test)
    if auroc is not None:
        out.print(f"image AUROC on the test folders (good = normal, any other folder = defective): {auroc:.3f}"
                  + (" (random weights: says nothing about LAKE)" if warning else ""), highlight=False, soft_wrap=True)
    out.print(f"results: {results / 'scores.csv'} and {results / 'overlays'}/; model: {out_dir / MODEL}", highlight=False,
              soft_wrap=True)
    extra = " ".join(q(w) for w in model_words(config))
    out.print("the same with the two commands you will use on your own folders:\n"
              f"  lakead fit {q(str(normal))} --class-name {q(class_name)} --out {q(str(out_dir / MODEL))} --backbone {q(spec)}"
              + (f" {extra}" if extra else "") + "\n"
              f"  lakead predict {q(str(out_dir / MODEL))} {q(str(test))} --out {q(str(results))} --overwrite",
              highlight=False, markup=False, soft_wrap=True)
    if summary.failed:
        raise fail(f"{summary.failed} input(s) could not be read: listed in {results / 'errors.csv'}")


def _categories_inside(folder: Path, limit: int = 3) -> str:
    """A hint for a dataset folder given instead of one of its categories: the command with the
    categories found one or two levels down (``mpdd`` -> ``mpdd/metal_plate``), or ""."""
    def below(d: Path) -> list[Path]:
        try:
            return sorted(c for c in d.iterdir() if c.is_dir() and not c.name.startswith("."))
        except OSError:
            return []

    found = [c for c in below(folder) if (c / "train" / "good").is_dir()]
    if not found:
        found = [g for c in below(folder) for g in below(c) if (g / "train" / "good").is_dir()]
    if not found:
        return ""
    more = f" (and {len(found) - limit} more)" if len(found) > limit else ""
    return (f". {folder} holds {len(found)} categor{'y: give it' if len(found) == 1 else 'ies: give one, for example'}:\n"
            + "\n".join(f"  lakead demo {c}" for c in found[:limit]) + more)


def model_words(config: LakeConfig) -> list[str]:
    """The model options of ``config`` that differ from the defaults, as typed (backbone aside).

    >>> model_words(LakeConfig(layer=400, k=8, use_text=False))
    ['--k', '8', '--layer', '400', '--no-text']
    """
    words: list[str] = []
    for name, spec in option_specs(LakeConfig).items():
        value = getattr(config, name)
        if name == "backbone" or value == spec.default:
            continue
        if spec.kind == "flag":
            on, _, off = (spec.flag or f"{spec.option}/--no-{spec.option[2:]}").partition("/")
            words.append(on if value else off)
        else:
            words += [spec.option, option_text(value)]
    return words


def _test_auroc(scores_csv: Path, test: Path) -> float | None:
    """Image AUROC of ``scores.csv`` when the test folder has ``good`` and other sub-folders."""
    import csv
    import math

    from .metrics import image_metrics

    with scores_csv.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    labels = [int(Path(r["path"]).relative_to(test).parts[0] != "good") for r in rows if len(Path(r["path"]).relative_to(test).parts) > 1]
    if len(labels) != len(rows) or len(set(labels)) < 2:
        return None
    auroc = image_metrics(labels, [float(r["score"]) for r in rows])["auroc"]
    return None if math.isnan(auroc) else auroc


__all__ = ["choose_backbone", "demo", "model_words"]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
