"""Scoring on a Ray cluster: the job of :func:`lakead.batch.predict_to_dir`, spread over workers.

Ray Data streams the image paths through ``map_batches`` to a pool of actors
(:class:`RayScorer`), each of which loads the fitted model once and then reads, scores and
writes map files for one batch after another; the driver appends the rows to ``scores.csv``
in input order (``preserve_order``) as they come back, with the same resume and crash
safety as the single-process run. Rows and map files are made by the same function
(:func:`lakead.batch.score_batch`) on both paths, so the results are identical.

What a cluster run needs (see docs/SCALE.md):

- lakead (the same version) and ``lakead[ray]`` installed on every node;
- the images readable at the same path on every node (a shared file system), and ``--out``
  writable at the same path on every node when map files are written (``--maps none``
  needs the output only where the command runs);
- the backbone weights where the model says (or ``--backbone``) on every node; the fitted
  model itself is shipped to the workers through Ray, so it needs to exist only where the
  command runs.

Ray is an optional dependency (``pip install 'lakead[ray]'``), imported only here.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from .batch import (
    DEFAULT_MAPS,
    SCORE_COLUMNS,
    BatchSummary,
    OutputDir,
    Todo,
    OutputNames,
    check_target,
    own_output,
    output_root,
    parse_maps,
    read_ahead,
    record,
    run_info,
    score_batch,
)
from .errors import ConfigError, ImageLoadError, LakeadError

log = logging.getLogger("lakead")

#: Paths handed to Ray per dataset: the driver holds at most this many at once (a few MB).
CHUNK_PATHS = 50_000
#: Batches per Ray block of paths: enough rows per block to keep the actors busy.
BATCHES_PER_BLOCK = 4


def _import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401  (needs pyarrow: the [data] extra of ray)
    except ImportError as exc:
        raise LakeadError(f"--ray needs Ray Data, which is not installed ({exc}): pip install 'lakead[ray]'") from None
    return ray


class RayScorer:
    """A Ray Data actor: loads the fitted model once, then scores batches of paths.

    ``model_files`` are the bytes of the saved model directory (Ray Data puts them in the
    object store once; each worker writes them to a temporary folder and loads the model). Input batches carry ``path`` and ``name`` columns;
    output batches carry ``path``, the four score fields (formatted as in ``scores.csv``),
    ``error`` (empty when the image was scored) and ``failure`` (a problem that stops the
    run, such as a backbone that cannot be loaded; empty normally), one row per input row.
    """

    def __init__(
        self,
        model_files: dict[str, bytes],
        out_dir: str,
        maps: Collection[str],
        threshold: float | None,
        backbone: str | None,
        device: str | None,
        batch_size: int | None,
        precision: str | None,
        threads: int,
    ) -> None:
        import torch

        from .methods import load_detector

        torch.set_num_threads(threads)
        self.failure = ""  # a LakeadError met here is reported with the first batch (no Ray retries)
        tmp = tempfile.mkdtemp(prefix="lakead-model-")
        try:
            for name, data in model_files.items():
                Path(tmp, name).write_bytes(data)
            self.detector = load_detector(tmp, backbone=backbone, device=device, batch_size=batch_size, precision=precision)
        except LakeadError as exc:
            self.failure = str(exc).replace(tmp, "<model>")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.out_dir = Path(out_dir)
        self.maps = frozenset(maps)
        self.threshold = threshold
        self.pool = ThreadPoolExecutor(max(2, threads), thread_name_prefix="lakead-read")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        paths = [str(p) for p in batch["path"]]
        names = [str(n) for n in batch["name"]]
        columns: dict[str, list[str]] = {k: [] for k in (*SCORE_COLUMNS, "error", "failure")}
        failure = self.failure
        by_index: dict[int, tuple[str, ...]] = {}
        errors: dict[int, str] = {}
        if not failure:
            try:
                by_index, errors = self._score(paths, names)
            except LakeadError as exc:  # not about one image: stop the run with this message
                failure = str(exc)
        for i, path in enumerate(paths):
            row = by_index.get(i, (path,) + ("",) * (len(SCORE_COLUMNS) - 1))
            for key, value in zip(SCORE_COLUMNS, row):
                columns[key].append(value)
            columns["error"].append(errors.get(i, ""))
            columns["failure"].append(failure)
        return {k: np.asarray(v, dtype=object) for k, v in columns.items()}

    def _score(self, paths: list[str], names: list[str]) -> tuple[dict[int, tuple[str, ...]], dict[int, str]]:
        det = self.detector
        arrays, kept, errors = [], [], {}
        for i, (_, result) in enumerate(read_ahead(paths, lambda s: det.read_image(s, s), self.pool, depth=len(paths))):
            if isinstance(result, ImageLoadError):
                errors[i] = result.problem
            else:
                arrays.append(result)
                kept.append(i)
        rows = score_batch(det, arrays, [paths[i] for i in kept], [names[i] for i in kept], self.out_dir, self.maps,
                           threshold=self.threshold, pool=self.pool)[0] if arrays else []
        return dict(zip(kept, rows)), errors


def _model_files(model_dir: Path) -> tuple[dict[str, bytes], dict[str, Any]]:
    """The saved model's files (to ship to the workers) and its identity for ``run.json``."""
    from safetensors.torch import load

    from .api import CONFIG_FILE, TENSORS_FILE, read_model_meta, tensor_fingerprint

    meta = read_model_meta(model_dir)
    try:
        files = {name: (model_dir / name).read_bytes() for name in (CONFIG_FILE, TENSORS_FILE)}
        tensors = load(files[TENSORS_FILE])
        identity = {
            "class_name": meta["class_name"],
            "fitted_at": meta["fitted_at"],
            "fingerprint": tensor_fingerprint(tensors, {"fitted_at": meta["fitted_at"]}),
            "threshold": math.inf if meta["threshold"] is None else float(meta["threshold"]),
        }
    except (OSError, KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise LakeadError(f"{model_dir}: saved model cannot be read ({exc})") from None
    return files, identity


def _chunks(items: Iterator[str], size: int) -> Iterator[list[str]]:
    while chunk := list(islice(items, size)):
        yield chunk


def _start_ray(ray: Any, address: str | None, workers: int | None, cpus_per_worker: int) -> bool:
    """Connect to ``address`` (or ``RAY_ADDRESS``), or start a local cluster. True if started here."""
    if ray.is_initialized():
        return False
    common = dict(include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    if address or os.environ.get("RAY_ADDRESS"):
        try:
            ray.init(address=address, **common)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise LakeadError(f"--ray-address {address or os.environ.get('RAY_ADDRESS')}: cannot connect to the Ray cluster "
                              f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    else:
        cpus = (workers or (os.cpu_count() or 1)) * cpus_per_worker
        ray.init(num_cpus=cpus, **common)
    return True


def predict_on_ray(
    model_dir: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    address: str | None = None,
    workers: int | None = None,
    cpus_per_worker: int = 1,
    backbone: str | None = None,
    device: str | None = None,
    batch_size: int | None = None,
    precision: str | None = None,
    threshold: float | None = None,
    maps: str | Collection[str] = DEFAULT_MAPS,
    resume: bool = False,
    overwrite: bool = False,
    on_progress: Callable[[int], None] | None = None,
    on_error: Callable[[str, str], None] | None = None,
) -> BatchSummary:
    """Score ``inputs`` into ``out_dir`` on Ray, as :func:`lakead.batch.predict_to_dir` does.

    ``address``: a Ray cluster to join (``ray://host:10001``, ``host:6379`` or ``auto``);
    without one, ``RAY_ADDRESS`` if set, else a local cluster with ``workers *
    cpus_per_worker`` CPUs is started and stopped. ``workers``: model replicas (default: one
    per ``cpus_per_worker`` CPUs of the cluster, or one per GPU when ``device`` is CUDA).
    The other options are those of ``lakead predict``.
    """
    from .images import iter_images

    check_target(out_dir, resume=resume, overwrite=overwrite)  # before a cluster is started
    ray = _import_ray()
    maps = parse_maps(maps) if isinstance(maps, str) else parse_maps(list(maps) or "none")
    if workers is not None and workers < 1:
        raise ConfigError(f"--ray-workers must be at least 1, got {workers}")
    if cpus_per_worker < 1:
        raise ConfigError(f"cpus_per_worker must be at least 1, got {cpus_per_worker}")
    from .api import PRECISIONS, Runtime

    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    if precision is not None and precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    # the device is checked by the workers (the driver may have no GPU)
    runtime = Runtime(device=device or "auto", batch_size=batch_size or Runtime.batch_size, precision=precision or Runtime.precision)
    model_dir = Path(model_dir)
    files, ident = _model_files(model_dir)
    from .api import read_model_meta
    from .medical import ReadRule, expand_all

    saved = read_model_meta(model_dir).get("config") or {}
    rule = ReadRule(str(saved.get("window", "auto")), str(saved.get("slices", "axial")))
    # the run's own output is never an input; volumes and multi-frame files are listed by image
    paths = expand_all(iter_images(inputs, exclude=own_output(out_dir, inputs)), rule)
    root = output_root(inputs)
    out = Path(out_dir)
    bs = runtime.batch_size
    gpu = runtime.device.startswith("cuda")
    summary = BatchSummary(threshold=ident["threshold"] if threshold is None else float(threshold))
    info = run_info(ident["class_name"], ident["fitted_at"], ident["fingerprint"], summary.threshold,
                    runtime.precision, maps)

    started = _start_ray(ray, address, workers, cpus_per_worker)
    try:
        resources = ray.cluster_resources()
        have_gpus, have_cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
        if gpu and not have_gpus:
            raise ConfigError(f"device {runtime.device!r} asked for, but the Ray cluster has no GPU")
        if workers is None:
            workers = max(1, have_gpus if gpu else have_cpus // cpus_per_worker)
        if workers * cpus_per_worker > have_cpus or (gpu and workers > have_gpus):
            log.warning("%d Ray workers need %d CPUs%s; the cluster has %d CPUs and %d GPUs now: "
                        "the run waits until an autoscaler adds them", workers, workers * cpus_per_worker,
                        f" and {workers} GPUs" if gpu else "", have_cpus, have_gpus)
        ctx = ray.data.DataContext.get_current()
        saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.enable_operator_progress_bars)
        ctx.execution_options.preserve_order = True  # rows come back in input order
        ctx.enable_progress_bars = False  # lakead shows its own
        ctx.enable_operator_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.ERROR)  # progress chatter; errors still raise
        try:
            scorer = dict(model_files=files, out_dir=str(out.resolve()), maps=sorted(maps), threshold=threshold,
                          backbone=backbone, device=device, batch_size=bs, precision=precision, threads=cpus_per_worker)
            resources = dict(compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=cpus_per_worker,
                             num_gpus=1 if gpu else 0)
            with OutputDir(out, info, resume=resume, overwrite=overwrite) as results:
                _run(ray, Todo(paths, results, OutputNames(root)), results, root, scorer, resources, bs, summary, on_progress,
                     on_error)
        finally:
            ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.enable_operator_progress_bars = saved
    finally:
        if started:
            ray.shutdown()
    return summary


def _run(
    ray: Any, todo: Todo, results: OutputDir, root: Path, scorer: dict[str, Any], resources: dict[str, Any],
    batch_size: int, summary: BatchSummary, on_progress: Callable[[int], None] | None,
    on_error: Callable[[str, str], None] | None,
) -> None:
    """The driver's loop: chunks of paths through the actor pool, rows appended as they come."""
    for chunk in _chunks(iter(todo), CHUNK_PATHS):
        items = [{"path": p, "name": todo.take_name(p)} for p in chunk]  # unique names, as the single-process run
        blocks = max(1, math.ceil(len(items) / (batch_size * BATCHES_PER_BLOCK)))
        ds = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
            RayScorer, fn_constructor_kwargs=scorer, batch_size=batch_size, batch_format="numpy", **resources)
        del items, chunk
        for res in ds.iter_batches(batch_size=None, batch_format="numpy"):
            n = len(res["path"])
            if n and res["failure"][0]:
                raise LakeadError(f"on a Ray worker: {res['failure'][0]}")
            rows = [tuple(str(res[k][i]) for k in SCORE_COLUMNS) for i in range(n) if not res["error"][i]]
            errors = [(str(res["path"][i]), str(res["error"][i])) for i in range(n) if res["error"][i]]
            results.commit(rows, errors)
            record(summary, rows, errors)
            if on_error is not None:
                for path, problem in errors:
                    on_error(path, problem)
            if on_progress is not None:
                on_progress(todo.take_skipped() + n)
    if on_progress is not None and (n := todo.take_skipped()):
        on_progress(n)
    summary.skipped = todo.skipped


# -- fit ------------------------------------------------------------------------------------------


class RayFitWorker:
    """A Ray actor for :func:`fit_on_ray`: holds the backbone once, answers the fit's jobs
    (:func:`lakead.methods.lake.stream.run_job`: read a batch, run it, return its moments and tokens)."""

    def __init__(self, config: dict[str, Any], device: str, batch_size: int, precision: str, threads: int,
                 ctx: Any) -> None:
        import torch

        from .methods.lake import LakeConfig, LakeDetector

        torch.set_num_threads(threads)
        self.failure = ""
        try:
            cfg = LakeConfig.from_dict(config)
            self.det = LakeDetector(cfg.backbone, config=cfg, device=device, batch_size=batch_size, precision=precision)
            dev = self.det.runtime.torch_device()
            self.det.backbone.to(dev)
            if cfg.text_backbone is not None and ctx.text is not None:
                self.det.text_model.to(dev)
        except LakeadError as exc:
            self.failure = str(exc)
        self.ctx = ctx

    def run(self, job: Any) -> Any:
        from .methods.lake.stream import run_job

        if self.failure:
            return self.failure
        try:
            return run_job(self.det, job, self.ctx)
        except LakeadError as exc:  # not about one image (those come back in the result): stop the fit
            return str(exc)


def fit_on_ray(
    det: Any,
    images: Sequence[Any],
    class_name: str,
    *,
    address: str | None = None,
    workers: int | None = None,
    cpus_per_worker: int = 1,
    **fit_options: Any,
) -> Any:
    """``det.fit(images, class_name, **fit_options)`` with the forward passes on Ray actors.

    The driver lists the batches and merges what comes back in batch order: the channel
    moments exactly as the one-process fit merges them (:class:`lakead.ops.Moments`), the
    gallery through the same builder, so the model is the one a one-process fit makes. Each
    actor loads the backbone once (``det.config.backbone`` must be readable on every node, and
    so must the images). ``address``, ``workers`` and ``cpus_per_worker`` as for
    :func:`predict_on_ray`. Returns ``det``.
    """
    ray = _import_ray()
    if workers is not None and workers < 1:
        raise ConfigError(f"--ray-workers must be at least 1, got {workers}")
    rt = det.runtime
    gpu = rt.device.startswith("cuda")
    started = _start_ray(ray, address, workers, cpus_per_worker)
    actors: list[Any] = []
    try:
        resources = ray.cluster_resources()
        if gpu and not int(resources.get("GPU", 0)):
            raise ConfigError(f"device {rt.device!r} asked for, but the Ray cluster has no GPU")
        n = workers or max(1, int(resources.get("GPU", 0)) if gpu else int(resources.get("CPU", 1)) // cpus_per_worker)
        actor = ray.remote(num_cpus=cpus_per_worker, num_gpus=1 if gpu else 0)(RayFitWorker)

        def factory(_det: Any, ctx: Any) -> Callable[[Any], Iterator[Any]]:
            if not actors:
                actors.extend(actor.remote(det.config.to_dict(), rt.device, rt.batch_size, rt.precision, cpus_per_worker,
                                           ctx) for _ in range(n))
            return lambda jobs: _in_order(ray, actors, jobs)

        return det.fit(images, class_name, runner=factory, **fit_options)
    finally:
        for a in actors:
            ray.kill(a)
        if started:
            ray.shutdown()


def _in_order(ray: Any, actors: list[Any], jobs: Any) -> Iterator[Any]:
    """Run jobs on the actors, at most two per actor in flight; results in job order."""
    from collections import deque

    pending: deque = deque()
    for i, job in enumerate(jobs):
        if len(pending) >= 2 * len(actors):
            yield _result(ray, pending.popleft())
        pending.append(actors[i % len(actors)].run.remote(job))
    while pending:
        yield _result(ray, pending.popleft())


def _result(ray: Any, ref: Any) -> Any:
    out = ray.get(ref)
    if isinstance(out, str):
        raise LakeadError(f"on a Ray worker: {out}")
    return out
