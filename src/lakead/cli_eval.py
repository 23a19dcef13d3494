"""The evaluation commands: ``lakead eval``, ``ablate`` and ``baselines`` (registered on the
app of :mod:`lakead.cli_common`; :mod:`lakead.cli` imports this module)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from .api import Runtime
from .methods.lake import LakeConfig
from .methods import METHODS
from .configfile import config_file_option
from .options import choice_option, command_line, runtime_options

from .cli_common import (
    app,
    check_hub,
    configured,
    method_options,
    errors_as_messages,
    fail,
    model_options,
    out,
    progress_bar,
    _CATEGORIES,
    _EVAL_SEED,
    _FIRST,
)


# -- evaluation: eval, ablate, baselines ---------------------------------------------------


def _split(values: "list[str] | str | None") -> list[str]:
    """Comma-separated and repeated option values, flattened."""
    if values is None:
        return []
    items = [values] if isinstance(values, str) else values
    return [v.strip() for item in items for v in item.split(",") if v.strip()]


def _numbers(values: str, kind: type, option: str) -> list:
    try:
        return [kind(v) for v in _split(values)]
    except ValueError:
        raise fail(f"{option}: expected comma-separated {kind.__name__} values, got {values!r}") from None


@app.command("eval")
@runtime_options()
@model_options()
@method_options()
def eval_(
    ctx: typer.Context,
    data_root: Path = typer.Argument(..., help="A dataset: MVTec-AD layout (a category, a dataset or a folder of datasets), a folder with meta.json, VisA, MVTec LOCO, or the folder of --normal-dir/--abnormal-dir (docs/DATA.md).", show_default=False),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Report directory: metrics.json, metrics.csv, scores.csv, report.md, figures/."),
    categories: Optional[list[str]] = _CATEGORIES,
    shots: str = typer.Option("64", help="Normal training images to fit on, per category: a number or 'all'."),
    seed: int = _EVAL_SEED,
    first: bool = _FIRST,
    method: Any = choice_option("lake", "--method", choices=METHODS, help="How to score: "
                                + "; ".join(f"{m.name}: {m.description}" for m in METHODS.values()) + "."),
    examples: int = typer.Option(4, help="Example maps per category in the figures."),
    no_figures: bool = typer.Option(False, "--no-figures", help="Do not draw the figures."),
    save_maps: str = typer.Option("none", "--save-maps", help="Keep every test image's map: png (overlays/), npy (raw maps/), png,npy or none."),
    normal_dir: Optional[Path] = typer.Option(None, "--normal-dir", help="Folder layout: the folder of normal images (relative to DATA_ROOT).", show_default=False),
    abnormal_dirs: Optional[list[Path]] = typer.Option(None, "--abnormal-dir", help="Folder layout: a folder of defective images (repeat for several).", show_default=False),
    mask_dir: Optional[Path] = typer.Option(None, "--mask-dir", help="Folder layout: masks matched by file name (NAME.png or NAME_mask.png).", show_default=False),
    normal_test_dir: Optional[Path] = typer.Option(None, "--normal-test-dir", help="Folder layout: normal test images (default: every 5th normal image).", show_default=False),
    config_file: Optional[Path] = config_file_option(),
    *,
    config: LakeConfig,
    runtime: Runtime,
    method_options: dict,
) -> None:
    """Evaluate on a dataset: fit on the shots of each category, score its test images, write the report."""
    from .batch import parse_maps
    from .evaluate import (
        HEADERS,
        METRIC_COLUMNS,
        evaluate,
        format_percent,
        images_to_process,
        parse_shots,
    )

    with errors_as_messages():
        from .layouts import load_any
        from .outputs import EVALUATION, check_output

        check_output(out_dir, EVALUATION, inputs=[data_root])  # before any work
        n_shots = parse_shots(shots)
        config, method = configured(method, config, method_options)
        cats = load_any(data_root, _split(categories), normal_dir=normal_dir, abnormal_dirs=abnormal_dirs or (),
                        mask_dir=mask_dir, normal_test_dir=normal_test_dir, rule=config.read_rule)
        check_hub(config)
        kinds = parse_maps(save_maps)
        with progress_bar("eval", images_to_process(cats, n_shots)) as advance:
            report = evaluate(
                cats, out_dir, config, shots=n_shots, seed=None if first else seed, method=method, examples=examples,
                figures=not no_figures, command=command_line(ctx), runtime=runtime, on_progress=advance,
                save_maps=kinds,
            )
    table = Table(title=f"report written to {out_dir / 'report.md'}", title_justify="left")
    names = [r.name for r in report.results]
    table.add_column("category", overflow="fold", min_width=min(40, max(map(len, ["mean", *names]))))  # never cut short
    for c in METRIC_COLUMNS:
        table.add_column(HEADERS[c], justify="right", no_wrap=True, min_width=5)  # "100.0" whole
    for r in report.results:
        table.add_row(r.name, *(format_percent(v) for v in r.metrics().values()))
    table.add_row("mean", *(format_percent(report.mean[c]) for c in METRIC_COLUMNS))
    out.print(table)


def _grid(ctx: typer.Context, data_root: Path, categories, out_dir: Path, variants, *, shot_seed, title: str,
          runtime: Runtime, backbone=None) -> None:
    """Run the settings of ``ablate`` or ``baselines`` over a dataset's categories, with a progress bar."""
    from .evaluate import grid_images, run_grid
    from .layouts import load_any
    from .outputs import check_output, grid_kind

    check_output(out_dir, grid_kind(title), inputs=[data_root])  # before any work
    cats = load_any(data_root, _split(categories))
    if backbone is None and variants:
        check_hub(variants[0].config)  # the settings of a grid share one backbone
    logging.getLogger("lakead").info("%d setting(s) x %d categories", len(variants), len(cats))
    with progress_bar(title, grid_images(cats, variants)) as advance:
        run_grid(cats, out_dir, variants, shot_seed=shot_seed, title=title, command=command_line(ctx),
                 backbone=backbone, runtime=runtime, on_progress=advance)
    out.print(f"table written to {out_dir / (title + '.md')}", highlight=False)


