"""Run an exported detector without torch or transformers: numpy, Pillow and ONNX Runtime or OpenVINO.

A directory written by ``lakead export`` (:mod:`lakead.export`) holds one graph (``model.onnx``,
or ``model.xml`` + ``model.bin`` for OpenVINO) and ``lakead-export.json``. :class:`ExportedDetector`
reads both and does what ``predict`` does with the torch model: the same preprocessing
(:func:`lakead.images.preprocess`), the graph, each map bilinearly upsampled to its image's own
size (:func:`upsample`), and the decisions at the budget stored with the model::

    from lakead.runtime import ExportedDetector
    det = ExportedDetector.load("exported/")
    pred = det.predict(["part.png"])        # a lakead.api.Prediction, as the torch path returns
    pred.scores, pred.anomalous, pred.maps[0]

This module imports only numpy, Pillow, the engine and torch-free lakead modules (a test runs
it with ``import torch`` made to fail). Install: ``pip install --no-deps lakead`` then the
``runtime`` extra's packages (docs/DEPLOY.md).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._version import __version__
from .api import Prediction, Runtime
from .decision import Thresholds
from .errors import ConfigError, ImageLoadError, ModelFormatError
from .images import ImageInput, LoadedImages, load_image, preprocess, read_all, source_name
from .validate import check_export_meta, load_json

log = logging.getLogger("lakead")

EXPORT_FILE = "lakead-export.json"
EXPORT_FORMAT = "lakead-export"
EXPORT_VERSION = 1
FORMATS = ("onnx", "openvino")
PRECISIONS = ("fp32", "bf16", "int8", "int8-static")
ENGINES = ("onnxruntime", "openvino")
_KEYS = ("engine", "file", "precision", "batch", "input", "outputs", "source", "preprocessing", "grid", "map_grid",
         "map_range", "sigma", "lam", "decision", "class_name", "fitted_at")


def is_exported(path: str | os.PathLike) -> bool:
    """True when ``path`` is a directory written by ``lakead export``."""
    return (Path(path) / EXPORT_FILE).is_file()


def read_export_meta(path: str | os.PathLike) -> dict[str, Any]:
    """``lakead-export.json`` of an exported model, checked (format, version, keys)."""
    f = Path(path) / EXPORT_FILE
    if not Path(path).is_dir():
        raise ModelFormatError(f"{path}: no such directory (an exported model is a directory written by 'lakead export')")
    try:
        meta = load_json(f)  # strict: finite numbers, bounded depth (lakead.validate)
    except FileNotFoundError:
        raise ModelFormatError(f"{f}: missing; is {path} a directory written by 'lakead export'?") from None
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        raise ModelFormatError(f"{f}: not a lakead export description (format {meta.get('format') if isinstance(meta, dict) else None!r})")
    if meta.get("format_version") != EXPORT_VERSION:
        raise ModelFormatError(f"{f}: export format version {meta.get('format_version')!r}; this lakead ({__version__}) "
                               f"reads version {EXPORT_VERSION}: export the model again with this lakead")
    missing = [k for k in _KEYS if k not in meta]
    if missing:
        raise ModelFormatError(f"{f}: damaged (no {', '.join(missing)})")
    if meta["engine"] not in FORMATS or meta["precision"] not in PRECISIONS:
        raise ModelFormatError(f"{f}: unknown engine {meta['engine']!r} or precision {meta['precision']!r}")
    return check_export_meta(meta, str(f))  # every field the runtime reads, in range


def upsample(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize ``(gh, gw) -> (H, W)`` float32 with half-pixel centres (``align_corners=False``),
    the same numbers as ``torch.nn.functional.interpolate(..., mode="bilinear")`` that
    :func:`lakead.ops.upsample_map` uses.

    >>> upsample(np.array([[0.0, 1.0]]), (1, 4)).tolist()
    [[0.0, 0.25, 0.75, 1.0]]
    """
    g = np.asarray(grid, dtype=np.float32)
    return _axis_weights(g.shape[0], size[0]) @ g @ _axis_weights(g.shape[1], size[1]).T


