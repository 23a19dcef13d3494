"""The ``lakead`` command line: thin typer commands over the library.

Exit status: 0 on success; 1 when an error stopped the command or some inputs could not be
read (they are listed on stderr and in ``errors.csv``); 2 for a usage error.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from . import __version__
from .backbones import parse_layer
from .errors import LakeadError

app = typer.Typer(
    name="lakead",
    help="Training-free few-shot visual anomaly detection (LAKE). Higher scores are more anomalous.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
err = Console(stderr=True, soft_wrap=True)  # messages stay on one line: greppable in logs
out = Console()


def _version(value: bool) -> None:
    if value:
        out.print(f"lakead {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Print progress details and debug information."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only warnings and errors; no progress bar."),
    version: Optional[bool] = typer.Option(None, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """lakead: fit on a few normal images, then score, map and judge new ones."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logger = logging.getLogger("lakead")
    logger.handlers[:] = [RichHandler(console=err, show_time=False, show_path=False, markup=False)]
    logger.setLevel(level)
    logger.propagate = False
    state["quiet"] = quiet


state: dict[str, bool] = {"quiet": False}


def fail(message: str) -> "typer.Exit":
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, markup=True, soft_wrap=True)
    return typer.Exit(code=1)


@contextmanager
def errors_as_messages(interrupted: str = "interrupted") -> Iterator[None]:
    """Print a :class:`LakeadError` as one clear message and exit 1, without a traceback;
    on Ctrl-C print ``interrupted`` and exit 130."""
    try:
        yield
    except LakeadError as exc:
        raise fail(str(exc)) from None
    except KeyboardInterrupt:
        err.print(escape(interrupted), highlight=False)  # printed verbatim, like fail()
        raise typer.Exit(code=130) from None


@contextmanager
def progress_bar(description: str, total: int) -> Iterator:
    """A progress bar on stderr; yields ``advance(n)``."""
    if state["quiet"]:
        yield lambda n: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=False) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


def parse_k(value: str) -> "int | str":
    """``--k``: a positive integer or ``auto``."""
    v = value.strip().lower()
    if v == "auto":
        return "auto"
    try:
        return int(v)
    except ValueError:
        raise typer.BadParameter(f"expected a positive integer or 'auto', got {value!r}", param_hint="--k") from None


def parse_contamination(value: str) -> "float | str":
    """``--outlier-contamination``: ``auto`` or a fraction."""
    v = value.strip().lower()
    if v == "auto":
        return "auto"
    try:
        return float(v)
    except ValueError:
        raise typer.BadParameter(f"expected 'auto' or a fraction such as 0.1, got {value!r}", param_hint="--outlier-contamination") from None