@app.command()
@runtime_options()
@model_options(lists=("k", "lam", "layer", "selection", "score_norm"))
def ablate(
    ctx: typer.Context,
    data_root: Path = typer.Argument(..., help="A dataset (see 'lakead eval').", show_default=False),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Directory for ablation.md, ablation.csv and ablation.json."),
    categories: Optional[list[str]] = _CATEGORIES,
    shots: str = typer.Option("64", "--shots", help="Shot counts, comma-separated ('all' for every training image)."),
    seeds: str = typer.Option("0,1,2", help="Seeds that --selection random is averaged over."),
    seed: int = _EVAL_SEED,
    first: bool = _FIRST,
    config_file: Optional[Path] = config_file_option(),
    *,
    config: LakeConfig,
    alternatives: dict,
    runtime: Runtime,
) -> None:
    """Run every combination of the lists on a dataset; write one table (ablation.md).

    --k, --lam, --layer, --selection and --score-norm take comma-separated alternatives
    (in --layer, '+' joins blocks into one alternative: --layer 12,18,12+18 runs three);
    every other model option is fixed for the whole grid.
    """
    from .evaluate import ablation_variants, parse_shots

    with errors_as_messages():
        variants = ablation_variants(
            config, ks=alternatives["k"], lams=alternatives["lam"], shots=[parse_shots(s) for s in _split(shots)],
            layers=alternatives["layer"], selections=alternatives["selection"], seeds=_numbers(seeds, int, "--seeds"),
            score_norms=alternatives["score_norm"],
        )
        _grid(ctx, data_root, categories, out_dir, variants, shot_seed=None if first else seed, title="ablation",
              runtime=runtime)


@app.command()
@runtime_options()
@model_options(lists={"score_norm": ("loo", "none")})
@method_options()
def baselines(
    ctx: typer.Context,
    data_root: Path = typer.Argument(..., help="A dataset (see 'lakead eval').", show_default=False),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Directory for baselines.md, baselines.csv and baselines.json."),
    categories: Optional[list[str]] = _CATEGORIES,
    methods: Any = choice_option(",".join(METHODS), "--methods", "--method", choices=METHODS, many=True,
                                 help="Methods, comma-separated (text needs a CLIP): "
                                      + "; ".join(f"{m.name}: {m.description}" for m in METHODS.values()) + "."),
    seeds: str = typer.Option("0,1,2", help="Seeds that the random method is averaged over."),
    shots: str = typer.Option("64", help="Normal training images to fit on, per category: a number or 'all'."),
    seed: int = _EVAL_SEED,
    first: bool = _FIRST,
    config_file: Optional[Path] = config_file_option(),
    *,
    config: LakeConfig,
    alternatives: dict,
    runtime: Runtime,
    method_options: dict,
) -> None:
    """Compare LAKE with its baselines on the same data and shots; write one table (baselines.md).

    Each method runs with the model options given that it has (PatchCore and AnomalyDINO share
    --layer, --image-size, --seed and the decision options with LAKE, and have their own), and
    the options it fixes (e.g. visual: --no-text); LAKE's fused score is reported once per --score-norm.
    """
    from .backbones import load_backbone
    from .evaluate import baseline_variants, parse_shots

    with errors_as_messages():
        bb = load_backbone(config.backbone)
        variants = baseline_variants(
            config, methods=methods, shots=parse_shots(shots), seeds=_numbers(seeds, int, "--seeds"),
            score_norms=alternatives["score_norm"], has_text=bb.has_text or config.text_backbone is not None,
            options=method_options,
        )
        _grid(ctx, data_root, categories, out_dir, variants, shot_seed=None if first else seed, title="baselines",
              runtime=runtime, backbone=bb)