def _axis_weights(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)`` interpolation matrix of one axis (torch's source index rule)."""
    src = np.maximum((np.arange(n_out, dtype=np.float32) + 0.5) * np.float32(n_in / n_out) - 0.5, 0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = (src - i0).astype(np.float32)
    w = np.zeros((n_out, n_in), dtype=np.float32)
    np.add.at(w, (np.arange(n_out), i0), 1 - frac)
    np.add.at(w, (np.arange(n_out), i1), frac)
    return w


#: The decision levels stored with the model: :class:`lakead.decision.Thresholds` (numpy only).
Levels = Thresholds


#: OpenVINO's runtime layer types that do the matrix products (where the inference precision shows).
_OV_PRODUCTS = ("FullyConnected", "MatMul", "Convolution")
#: What the graph's own precision means on ONNX Runtime's CPU provider (it has no reduced float precision setting).
_ORT_RAN = {"fp32": "fp32", "int8": "int8 backbone products (quantized dynamically), fp32 head",
            "int8-static": "int8 backbone products (static, QDQ), fp32 head", "bf16": "fp32"}


def cpu_description() -> str:
    """The CPU's model name and the flags that decide which arithmetic the engines can use
    (``/proc/cpuinfo`` on Linux; the platform's processor string elsewhere)."""
    import platform

    try:
        info = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return platform.processor() or platform.machine()
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), platform.machine())
    flags = set(next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), []))
    wanted = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8") if f in flags]
    return f"{name} ({', '.join(wanted) or 'none of avx2, avx512, amx'})"


class _OnnxRuntime:
    def __init__(self, file: Path, threads: int | None, precision: str) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(file), sess_options=opts, providers=["CPUExecutionProvider"])
        self.precision = precision

    def __call__(self, feeds: dict[str, np.ndarray], outputs: Sequence[str]) -> list[np.ndarray]:
        return self.session.run(list(outputs), feeds)

    def ran(self) -> str:
        """The precision that runs: the graph's own (ONNX Runtime's CPU provider runs what the graph says)."""
        return _ORT_RAN[self.precision]


class _OpenVINO:
    def __init__(self, file: Path, threads: int | None, precision: str) -> None:
        import openvino as ov

        core = ov.Core()
        self.capabilities = list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32"}  # always set: the CPU plugin's default is bf16 where the CPU has it
        if precision == "bf16" and "BF16" not in self.capabilities:
            log.warning("this CPU has no bfloat16 arithmetic (OpenVINO: %s): the bf16 model runs in float32", self.capabilities)
            config["INFERENCE_PRECISION_HINT"] = "f32"
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = core.compile_model(str(file), "CPU", config)

    def __call__(self, feeds: dict[str, np.ndarray], outputs: Sequence[str]) -> list[np.ndarray]:
        result = self.compiled.create_infer_request().infer(feeds)  # one request per call: thread-safe
        return [np.asarray(result[self.compiled.output(n)]) for n in outputs]

    def ran(self) -> str:
        """The precision the compiled model's matrix products run in, read from OpenVINO's runtime
        model (``runtimePrecision`` of its FullyConnected, MatMul and Convolution nodes), e.g. ``bf16``
        or ``bf16 70, f32 2``, with the hint it was compiled with."""
        from collections import Counter

        counts: Counter[str] = Counter()
        for op in self.compiled.get_runtime_model().get_ops():
            info = op.get_rt_info()
            if "layerType" in info and str(info["layerType"].astype(str)) in _OV_PRODUCTS:
                counts[str(info["runtimePrecision"].astype(str))] += 1
        hint = getattr(self.compiled.get_property("INFERENCE_PRECISION_HINT"), "type_name", None) or "?"  # e.g. "bf16"
        products = next(iter(counts)) if len(counts) == 1 else ", ".join(f"{k} {v}" for k, v in counts.most_common())
        return f"{products or 'no matrix product'} (OpenVINO CPU, inference precision {hint})"


