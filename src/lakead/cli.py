"""The ``lakead`` command line: thin typer commands over the library.

Exit status: 0 on success; 1 when an error stopped the command or some inputs could not be
read (they are listed on stderr and in ``errors.csv``); 2 for a usage error.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from .api import Runtime
from .errors import LakeadError
from .outputs import BACKBONE, EXPORT, MODEL, REPORT, check_inputs, check_output
from .configfile import config_file_option, print_config_option, render_config
from .errors import CONTROL_CHARACTERS, printable
from .methods.lake import LakeConfig
from .methods import METHODS, load_detector
from .options import MODEL_PANEL, choice_option, option_text, runtime_options
from .cli_common import (  # app: the entry point (lakead.cli:app)
    app,
    check_hub,
    configured,
    err,
    errors_as_messages,
    method_options,
    fail,
    loading,
    model_options,
    out,
    progress_bar,
    state,
    DEFAULT_BACKBONE,
)


@app.command()
@runtime_options()
@model_options()
@method_options()
def fit(
    ctx: typer.Context,
    normal: Optional[list[Path]] = typer.Argument(
        None, help="Folders (searched recursively) or files of normal images (none: zero-shot, --method winclip only).",
        show_default=False),
    class_name: Optional[str] = typer.Option(None, "--class-name", "-c", help="What the images show, e.g. 'screw'; fills the text prompts, so it is needed where there is a text probe (without one: the first folder's name, e.g. bottle for data/bottle/train/good).", show_default=False),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Directory to write the model to: a new folder, or one holding only an earlier lakead model (replaced when the new one is complete); a folder with anything else in it, or one of the image folders, is refused."),
    shots: Optional[int] = typer.Option(None, help="Use only this many normal images (default: all)."),
    seed: Optional[int] = typer.Option(
        None, help="Sample the shots with this seed (default: the first N by name); also seeds --selection random "
                   "and the outlier filter (default 0).", rich_help_panel=MODEL_PANEL),
    config_file: Optional[Path] = config_file_option(),
    print_config: bool = print_config_option(),
    method: Any = choice_option("lake", "--method", choices=METHODS, help="How to score: "
                                + "; ".join(f"{m.name}: {m.description}" for m in METHODS.values()) + "."),
    fit_memory: str = typer.Option("256MiB", help="Bound on what the fit holds (e.g. 1GiB): beyond half of it, the fit makes a second pass over the images instead of keeping their full-width tokens (docs/SCALE.md)."),
    ray: bool = typer.Option(False, "--ray", help=r"Run the fit's forward passes on a Ray cluster (needs Ray: pip install 'lakead\[ray]')."),
    ray_address: Optional[str] = typer.Option(None, help="With --ray: the cluster to join (default: $RAY_ADDRESS, else a local cluster)."),
    ray_workers: Optional[int] = typer.Option(None, help="With --ray: backbone replicas, one CPU each (default: one per CPU)."),
    *,
    config: LakeConfig,
    runtime: Runtime,
    method_options: dict,
) -> None:
    """Fit a detector on normal images and save it to --out."""
    if print_config:
        sys.stdout.write(render_config(ctx))
        return
    from .cli_layers import check_blocks, class_name_from, needs_class_name
    from .data import select_shots
    from .images import list_images
    from .methods.lake.stream import parse_memory

    if (ray_address is not None or ray_workers is not None) and not ray:
        raise typer.BadParameter("only used with --ray", param_hint="--ray-address/--ray-workers")
    try:
        memory = parse_memory(fit_memory)
    except LakeadError as exc:
        raise typer.BadParameter(str(exc), param_hint="--fit-memory") from None
    if class_name is not None and CONTROL_CHARACTERS.search(class_name):
        raise typer.BadParameter(f"has a control character: '{printable(class_name)}'; give printable text", param_hint="--class-name")
    with errors_as_messages():
        check_output(out_dir, MODEL, inputs=normal or [])  # before the work, not after it
        cfg, m = configured(method, config, method_options)
        streaming = m.detector_class.streaming_fit  # the method's own capability, not a branch on its name
        if not streaming and (ray or fit_memory != "256MiB"):
            raise typer.BadParameter(f"--ray and --fit-memory apply to a streaming fit (LAKE's); method {m.name!r} "
                                     "fits in one process", param_hint="--ray/--fit-memory")
        if normal:
            chosen, rule = select_shots(list_images(normal), shots, seed)
        elif m.zero_shot:  # the class name alone (WinCLIP)
            chosen, rule = [], "none: zero-shot from the class name"
        else:
            raise typer.BadParameter(f"method {m.name!r} needs normal images (only the zero-shot methods, "
                                     f"{', '.join(z.name for z in METHODS.values() if z.zero_shot)}, fit on a class name alone)",
                                     param_hint="NORMAL")
        check_hub(config)
        with loading(f"importing torch, loading the backbone {cfg.backbone}"):
            det = m.build(cfg, runtime=runtime)
            det.backbone  # noqa: B018 - loaded before the progress bar: a missing backbone is one message, no bar
        check_blocks(det)  # a bad --layer too
        if class_name is None:
            if needs_class_name(det, m):
                raise typer.BadParameter("needed: the text probe fills its prompts with it (or turn the probe off: --no-text)",
                                         param_hint="--class-name")
            class_name = class_name_from(normal or [])
            logging.getLogger("lakead").info("class name: %s (the folder's; --class-name sets it)", class_name)
        logging.getLogger("lakead").info("support set: %s", rule)
        with progress_bar("fit", len(chosen)) as advance:
            if not streaming:
                det.fit(chosen, class_name, support_rule=rule, on_progress=advance)
            elif ray:
                from .distributed import fit_on_ray

                fit_on_ray(det, chosen, class_name, address=ray_address, workers=ray_workers, support_rule=rule,
                           on_progress=advance, memory=memory)
            else:
                det.fit(chosen, class_name, support_rule=rule, on_progress=advance, memory=memory)
        det.save(out_dir)
        _print_summary(det.summary(), title=f"model written to {out_dir}", result=False)
        for problem in det.skipped_:
            err.print(f"skipped: {problem}", highlight=False, markup=False)
        for name in getattr(det.state_, "outliers", []):
            out.print(f"dropped as an outlier (--filter-outliers): {name}", highlight=False, markup=False, soft_wrap=True)


def _print_summary(summary: dict, title: str, *, result: bool = True) -> None:
    """A two-column table of facts; ``result=False``: a report of what was written, left out with -q."""
    if not result and state["quiet"]:
        return
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")  # a long path folds onto the next line, never cut with "..."
    for key, value in summary.items():
        table.add_row(escape(printable(key)), escape(printable(f"{value:.4g}" if isinstance(value, float) else value)))
    out.print(table)


@app.command()
@runtime_options()
def predict(
    model_dir: Path = typer.Argument(..., help="A model directory written by 'lakead fit' or 'lakead export'.", show_default=False),
    inputs: list[Path] = typer.Argument(..., help="Image files or folders (searched recursively).", show_default=False),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Directory for scores.csv, overlays/ and maps/."),
    threshold: Optional[float] = typer.Option(None, help="Decision threshold for this run (default: the model's)."),
    false_alarm_rate: Optional[float] = typer.Option(None, help="False-alarm budget for this run: the decision levels are derived again from the model's saved normal scores (default: the model's budget)."),
    masks: bool = typer.Option(False, "--masks", help="Also write the defect masks (masks/) and regions.csv (one row per defect region)."),
    backbone: Optional[str] = typer.Option(None, help="Where to read the backbone weights from, if not where the model was fitted."),
    maps: str = typer.Option("png", help="Map files to write: png (overlays/), npy (raw float32 maps/, large: opt in), nifti (a NIfTI input's maps as one volume with its affine, maps/VOLUME.nii.gz), comma-separated (png,npy), or none."),
    resume: bool = typer.Option(False, "--resume", help="Keep the rows already in --out/scores.csv (an interrupted or earlier run) and score only the other images."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the results of an earlier run in --out (scores.csv, overlays/, maps/, masks/, ...); without it or --resume such a folder is refused."),
    read_threads: Optional[int] = typer.Option(None, help="Threads that read images ahead of the model (default: min(4, CPUs))."),
    ray: bool = typer.Option(False, "--ray", help=r"Score on a Ray cluster (needs Ray: pip install 'lakead\[ray]')."),
    ray_address: Optional[str] = typer.Option(None, help="With --ray: the cluster to join (ray://HOST:10001, HOST:6379 or auto; default: $RAY_ADDRESS, else a local cluster)."),
    ray_workers: Optional[int] = typer.Option(None, help="With --ray: model replicas, one CPU each (default: one per CPU, or per GPU with --device cuda)."),
    *,
    runtime: Runtime,
) -> None:
    """Score images with a fitted model; write scores.csv, overlays and maps to --out.

    Rows are appended to scores.csv a batch at a time; an interrupted run loses at most the
    batch in flight and goes on with --resume.
    """
    from .batch import check_target, own_output, parse_maps, predict_to_dir
    from .images import iter_images
    from .medical import ReadRule, count_images, is_medical

    if ray and "nifti" in maps.lower():
        raise typer.BadParameter("nifti maps are written by the single-process run", param_hint="--maps")
    if ray and (masks or false_alarm_rate is not None):
        raise typer.BadParameter("not used with --ray yet (the single-process run writes them)", param_hint="--masks/--false-alarm-rate")
    if false_alarm_rate is not None and not 0 < false_alarm_rate < 1:
        raise typer.BadParameter(f"a number in (0, 1), got {false_alarm_rate}", param_hint="--false-alarm-rate")
    if (ray_address is not None or ray_workers is not None) and not ray:
        raise typer.BadParameter("only used with --ray", param_hint="--ray-address/--ray-workers")
    if ray and read_threads is not None:
        raise typer.BadParameter("not used with --ray (Ray workers read their own batches)", param_hint="--read-threads")
    try:
        map_kinds = parse_maps(maps)
    except LakeadError as exc:
        raise typer.BadParameter(str(exc).removeprefix("maps: "), param_hint="--maps") from None
    if read_threads is not None and read_threads < 1:
        raise fail(f"--read-threads must be at least 1, got {read_threads}")
    if threshold is not None and math.isnan(threshold):
        raise fail("threshold must be a number, not nan")
    if resume and overwrite:
        raise typer.BadParameter("choose one: go on with the earlier run (--resume) or replace its results (--overwrite)",
                                 param_hint="--resume/--overwrite")
    with errors_as_messages():
        check_inputs(out_dir, [model_dir], holds=False)  # the results are never written into the model
        check_inputs(out_dir, inputs, inside=False, holds=False)
        check_target(out_dir, resume=resume, overwrite=overwrite)  # before the model is loaded

    def report(path: str, problem: str) -> None:
        err.print(f"[yellow]cannot read[/] {escape(printable(path))}: {escape(printable(problem))}", highlight=False)

    scores_file = out_dir / "scores.csv"
    with errors_as_messages(f"interrupted: the rows of finished batches are in {scores_file}; "
                            "run the same command with --resume to go on"):
        listed = iter_images(inputs, exclude=own_output(out_dir, inputs), warn=False)
        total = sum(count_images(p, ReadRule()) if is_medical(p) else 1 for p in listed)  # for the progress bar (headers only)
        if ray:
            from .distributed import predict_on_ray

            with progress_bar("predict (ray)", total) as advance:
                summary = predict_on_ray(
                    model_dir, inputs, out_dir, address=ray_address, workers=ray_workers, backbone=backbone,
                    device=runtime.device, batch_size=runtime.batch_size, precision=runtime.precision, threshold=threshold,
                    maps=map_kinds, resume=resume, overwrite=overwrite, on_progress=advance, on_error=report,
                )
        else:
            with loading(f"importing torch, loading {model_dir} and its backbone"):
                det = load_detector(model_dir, backbone=backbone, device=runtime.device, batch_size=runtime.batch_size,
                                    precision=runtime.precision)
            with progress_bar("predict", total) as advance:
                summary = predict_to_dir(
                    det, inputs, out_dir, threshold=threshold, false_alarm_rate=false_alarm_rate, maps=map_kinds,
                    masks=masks, resume=resume, overwrite=overwrite,
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
def export(
    model_dir: Path = typer.Argument(..., help="A model directory written by 'lakead fit'.", show_default=False),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Directory to write the exported model to: a new folder, or one holding only an earlier lakead export (replaced when the new one is complete); anything else, or the model itself, is refused."),
    format: str = typer.Option("onnx", "--format", help="onnx (model.onnx, for ONNX Runtime) or openvino (model.xml + model.bin)."),
    precision: str = typer.Option("fp32", help="The backbone's precision; the head that decides stays float32. fp32 (the same scores), int8 (backbone weights and activations in int8, dynamic), int8-static (int8 calibrated on normal images: --calibrate), bf16 (OpenVINO only: backbone and head as two graphs), or auto (the fastest of bf16, int8-static, fp32 whose decisions equal float32's on --check); see docs/DEPLOY.md."),
    batch: str = typer.Option("dynamic", help="Images per graph call: dynamic, or a fixed number N."),
    check: Optional[list[Path]] = typer.Option(None, "--check", help="Images or folders scored by the torch model and the exported graph before writing: the differences are recorded, and an export whose decisions differ is refused (repeatable)."),
    max_check: int = typer.Option(32, help="At most this many --check images, evenly spaced over the sorted list."),
    calibrate: Optional[list[Path]] = typer.Option(None, "--calibrate", help="int8-static: normal images or folders whose activation ranges set the int8 scales (default: the support images the model was fitted on, if their paths still exist; repeatable)."),
) -> None:
    """Export a fitted model to ONNX or OpenVINO, to run without torch (lakead.runtime, docs/DEPLOY.md)."""
    with loading("importing torch and the ONNX exporter"):
        from .export import export_model
    from .images import list_images, load_image
    from .support import spread_subset

    with errors_as_messages():
        check_output(out_dir, EXPORT, inputs=[model_dir])
        arrays = None
        if check:
            found = list_images(check)
            arrays = [load_image(found[i], str(found[i])) for i in spread_subset(len(found), max_check)]
        calibration = None
        if calibrate:
            calibration = [load_image(p, str(p)) for p in list_images(calibrate)]
        with progress_bar(None):  # the export's stages, a row each
            export_model(model_dir, out_dir, format=format, precision=precision, batch=batch, check=arrays,
                         calibration=calibration)
    from .runtime import read_export_meta

    meta = read_export_meta(out_dir)
    summary = {"file": str(out_dir / meta["file"]), "format": meta["engine"], "precision": meta["precision"],
               "batch": meta["batch"] or "dynamic", "input": f"{meta['input']} (B, 3, {meta['preprocessing']['image_size']}, "
               f"{meta['preprocessing']['image_size']}) float32", "outputs": ", ".join(meta["outputs"])}
    if "check" in meta:
        c = meta["check"]
        summary["check"] = (f"{c['images']} images: largest relative score difference {c['max_relative']:.3g}, "
                            f"decisions differ on {c['decisions_differ']}")
        summary["ran"] = c.get("ran")
    if "auto" in meta:
        summary["auto"] = "; ".join(f"{t['precision']}: " + (t["skipped"] if "skipped" in t else f"{t['decisions_differ']} decisions differ")
                                    for t in meta["auto"]["tried"]) + f" -> {meta['auto']['chose']}"
    _print_summary(summary, title=f"exported to {out_dir}", result=False)


@app.command()
def info(model_dir: Path = typer.Argument(..., help="A model directory written by 'lakead fit' or 'lakead export', or a "
                                          "folder written by 'lakead tune'.", show_default=False)) -> None:
    """Print what a saved (or exported) model holds (without loading the backbone); for a tuning,
    also which configuration was chosen, why, and every candidate's synthetic scores."""
    from .api import describe_model, read_model_meta
    from .outputs import TUNING
    from .runtime import is_exported, read_export_meta

    tuning = None
    with errors_as_messages():
        if TUNING.holds(model_dir):
            from .selection.output import read_tuning

            tuning = read_tuning(model_dir)
            model_dir = model_dir / "model"
        if is_exported(model_dir):
            exp = read_export_meta(model_dir)
            meta = {**((exp.get("source") or {}).get("meta") or {}), "exported": f"{exp['engine']} {exp['precision']}, batch {exp['batch'] or 'dynamic'}"}
        else:
            meta = read_model_meta(model_dir)  # a format-1 model is converted as it is read
        try:
            summary = describe_model(meta)
            for name in ("layer", "semantic_layer"):
                if summary.get(name) is not None:
                    summary[name] = option_text(summary[name])
            if "exported" in meta:
                summary["exported"] = meta["exported"]
        except (KeyError, TypeError) as exc:
            raise LakeadError(f"{model_dir}: lakead.json is damaged (no {exc})") from None
        read = meta.get("read") or {}
        if read:  # fitted on DICOM/NIfTI: how its images were read (docs/MEDICAL.md)
            cfg = meta.get("config") or {}
            summary.update(window=cfg.get("window", "auto"), slices=cfg.get("slices", "axial"),
                           modalities=", ".join(read.get("modalities", [])) or "-",
                           windows_seen=", ".join(read.get("windows", [])) or "-")
        if tuning is not None:
            summary.update(tuned=tuning["chosen"]["candidate"], tuning_rule=tuning["chosen"]["why"],
                           tuning_seconds=tuning["seconds"].get("total"))
    _print_summary(summary, title=str(model_dir))
    if tuning is not None:
        table = Table(title="candidates (lakead tune, synthetic defects)", title_justify="left")
        for col in ("candidate", "image AUROC", "separation", "pixel AUROC", "chosen"):
            table.add_column(col, justify="left" if col in ("candidate", "chosen") else "right")
        for r in tuning["candidates"]:
            cells = [f"{100 * r[k]:.1f}" if r["scored"] and r[k] == r[k] else "-" for k in ("synthetic_image_auroc",)]
            sep = r.get("synthetic_separation")
            table.add_row(r["candidate"], *cells, "-" if not r["scored"] or sep is None or sep != sep else f"{sep:.2f}",
                          "-" if not r["scored"] or r["synthetic_pixel_auroc"] != r["synthetic_pixel_auroc"]
                          else f"{100 * r['synthetic_pixel_auroc']:.1f}",
                          "yes" if r["candidate"] == tuning["chosen"]["candidate"] else "")
        out.print(table)