@app.command()
def fit(
    normal: list[Path] = typer.Argument(..., help="Folders (searched recursively) or files of normal images.", show_default=False),
    class_name: str = typer.Option(..., "--class-name", "-c", help="What the images show, e.g. 'screw'; fills the text prompts."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Directory to write the model to (replaced if it exists)."),
    backbone: str = typer.Option("openai/clip-vit-large-patch14-336", help="Hub id, local CLIP directory, or onnx:PATH."),
    shots: Optional[int] = typer.Option(None, help="Use only this many normal images (default: all)."),
    seed: Optional[int] = typer.Option(None, help="Sample the shots with this seed (default: the first N by name); also seeds --selection random."),
    k: str = typer.Option("100", help="Number of sensitive neurons kept, or 'auto': the knee of the support set's sorted variance curve (docs/INTERPRETABILITY.md)."),
    layer: str = typer.Option("18", help="Block read for the visual branch (1-based; a tensor name for ONNX)."),
    semantic_layer: Optional[str] = typer.Option(None, help="Block read for the text probe (default: the last)."),
    lam: float = typer.Option(0.1, help="Weight of the text probe in the fused score."),
    semantic_agg: str = typer.Option("max", help="Pooling of the text probe over tokens: max or mean."),
    no_text: bool = typer.Option(False, "--no-text", help="Turn the text probe off (visual branch only)."),
    image_size: Optional[int] = typer.Option(None, help="Input size in pixels, a multiple of the patch size (default: the model's own)."),
    sigma: float = typer.Option(0.0, help="Gaussian blur of maps in pixels of the model input (0: off)."),
    selection: str = typer.Option("top", help="Neuron selection: top (LAKE), random, bottom or all."),
    score_norm: str = typer.Option("loo", help="loo: divide visual scores by the typical normal score; none: raw distances."),
    filter_outliers: bool = typer.Option(False, "--filter-outliers", help="Drop support images an Isolation Forest flags in the sensitive subspace (they are listed; docs/INTERPRETABILITY.md)."),
    outlier_contamination: str = typer.Option("auto", help="Contamination of the --filter-outliers forest: auto, or the fraction of images to drop (0 < f <= 0.5)."),
    threshold: Optional[float] = typer.Option(None, help="Fixed decision threshold (default: derived from the normal images)."),
    threshold_sigmas: float = typer.Option(3.0, help="Robust standard deviations above the typical normal score for the derived threshold."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    batch_size: int = typer.Option(8, help="Images per forward pass."),
    precision: str = typer.Option("float32", help="Backbone arithmetic: float32 (the reference) or bfloat16 (faster on GPUs and CPUs with AVX512-BF16/AMX; docs/PERFORMANCE.md)."),
) -> None:
    """Fit a detector on normal images and save it to --out."""
    from .data import select_shots
    from .detector import LakeDetector
    from .images import list_images

    with errors_as_messages():
        pool = list_images(normal)
        chosen, rule = select_shots(pool, shots, seed)
        det = LakeDetector(
            backbone=backbone, k=parse_k(k), layer=parse_layer(layer), semantic_layer=parse_layer(semantic_layer), lam=lam,
            semantic_agg=semantic_agg, use_text=not no_text, image_size=image_size, sigma=sigma, selection=selection,
            filter_outliers=filter_outliers, outlier_contamination=parse_contamination(outlier_contamination),
            seed=seed or 0, score_norm=score_norm, threshold=threshold, threshold_sigmas=threshold_sigmas,
            device=device, batch_size=batch_size, precision=precision,
        )
        logging.getLogger("lakead").info("support set: %s", rule)
        with progress_bar("fit", len(chosen)) as advance:
            det.fit(chosen, class_name, support_rule=rule, on_progress=advance)
        det.save(out_dir)
        _print_summary(det.summary(), title=f"model written to {out_dir}")
        for problem in det.skipped_:
            err.print(f"skipped: {problem}", highlight=False, markup=False)
        for name in det.outliers_:
            out.print(f"dropped as an outlier (--filter-outliers): {name}", highlight=False, markup=False, soft_wrap=True)


def _print_summary(summary: dict, title: str) -> None:
    table = Table(title=title, show_header=False, title_justify="left")
    for key, value in summary.items():
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    out.print(table)


@app.command()
def predict(
    model_dir: Path = typer.Argument(..., help="A model directory written by 'lakead fit'.", show_default=False),
    inputs: list[Path] = typer.Argument(..., help="Image files or folders (searched recursively).", show_default=False),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Directory for scores.csv, overlays/ and maps/."),
    threshold: Optional[float] = typer.Option(None, help="Decision threshold for this run (default: the model's)."),
    backbone: Optional[str] = typer.Option(None, help="Where to read the backbone weights from, if not where the model was fitted."),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda or cuda:N (default: the model's setting)."),
    batch_size: Optional[int] = typer.Option(None, help="Images per forward pass (default: the model's setting)."),
    precision: Optional[str] = typer.Option(None, help="Backbone arithmetic: float32 or bfloat16 (default: the model's setting)."),
    maps: str = typer.Option("png,npy", help="Map files to write: png (overlays/), npy (raw float32 maps/), png,npy or none."),
    resume: bool = typer.Option(False, "--resume", help="Keep the rows already in --out/scores.csv (an interrupted or earlier run) and score only the other images."),
    read_threads: Optional[int] = typer.Option(None, help="Threads that read images ahead of the model (default: min(4, CPUs))."),
    ray: bool = typer.Option(False, "--ray", help=r"Score on a Ray cluster (needs Ray: pip install 'lakead\[ray]')."),
    ray_address: Optional[str] = typer.Option(None, help="With --ray: the cluster to join (ray://HOST:10001, HOST:6379 or auto; default: $RAY_ADDRESS, else a local cluster)."),
    ray_workers: Optional[int] = typer.Option(None, help="With --ray: model replicas, one CPU each (default: one per CPU, or per GPU with --device cuda)."),
) -> None:
    """Score images with a fitted model; write scores.csv, overlays and maps to --out.

    Rows are appended to scores.csv a batch at a time; an interrupted run loses at most the
    batch in flight and goes on with --resume.
    """
    from .batch import parse_maps, predict_to_dir
    from .images import iter_images

    if (ray_address is not None or ray_workers is not None) and not ray:
        raise typer.BadParameter("only used with --ray", param_hint="--ray-address/--ray-workers")
    if ray and read_threads is not None:
        raise typer.BadParameter("not used with --ray (Ray workers read their own batches)", param_hint="--read-threads")
    try:
        map_kinds = parse_maps(maps)
    except LakeadError as exc:
        raise typer.BadParameter(str(exc).removeprefix("maps: "), param_hint="--maps") from None
    if batch_size is not None and batch_size < 1:
        raise fail(f"--batch-size must be at least 1, got {batch_size}")
    if read_threads is not None and read_threads < 1:
        raise fail(f"--read-threads must be at least 1, got {read_threads}")

    def report(path: str, problem: str) -> None:
        err.print(f"[yellow]cannot read[/] {escape(path)}: {escape(problem)}", highlight=False)

    scores_file = out_dir / "scores.csv"
    with errors_as_messages(f"interrupted: the rows of finished batches are in {scores_file}; "
                            "run the same command with --resume to go on"):
        total = sum(1 for _ in iter_images(inputs))  # a cheap listing pass, for the progress bar
        if ray:
            from .distributed import predict_on_ray

            with progress_bar("predict (ray)", total) as advance:
                summary = predict_on_ray(
                    model_dir, inputs, out_dir, address=ray_address, workers=ray_workers, backbone=backbone,
                    device=device, batch_size=batch_size, precision=precision, threshold=threshold, maps=map_kinds,
                    resume=resume, on_progress=advance, on_error=report,
                )
        else:
            from .detector import LakeDetector

            det = LakeDetector.load(model_dir, backbone=backbone, device=device, batch_size=batch_size, precision=precision)
            with progress_bar("predict", total) as advance:
                summary = predict_to_dir(
                    det, inputs, out_dir, threshold=threshold, maps=map_kinds, resume=resume,
                    read_threads=read_threads, on_progress=advance, on_error=report,
                )
    skipped = f" ({summary.skipped} already in scores.csv, skipped)" if summary.skipped else ""
    out.print(
        f"scored {summary.scored} image(s){skipped}, {summary.anomalous} above the threshold {summary.threshold:.4g}; "
        f"results in {scores_file}",
        highlight=False,
    )
    if summary.failed:
        raise fail(f"{summary.failed} input(s) could not be read: listed in {out_dir / 'errors.csv'}")


@app.command()
def info(model_dir: Path = typer.Argument(..., help="A model directory written by 'lakead fit'.", show_default=False)) -> None:
    """Print what a saved model holds (without loading the backbone)."""
    from .detector import read_model_meta

    with errors_as_messages():
        meta = read_model_meta(model_dir)
    summary = {
        "class_name": meta["class_name"],
        "backbone": meta["backbone"]["source"],
        "layer": meta["layer"],
        "semantic_layer": meta["semantic_layer"],
        "image_size": meta["image_size"],
        "k": meta.get("k", meta["config"]["k"] if meta["config"]["selection"] != "all" else meta["width"]),
        "k_rule": "auto (knee)" if meta["config"]["k"] == "auto" else "fixed",
        "outliers_dropped": len(meta.get("outliers", [])),
        "selection": meta["config"]["selection"],
        "support_images": len(meta["support"]),
        "threshold": meta["threshold"],
        "fitted_at": meta["fitted_at"],
        "lakead_version": meta["lakead_version"],
    }
    _print_summary(summary, title=str(model_dir))


@app.command()
def explain(
    model_dir: Path = typer.Argument(..., help="The model to explain: a directory written by 'lakead fit'.", show_default=False),
    inputs: Optional[list[Path]] = typer.Argument(None, help="Images or folders (searched recursively) to explain; optional.", show_default=False),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Report directory: index.html, report.json and img/ (replaced if it exists)."),
    compare: Optional[list[Path]] = typer.Option(None, "--compare", help="Another fitted model (one per category, same backbone and block) whose sensitive neurons are compared with MODEL_DIR's; repeat for more."),
    top_neurons: int = typer.Option(8, help="Neurons shown per image: the largest contributors at its most anomalous patch."),
    max_images: int = typer.Option(16, help="At most this many images are explained, evenly spaced over the sorted inputs."),
    backbone: Optional[str] = typer.Option(None, help="Where to read the backbone weights from, if not where the model was fitted."),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda or cuda:N (default: the model's setting)."),
) -> None:
    """Write an HTML report of a model's sensitive neurons: the variance curve, per-image neuron contributions, and their overlap across models (--compare)."""
    import shlex

    from .detector import LakeDetector, spread_subset
    from .explain import compare_models, comparison_labels, explain_images, write_report
    from .images import list_images

    if top_neurons < 1:
        raise typer.BadParameter(f"must be at least 1, got {top_neurons}", param_hint="--top-neurons")
    if max_images < 1:
        raise typer.BadParameter(f"must be at least 1, got {max_images}", param_hint="--max-images")
    with errors_as_messages():
        paths = list_images(inputs) if inputs else []
        det = LakeDetector.load(model_dir, backbone=backbone, device=device)
        chosen = [paths[i] for i in spread_subset(len(paths), max_images)]
        rule = None
        if paths:
            rule = f"all {len(paths)} given" if len(chosen) == len(paths) else (
                f"{len(chosen)} of {len(paths)} given, evenly spaced in name order (--max-images {max_images})")
            if len(chosen) < len(paths):
                logging.getLogger("lakead").info("explaining %s", rule)
        with progress_bar("explain", len(chosen)) as advance:
            explanations = explain_images(det, chosen, names=[str(p) for p in chosen], top=top_neurons)
            advance(len(chosen))
        comparison = None
        if compare:
            others = [LakeDetector.load(d, backbone=det.backbone, device=device) for d in compare]
            dets, dirs = [det, *others], [model_dir, *compare]
            comparison = compare_models(dets, comparison_labels(dets, dirs))
        page = write_report(
            out_dir, det, explanations, comparison, image_rule=rule,
            command=" ".join(shlex.quote(a) for a in ["lakead", *sys.argv[1:]]),
        )
    out.print(f"report written to {page}", highlight=False)


@app.command("download-backbone")
def download_backbone(
    model_id: str = typer.Argument(..., help="Hugging Face hub id, e.g. openai/clip-vit-large-patch14-336.", show_default=False),
    target: Path = typer.Argument(..., help="Directory to save the model, processor and tokenizer to.", show_default=False),
) -> None:
    """Save a hub CLIP to a local directory (run where there is network; use it with --backbone)."""
    from .fileio import atomic_directory

    with errors_as_messages():
        try:
            from transformers import CLIPModel, CLIPProcessor

            model = CLIPModel.from_pretrained(model_id)
            processor = CLIPProcessor.from_pretrained(model_id)
        except (OSError, ValueError) as exc:
            raise LakeadError(f"cannot fetch {model_id!r} from the Hugging Face Hub: {str(exc).splitlines()[0]}") from None
        with atomic_directory(target) as tmp:
            model.save_pretrained(tmp)
            processor.save_pretrained(tmp)
    out.print(f"saved {model_id} to {target}; use it with --backbone {target}")


@app.command()
def serve(
    models_dir: Path = typer.Option(..., "--models-dir", help="Directory the models are stored in (created if missing)."),
    backbone: str = typer.Option("openai/clip-vit-large-patch14-336", help="Backbone of models created through the service: hub id or local CLIP directory."),
    allow_backbone: list[str] = typer.Option([], "--allow-backbone", help="Another backbone clients may choose (repeatable)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on; 127.0.0.1 serves this machine only."),
    port: int = typer.Option(8000, help="Port to listen on."),
    token: Optional[str] = typer.Option(None, envvar="LAKEAD_TOKEN", help="Require 'Authorization: Bearer TOKEN' on every call but /healthz (or set LAKEAD_TOKEN)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    workers: int = typer.Option(2, help="Predictions run at once (fits run one at a time)."),
    max_upload_mb: float = typer.Option(256.0, help="Largest request body, in MiB."),
    max_images: int = typer.Option(256, help="Most normal images in one model creation."),
    max_predict_images: int = typer.Option(32, help="Most images in one prediction request."),
    max_megapixels: float = typer.Option(40.0, help="Most pixels of one image, in millions."),
    max_total_megapixels: float = typer.Option(400.0, help="Most pixels of all the images of one request, in millions."),
) -> None:
    """Serve the models in --models-dir over HTTP, with a web page at /."""
    try:
        import uvicorn

        from .serve import ServeLimits, create_app
    except ImportError as exc:
        raise fail(f"the service needs the serve extra ({exc.name} is missing): pip install 'lakead[serve]'") from None

    loopback = host in ("127.0.0.1", "localhost", "::1")
    with errors_as_messages():
        limits = ServeLimits(
            max_request_bytes=int(max_upload_mb * 2**20), max_fit_images=max_images,
            max_predict_images=max_predict_images, max_image_pixels=int(max_megapixels * 1e6),
            max_total_pixels=int(max_total_megapixels * 1e6),
        )
        service = create_app(
            models_dir, backbone=backbone, allowed_backbones=tuple(allow_backbone), token=token, limits=limits,
            device=device, workers=workers, allowed_hosts=("127.0.0.1", "localhost", "[::1]") if loopback else None,
        )
        logging.getLogger("lakead").info("loading the backbone %s", backbone)
        service.state.store.backbone(backbone)  # fail now, not at the first request
    if not loopback and token is None:
        err.print(f"[yellow]warning:[/] serving on {host} without --token: anyone who can reach this machine can "
                  "create, use and delete models", highlight=False)
    shown = f"[{host}]" if ":" in host else ("127.0.0.1" if host in ("0.0.0.0", "::") else host)
    url = f"http://{shown}:{port}/" + (f"#token={token}" if token else "")
    out.print(f"lakead serving {len(service.state.store.list())} model(s) from {models_dir} at {url}", highlight=False,
              soft_wrap=True)
    uvicorn.run(service, host=host, port=port, log_level="warning" if state["quiet"] else "info")


# -- evaluation: eval, ablate, baselines ---------------------------------------------------

_BACKBONE = typer.Option("openai/clip-vit-large-patch14-336", help="Hub id, local CLIP directory, or onnx:PATH.")
_CATEGORIES = typer.Option(None, "--categories", help="Only these categories (repeat the option or separate with commas; default: all).")
_SEED = typer.Option(0, help="Seed of the shot sample; also seeds --selection random.")
_FIRST = typer.Option(False, "--first", help="Take the first N training images by name instead of a seeded sample.")
_SEMANTIC_LAYER = typer.Option(None, help="Block read for the text probe (default: the last).")
_SEMANTIC_AGG = typer.Option("max", help="Pooling of the text probe over tokens: max or mean.")
_NO_TEXT = typer.Option(False, "--no-text", help="Turn the text probe off (visual branch only).")
_IMAGE_SIZE = typer.Option(None, help="Input size in pixels (default: the model's own).")
_SIGMA = typer.Option(0.0, help="Gaussian blur of maps in pixels of the model input (0: off).")
_DEVICE = typer.Option("auto", help="auto, cpu, cuda or cuda:N.")
_BATCH = typer.Option(8, help="Images per forward pass.")


def _command_line(ctx: typer.Context) -> str:
    """The command as typed, rebuilt from its parameters (defaults left out), for reports."""
    import shlex

    words = [ctx.find_root().info_name or "lakead", ctx.info_name or ""]
    for p in ctx.command.params:
        value = ctx.params.get(p.name)
        if p.param_type_name == "argument":
            words += [str(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
        elif value != p.default and value not in (None, [], ()):
            flag = p.opts[0]
            if p.is_flag:
                words.append(flag)
            else:
                words += [w for v in (value if isinstance(value, (list, tuple)) else [value]) for w in (flag, str(v))]
    return " ".join(shlex.quote(w) for w in words)


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
def eval_(
    ctx: typer.Context,
    data_root: Path = typer.Argument(..., help="A dataset in the MVTec-AD layout (a category, a dataset or a folder of datasets) or a folder with meta.json.", show_default=False),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Report directory: metrics.json, metrics.csv, scores.csv, report.md, figures/."),
    categories: Optional[list[str]] = _CATEGORIES,
    shots: str = typer.Option("64", help="Normal training images to fit on, per category: a number or 'all'."),
    seed: int = _SEED,
    first: bool = _FIRST,
    method: str = typer.Option("lake", help="lake (as configured), visual, all, random, bottom or text (zero-shot text probe)."),
    backbone: str = _BACKBONE,
    k: int = typer.Option(100, help="Number of sensitive neurons kept."),
    layer: str = typer.Option("18", help="Block read for the visual branch (1-based; a tensor name for ONNX)."),
    semantic_layer: Optional[str] = _SEMANTIC_LAYER,
    lam: float = typer.Option(0.1, help="Weight of the text probe in the fused score."),
    semantic_agg: str = _SEMANTIC_AGG,
    no_text: bool = _NO_TEXT,
    image_size: Optional[int] = _IMAGE_SIZE,
    sigma: float = _SIGMA,
    selection: str = typer.Option("top", help="Neuron selection: top (LAKE), random, bottom or all."),
    score_norm: str = typer.Option("loo", help="loo: divide visual scores by the typical normal score; none: raw distances."),
    device: str = _DEVICE,
    batch_size: int = _BATCH,
    examples: int = typer.Option(4, help="Example maps per category in the figures."),
    no_figures: bool = typer.Option(False, "--no-figures", help="Do not draw the figures."),
) -> None:
    """Evaluate on a dataset: fit on the shots of each category, score its test images, write the report."""
    from .data import load_dataset
    from .detector import LakeConfig
    from .evaluate import evaluate, images_to_process, parse_shots

    with errors_as_messages():
        n_shots = parse_shots(shots)
        config = LakeConfig(
            backbone=backbone, k=k, layer=parse_layer(layer), semantic_layer=parse_layer(semantic_layer), lam=lam,
            semantic_agg=semantic_agg, use_text=not no_text, image_size=image_size, sigma=sigma, selection=selection,
            seed=seed, score_norm=score_norm, device=device, batch_size=batch_size,
        ).validate()
        cats = load_dataset(data_root, _split(categories))
        with progress_bar("eval", images_to_process(cats, n_shots)) as advance:
            report = evaluate(
                cats, out_dir, config, shots=n_shots, seed=None if first else seed, method=method, examples=examples,
                figures=not no_figures, command=_command_line(ctx), on_progress=advance,
            )
    table = Table(title=f"report written to {out_dir / 'report.md'}", title_justify="left")
    from .evaluate import HEADERS, METRIC_COLUMNS, format_percent

    table.add_column("category")
    for c in METRIC_COLUMNS:
        table.add_column(HEADERS[c], justify="right")
    for r in report.results:
        table.add_row(r.name, *(format_percent(v) for v in r.metrics().values()))
    table.add_row("mean", *(format_percent(report.mean[c]) for c in METRIC_COLUMNS))
    out.print(table)


def _grid(ctx: typer.Context, data_root: Path, categories, out_dir: Path, variants, *, shot_seed, title: str, backbone=None) -> None:
    """Run the settings of ``ablate`` or ``baselines`` over a dataset's categories, with a progress bar."""
    from .data import load_dataset
    from .evaluate import grid_images, run_grid

    cats = load_dataset(data_root, _split(categories))
    logging.getLogger("lakead").info("%d setting(s) x %d categories", len(variants), len(cats))
    with progress_bar(title, grid_images(cats, variants)) as advance:
        run_grid(cats, out_dir, variants, shot_seed=shot_seed, title=title, command=_command_line(ctx),
                 backbone=backbone, on_progress=advance)
    out.print(f"table written to {out_dir / (title + '.md')}", highlight=False)


@app.command()
def ablate(
    ctx: typer.Context,
    data_root: Path = typer.Argument(..., help="A dataset (see 'lakead eval').", show_default=False),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Directory for ablation.md, ablation.csv and ablation.json."),
    categories: Optional[list[str]] = _CATEGORIES,
    k: str = typer.Option("100", "--k", help="Numbers of sensitive neurons, comma-separated."),
    lam: str = typer.Option("0.1", "--lam", help="Text-probe weights, comma-separated."),
    shots: str = typer.Option("64", "--shots", help="Shot counts, comma-separated ('all' for every training image)."),
    layer: str = typer.Option("18", "--layer", help="Blocks (or ONNX tensor names), comma-separated."),
    selection: str = typer.Option("top", "--selection", help="Neuron selections, comma-separated: top, random, bottom, all."),
    score_norm: str = typer.Option("loo", "--score-norm", help="Score normalisations, comma-separated: loo, none."),
    seeds: str = typer.Option("0,1,2", help="Seeds that --selection random is averaged over."),
    seed: int = _SEED,
    first: bool = _FIRST,
    backbone: str = _BACKBONE,
    semantic_layer: Optional[str] = _SEMANTIC_LAYER,
    semantic_agg: str = _SEMANTIC_AGG,
    no_text: bool = _NO_TEXT,
    image_size: Optional[int] = _IMAGE_SIZE,
    sigma: float = _SIGMA,
    device: str = _DEVICE,
    batch_size: int = _BATCH,
) -> None:
    """Run every combination of the lists on a dataset; write one table (ablation.md)."""
    from .detector import LakeConfig
    from .evaluate import ablation_variants, parse_shots

    with errors_as_messages():
        config = LakeConfig(
            backbone=backbone, semantic_layer=parse_layer(semantic_layer), semantic_agg=semantic_agg,
            use_text=not no_text, image_size=image_size, sigma=sigma, seed=seed, device=device, batch_size=batch_size,
        ).validate()
        variants = ablation_variants(
            config, ks=_numbers(k, int, "--k"), lams=_numbers(lam, float, "--lam"),
            shots=[parse_shots(s) for s in _split(shots)], layers=[parse_layer(v) for v in _split(layer)],
            selections=_split(selection), seeds=_numbers(seeds, int, "--seeds"), score_norms=_split(score_norm),
        )
        _grid(ctx, data_root, categories, out_dir, variants, shot_seed=None if first else seed, title="ablation")


@app.command()
def baselines(
    ctx: typer.Context,
    data_root: Path = typer.Argument(..., help="A dataset (see 'lakead eval').", show_default=False),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Directory for baselines.md, baselines.csv and baselines.json."),
    categories: Optional[list[str]] = _CATEGORIES,
    methods: str = typer.Option("lake,visual,all,random,bottom,text", help="Methods, comma-separated (text needs a CLIP)."),
    score_norm: str = typer.Option("loo,none", "--score-norm", help="Score normalisations LAKE's fused score is reported with."),
    seeds: str = typer.Option("0,1,2", help="Seeds that the random method is averaged over."),
    shots: str = typer.Option("64", help="Normal training images to fit on, per category: a number or 'all'."),
    seed: int = _SEED,
    first: bool = _FIRST,
    backbone: str = _BACKBONE,
    k: int = typer.Option(100, help="Number of neurons kept (top, random, bottom)."),
    layer: str = typer.Option("18", help="Block read for the visual branch (1-based; a tensor name for ONNX)."),
    semantic_layer: Optional[str] = _SEMANTIC_LAYER,
    lam: float = typer.Option(0.1, help="Weight of the text probe in LAKE's fused score."),
    semantic_agg: str = _SEMANTIC_AGG,
    image_size: Optional[int] = _IMAGE_SIZE,
    sigma: float = _SIGMA,
    device: str = _DEVICE,
    batch_size: int = _BATCH,
) -> None:
    """Compare LAKE with its baselines on the same data and shots; write one table (baselines.md)."""
    from .backbones import load_backbone
    from .detector import LakeConfig
    from .evaluate import baseline_variants, parse_shots

    with errors_as_messages():
        config = LakeConfig(
            backbone=backbone, k=k, layer=parse_layer(layer), semantic_layer=parse_layer(semantic_layer), lam=lam,
            semantic_agg=semantic_agg, image_size=image_size, sigma=sigma, seed=seed, device=device, batch_size=batch_size,
        ).validate()
        bb = load_backbone(backbone)
        variants = baseline_variants(
            config, methods=_split(methods), shots=parse_shots(shots), seeds=_numbers(seeds, int, "--seeds"),
            score_norms=_split(score_norm), has_text=bb.has_text,
        )
        _grid(ctx, data_root, categories, out_dir, variants, shot_seed=None if first else seed, title="baselines", backbone=bb)


def run() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