class _TwoGraphs:
    """The backbone graph at the export's precision, then the head graph in float32 (``meta["head"]``)."""

    def __init__(self, backbone: Any, head: Any, cut: Sequence[str]) -> None:
        self.backbone, self.head, self.cut = backbone, head, list(cut)

    def __call__(self, feeds: dict[str, np.ndarray], outputs: Sequence[str]) -> list[np.ndarray]:
        return self.head(dict(zip(self.cut, self.backbone(feeds, self.cut))), outputs)

    def ran(self) -> str:
        return f"backbone {self.backbone.ran()}; head {self.head.ran()}"


class ExportedDetector:
    """A model written by ``lakead export``, run with ONNX Runtime or OpenVINO (no torch).

    It offers what :mod:`lakead.batch` and the service use of a :class:`~lakead.api.Detector`
    (``predict``, ``read_image``, ``summary``, ``fingerprint``, ``threshold_``, ``map_range_``...);
    it cannot be fitted or saved (export the torch model again instead).
    """

    method = "exported"
    is_fitted = True

    def __init__(self, path: str | os.PathLike, meta: dict[str, Any], *, engine: str | None = None,
                 batch_size: int | None = None, threads: int | None = None) -> None:
        self.path = Path(path)
        self.meta = meta
        fixed = meta["batch"]
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        bs = fixed or batch_size or 8
        if fixed and batch_size not in (None, fixed):
            log.info("%s: the graph takes batches of %d images; batch size %d is not used", path, fixed, batch_size)
        self.runtime = Runtime(device="cpu", batch_size=bs, precision=meta["precision"])  # what lakead.batch reads
        engine = engine or ("onnxruntime" if meta["engine"] == "onnx" else "openvino")
        if engine not in ENGINES or (engine == "onnxruntime" and meta["engine"] != "onnx"):
            raise ConfigError(f"engine {engine!r} cannot run a {meta['engine']} export; "
                              f"{'onnxruntime or openvino' if meta['engine'] == 'onnx' else 'openvino'} can")
        head = meta.get("head")
        files = [self.path / meta["file"]] + ([self.path / head["file"]] if head else [])
        for file in files:
            if not file.is_file():
                raise ModelFormatError(f"{file}: missing (a graph of the exported model)")
        kind = _OnnxRuntime if engine == "onnxruntime" else _OpenVINO
        try:
            self.engine = kind(files[0], threads, meta["precision"])
            if head:  # the backbone at the export's precision, the head (which decides) in float32
                self.engine = _TwoGraphs(self.engine, kind(files[1], threads, "fp32"), head["inputs"])
        except ImportError as exc:
            raise ConfigError(f"{path}: running it needs the {engine} package ({exc.name} is not installed): "
                              f"pip install {engine}") from None
        except Exception as exc:  # the engines raise their own exception types on a damaged file
            raise ModelFormatError(f"{files[0]}: {engine} cannot load it ({type(exc).__name__}: {str(exc).strip()[:300]})") from None
        self.engine_name = engine
        #: the precision that actually runs (read from the engine, not the export's setting)
        self.ran = self.engine.ran()
        self.runtime = Runtime(device="cpu", batch_size=bs, precision=self.ran)  # what lakead.batch records in run.json
        d = meta["decision"]
        self.levels = Levels(math.inf if d["threshold"] is None else float(d["threshold"]), d["threshold_rule"],
                             d["false_alarm_rate"], d["seed_threshold"], d["pixel_threshold"], d["scope_threshold"])

    @classmethod
    def load(cls, path: str | os.PathLike, *, engine: str | None = None, batch_size: int | None = None,
             threads: int | None = None) -> "ExportedDetector":
        """Read an exported model. ``engine``: onnxruntime (default for ONNX) or openvino (default for
        IR; it also runs an ONNX file); ``threads``: intra-op threads (default: the engine's)."""
        return cls(path, read_export_meta(path), engine=engine, batch_size=batch_size, threads=threads)

    # -- what users of a Detector read ----------------------------------------------------

    @property
    def threshold_(self) -> float:
        return self.levels.image

    @property
    def map_range_(self) -> tuple[float, float]:
        return (float(self.meta["map_range"][0]), float(self.meta["map_range"][1]))

    @property
    def class_name_(self) -> str:
        return str(self.meta["class_name"])

    @property
    def fitted_at_(self) -> str:
        return str(self.meta["fitted_at"])

    @property
    def patch_size(self) -> int:
        """Pixels per token side: an image must be at least this large."""
        return int(self.meta["preprocessing"]["patch_size"])

    @property
    def read_rule(self) -> Any:
        """How DICOM and NIfTI inputs are read: the source model's ``window`` and ``slices``
        (:class:`lakead.medical.ReadRule`, as :attr:`lakead.base.BaseDetector.read_rule`)."""
        from .medical import ReadRule

        config = self.meta["source"].get("meta", {}).get("config", {})
        return ReadRule(str(config.get("window", "auto")), str(config.get("slices", "axial")))

    def check_fitted(self) -> "ExportedDetector":
        return self

    def fingerprint(self) -> str:
        """The source model's fingerprint for a float32 export (its scores are the same); a
        fingerprint of the source, format and precision otherwise (``predict --resume`` keeps
        rows only from the same numbers)."""
        fp = self.meta["source"]["fingerprint"]
        if self.meta["precision"] == "fp32":
            return fp
        return hashlib.sha256(f"{fp}:{self.meta['engine']}:{self.meta['precision']}".encode()).hexdigest()

    def thresholds(self, false_alarm_rate: float | None = None) -> Levels:
        """The stored decision levels. Another budget needs the normal images' leave-one-out
        scores, which an export does not carry: give a threshold, or export again."""
        if false_alarm_rate is not None and false_alarm_rate != self.levels.budget:
            raise ConfigError(f"{self.path}: an exported model decides at the budget it was exported with "
                              f"({self.levels.budget}); for false_alarm_rate {false_alarm_rate} give a threshold, or "
                              "export a model fitted (or predicted) with that budget")
        return self.levels

    def summary(self) -> dict[str, Any]:
        m = self.meta
        return {"method": m["source"]["method"], "exported": f"{m['engine']} {m['precision']} (run with {self.engine_name})",
                "ran": self.ran, "cpu": cpu_description(),
                "class_name": m["class_name"], "backbone": m["source"]["backbone"]["source"],
                "image_size": m["preprocessing"]["image_size"], "grid": m["grid"], "batch": m["batch"] or "dynamic",
                "threshold": self.levels.image, "threshold_rule": self.levels.rule,
                "false_alarm_rate": self.levels.budget, "source_fingerprint": m["source"]["fingerprint"],
                "lakead_version": m["lakead_version"]}

    def read_image(self, image: ImageInput, name: str | None = None) -> np.ndarray:
        """One input as a ``(H, W, 3)`` uint8 array (as the torch detector reads it)."""
        label = name or source_name(image)
        arr = load_image(image, label)
        patch = self.patch_size
        if arr.shape[0] < patch or arr.shape[1] < patch:
            raise ImageLoadError(label, f"image is {arr.shape[1]}x{arr.shape[0]} pixels, smaller than one {patch}x{patch} patch")
        return arr

    def read_images(self, images: Sequence[ImageInput] | ImageInput, names: Sequence[str] | None = None, *,
                    strict: bool = True) -> LoadedImages:
        return read_all(images, names, self.read_image, strict=strict)

    # -- predict --------------------------------------------------------------------------

    def run(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """The graph on ``(B, 3, S, S)`` float32 pixels: its outputs by name (a fixed-batch graph
        is fed padded batches; the padding's rows are dropped)."""
        fixed, b = self.meta["batch"], pixels.shape[0]
        outs = self.meta["outputs"]
        if fixed and b != fixed:
            chunks = []
            for s in range(0, b, fixed):
                part = pixels[s : s + fixed]
                pad = np.concatenate([part, np.repeat(part[-1:], fixed - part.shape[0], axis=0)]) if part.shape[0] < fixed else part
                chunks.append([o[: part.shape[0]] for o in self.engine({self.meta["input"]: pad}, outs)])
            return {n: np.concatenate([c[i] for c in chunks]) for i, n in enumerate(outs)}
        return dict(zip(outs, self.engine({self.meta["input"]: np.ascontiguousarray(pixels, dtype=np.float32)}, outs)))

    def predict(self, images: Sequence[ImageInput], *, names: Sequence[str] | None = None, threshold: float | None = None,
                false_alarm_rate: float | None = None, on_progress: Callable[[int], None] | None = None) -> Prediction:
        """Score images (paths, PIL images or arrays); raises on the first unreadable one."""
        loaded = self.read_images(images, names, strict=True)
        return self.predict_arrays(loaded.arrays, threshold=threshold, false_alarm_rate=false_alarm_rate, on_progress=on_progress)

    def predict_arrays(self, arrays: Sequence[np.ndarray], *, threshold: float | None = None,
                       false_alarm_rate: float | None = None, on_progress: Callable[[int], None] | None = None) -> Prediction:
        """:meth:`predict` for ``(H, W, 3)`` uint8 arrays: scores, maps at each image's size, decisions."""
        levels = self.thresholds(false_alarm_rate)
        thr = levels.image if threshold is None else float(threshold)
        p = self.meta["preprocessing"]
        size, sigma = int(p["image_size"]), float(self.meta["sigma"])
        parts: dict[str, list[np.ndarray]] = {n: [] for n in ("score", "visual", "semantic", "scope")}
        maps: list[np.ndarray] = []
        bs = self.runtime.batch_size
        for start in range(0, len(arrays), bs):
            batch = arrays[start : start + bs]
            out = self.run(preprocess(batch, size, p["mean"], p["std"], int(p["resample"]), float(p["rescale"])))
            for n in parts:
                parts[n].append(np.asarray(out[n], dtype=np.float32).reshape(-1))
            for grid, a in zip(out["token_scores"], batch):
                maps.append(_map(grid, a.shape[:2], sigma, size))
            if on_progress is not None:
                on_progress(len(batch))
        cat = {n: np.concatenate(v) if v else np.zeros(0, np.float32) for n, v in parts.items()}
        if not all(np.isfinite(cat[n]).all() for n in ("score", "visual", "semantic")) or not all(
                np.isfinite(m).all() for m in maps):  # never a NaN score called normal
            raise ModelFormatError(f"{self.path}: the graph gave scores or maps that are not finite numbers: "
                                   "the export is damaged; export the model again")
        out_of_scope = cat["scope"] > levels.scope if levels.scope is not None else np.zeros(len(maps), bool)
        return Prediction(scores=cat["score"], visual=cat["visual"], semantic=cat["semantic"],
                          anomalous=(cat["score"] > thr) | out_of_scope, maps=tuple(maps), threshold=thr,
                          out_of_scope=out_of_scope, scope=cat["scope"] if levels.scope is not None else None,
                          pixel_threshold=levels.pixel, seed_threshold=levels.seed)


def _map(grid: np.ndarray, hw: tuple[int, int], sigma: float, size: int) -> np.ndarray:
    """One image's map at its own ``(H, W)``, blurred as :func:`lakead.methods.lake.score.batch_maps` does."""
    out = upsample(grid, (int(hw[0]), int(hw[1])))
    if sigma > 0:
        from scipy.ndimage import gaussian_filter

        out = gaussian_filter(out, sigma=(sigma * hw[0] / size, sigma * hw[1] / size), mode="nearest")
    return np.ascontiguousarray(out, dtype=np.float32)