@app.command()
@runtime_options()
def explain(
    model_dir: Path = typer.Argument(..., help="The model to explain: a directory written by 'lakead fit'.", show_default=False),
    inputs: Optional[list[Path]] = typer.Argument(None, help="Images or folders (searched recursively) to explain; optional.", show_default=False),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Report directory: index.html, report.json and img/ (a new folder, or one holding only an earlier explain report, replaced when the new one is complete)."),
    compare: Optional[list[Path]] = typer.Option(None, "--compare", help="Another fitted model (one per category, same backbone and block) whose sensitive neurons are compared with MODEL_DIR's; repeat for more."),
    top_neurons: int = typer.Option(8, help="Neurons shown per image: the largest contributors at its most anomalous patch."),
    max_images: int = typer.Option(16, help="At most this many images are explained, evenly spaced over the sorted inputs."),
    backbone: Optional[str] = typer.Option(None, help="Where to read the backbone weights from, if not where the model was fitted."),
    *,
    runtime: Runtime,
) -> None:
    """Write an HTML report of a model's sensitive neurons: the variance curve, per-image neuron contributions, and their overlap across models (--compare)."""
    import shlex

    from .explain import compare_models, comparison_labels, explain_images, write_report
    from .images import list_images
    from .methods.lake import LakeDetector
    from .support import spread_subset

    if top_neurons < 1:
        raise typer.BadParameter(f"must be at least 1, got {top_neurons}", param_hint="--top-neurons")
    if max_images < 1:
        raise typer.BadParameter(f"must be at least 1, got {max_images}", param_hint="--max-images")
    with errors_as_messages():
        check_output(out_dir, REPORT, inputs=[model_dir, *(inputs or []), *(compare or [])])  # before the work
        paths = list_images(inputs) if inputs else []
        run = dict(device=runtime.device, batch_size=runtime.batch_size, precision=runtime.precision)
        det = LakeDetector.load(model_dir, backbone=backbone, **run)
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
            others = [LakeDetector.load(d, backbone=det.backbone, **run) for d in compare]
            dets, dirs = [det, *others], [model_dir, *compare]
            comparison = compare_models(dets, comparison_labels(dets, dirs))
        page = write_report(
            out_dir, det, explanations, comparison, image_rule=rule,
            command=" ".join(shlex.quote(a) for a in ["lakead", *sys.argv[1:]]),
        )
    out.print(f"report written to {page}", highlight=False)


@app.command("download-backbone")
def download_backbone(
    model_id: str = typer.Argument(..., help="Hugging Face hub id, e.g. openai/clip-vit-large-patch14-336, facebook/dinov2-base, google/siglip2-base-patch16-224.", show_default=False),
    target: Path = typer.Argument(..., help="Directory to save the model, image processor and tokenizer to: a new folder, or one holding only an earlier download-backbone (replaced when the new one is complete).", show_default=False),
) -> None:
    """Save a hub model of any supported family to a local directory (run where there is network; use it with --backbone)."""
    from .backbones.hub import is_cached, offline_reason
    from .backbones.registry import CHECKPOINT_FAMILIES, supported_families
    from .outputs import output_directory, write_backbone_marker

    with errors_as_messages():
        check_output(target, BACKBONE)  # before the download
        reason = offline_reason()
        if reason and not is_cached(model_id):
            raise LakeadError(f"cannot fetch {model_id!r}: the Hugging Face Hub cannot be used ({reason}); run "
                              f"download-backbone on a machine with network and copy {target} here")
        try:
            from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer

            model_type = getattr(AutoConfig.from_pretrained(model_id), "model_type", None)
            if model_type not in CHECKPOINT_FAMILIES:
                raise LakeadError(f"{model_id!r} is a {model_type!r} model; lakead reads these families:\n{supported_families()}")
            model = AutoModel.from_pretrained(model_id)
            try:
                image_processor = AutoImageProcessor.from_pretrained(model_id)
            except ImportError:  # a processor class that needs torchvision: keep its config file as it is
                from transformers.utils import cached_file

                image_processor = Path(cached_file(model_id, "preprocessor_config.json"))
            tokenizer = None
            if getattr(model, "text_model", None) is not None:
                tokenizer = AutoTokenizer.from_pretrained(model_id)
        except (OSError, ValueError) as exc:
            raise LakeadError(f"cannot fetch {model_id!r} from the Hugging Face Hub: {str(exc).splitlines()[0]}\n"
                              f"lakead reads these families:\n{supported_families()}") from None
        with output_directory(target, BACKBONE) as tmp:
            model.save_pretrained(tmp)
            if isinstance(image_processor, Path):
                (Path(tmp) / image_processor.name).write_bytes(image_processor.read_bytes())
            else:
                image_processor.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            write_backbone_marker(tmp, model_id=model_id, model_type=model_type)
    out.print(f"saved {model_id} ({model_type}) to {target}; use it with --backbone {target}")


@app.command()
@runtime_options(pixels=False)  # the service has its own limits (--max-megapixels...)
def serve(
    models_dir: Path = typer.Option(..., "--models-dir", help="Directory the models are stored in (created if missing)."),
    backbone: str = typer.Option(DEFAULT_BACKBONE, help="Backbone of models created through the service: hub id, local save_pretrained directory, or onnx:PATH (loaded when a request needs it; the stored models are served without it)."),
    allow_backbone: list[str] = typer.Option([], "--allow-backbone", help="Another backbone clients may choose (repeatable)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on; 127.0.0.1 serves this machine only."),
    port: int = typer.Option(8000, help="Port to listen on."),
    token: Optional[str] = typer.Option(None, envvar="LAKEAD_TOKEN", help="Require 'Authorization: Bearer TOKEN' on every call but /healthz (or set LAKEAD_TOKEN)."),
    insecure: bool = typer.Option(False, "--insecure", help="Serve a non-loopback --host without a token (anyone who can reach it can use it)."),
    allowed_host: list[str] = typer.Option([], "--allowed-host", help="Another host name clients use to reach the service (repeatable; checked against the Host header)."),
    workers: int = typer.Option(2, help="Predictions run at once (fits run one at a time)."),
    max_upload_mb: float = typer.Option(256.0, help="Largest request body, in MiB."),
    max_images: int = typer.Option(256, help="Most normal images in one model creation."),
    max_predict_images: int = typer.Option(32, help="Most images in one prediction request."),
    max_megapixels: float = typer.Option(40.0, help="Most pixels of one image file, in millions (read from its header)."),
    max_decode_megapixels: float = typer.Option(4.0, help="Larger images are downscaled to this many million pixels while decoded."),
    max_total_megapixels: float = typer.Option(200.0, help="Most decoded pixels of all the images of one request, in millions."),
    max_server_megapixels: float = typer.Option(400.0, help="Most decoded pixels held by all requests at once, in millions (others wait)."),
    max_image_size: int = typer.Option(1024, help="Largest image_size (network input side) a client may choose."),
    max_queued: int = typer.Option(16, help="Requests waiting for a worker, per model (and for fits); more get 503."),
    max_sigma: int = typer.Option(16, help="Largest map blur (sigma, blur_sigma) a model may have, in pixels of the model input."),
    max_ef_search: int = typer.Option(1024, help="Largest hnsw_ef_search a model may have."),
    max_neighbours: int = typer.Option(64, help="Largest PatchCore neighbours a model may have."),
    max_work_memory_mb: int = typer.Option(4096, help="Memory one fit or prediction may hold, in MiB, estimated from its options and images before it starts (413 past it)."),
    max_seconds: int = typer.Option(900, help="Longest one fit or prediction may run, in seconds; past it, it is stopped (503)."),
    *,
    runtime: Runtime,
) -> None:
    """Serve the models in --models-dir over HTTP, with a web page at /."""
    try:
        with loading("importing torch and the service"):
            import uvicorn

            from .serve import ServeLimits, create_app
            from .serve.guard import served_hosts
    except ImportError as exc:
        raise fail(f"the service needs the serve extra ({exc.name} is missing): pip install 'lakead[serve]'") from None
    import os
    from urllib.parse import quote

    loopback = host in ("127.0.0.1", "localhost", "::1")
    if not loopback and token is None and not insecure:
        raise fail(f"refusing to serve on {host} without a token: anyone who can reach this machine could create, use "
                   "and delete models. Give --token (or LAKEAD_TOKEN), or --insecure to do it anyway")
    with errors_as_messages():
        limits = ServeLimits(
            max_request_bytes=int(max_upload_mb * 2**20), max_fit_images=max_images,
            max_predict_images=max_predict_images, max_image_pixels=int(max_megapixels * 1e6),
            max_decode_pixels=int(max_decode_megapixels * 1e6), max_total_pixels=int(max_total_megapixels * 1e6),
            max_server_pixels=int(max_server_megapixels * 1e6), max_image_size=max_image_size, max_queued=max_queued,
            max_sigma=max_sigma, max_ef_search=max_ef_search, max_neighbours=max_neighbours,
            max_work_memory_mb=max_work_memory_mb, max_seconds=max_seconds,
        )
        service = create_app(
            models_dir, backbone=backbone, allowed_backbones=tuple(allow_backbone), token=token, limits=limits,
            device=runtime.device, batch_size=runtime.batch_size, precision=runtime.precision, workers=workers,
            allowed_hosts=served_hosts(host, allowed_host), allow_ip_hosts=not loopback,
        )
    # the backbones are loaded when a request needs one (a fit, or a stored model's first prediction):
    # the stored models are served even when the default backbone cannot be had here
    problem = _backbone_problem(backbone)
    if problem:
        err.print(f"[yellow]note:[/] {escape(problem)}; the stored models are served, and creating a model on "
                  f"{escape(backbone)} answers 503 until it can be loaded", highlight=False, soft_wrap=True)
    if not loopback and token is None:
        err.print(f"[yellow]warning:[/] serving on {host} without --token (--insecure): anyone who can reach this "
                  "machine can create, use and delete models", highlight=False)
    shown = f"[{host}]" if ":" in host else ("127.0.0.1" if host in ("0.0.0.0", "::") else host)
    from_env = token is not None and os.environ.get("LAKEAD_TOKEN") == token  # kept off the screen and logs too
    url = f"http://{shown}:{port}/" + (f"#token={quote(token, safe='')}" if token and not from_env else "")
    out.print(f"lakead serving {len(service.state.store.list())} model(s) from {models_dir} at {url}"
              + (" (add #token=<LAKEAD_TOKEN>, or type it into the page)" if from_env else ""), highlight=False, soft_wrap=True)
    uvicorn.run(service, host=host, port=port, log_level="warning" if state["quiet"] else "info")


def _backbone_problem(spec: str) -> str | None:
    """Why the backbone ``spec`` cannot be loaded here, found without loading it (a missing
    ONNX file; a hub model without network that is not cached), or None."""
    from .backbones.hub import hub_options

    if spec.startswith("onnx:"):
        path = Path(spec.removeprefix("onnx:")).expanduser()
        return None if path.is_file() else f"cannot load the backbone {spec!r}: {path} is no ONNX file"
    try:
        hub_options(spec)
    except LakeadError as exc:
        return str(exc).splitlines()[0].rstrip(".")
    return None


from . import cli_eval  # noqa: E402,F401 - registers eval, ablate and baselines on the app
from . import cli_demo  # noqa: E402,F401 - registers demo on the app
from . import cli_layers  # noqa: E402,F401 - registers layers on the app
from . import cli_tune  # noqa: E402,F401 - registers tune on the app
from . import cli_line  # noqa: E402,F401 - registers update, history, rollback and watch on the app


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
