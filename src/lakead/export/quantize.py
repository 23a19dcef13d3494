"""Static int8 quantization of an exported graph, calibrated on the model's own normal images.

``--precision int8-static``: ONNX Runtime's ``quantize_static`` in QDQ format, weights uint8 per
output channel, activations uint8 per tensor, both asymmetric, the activations' ranges measured
(``MinMax``) on the preprocessed calibration images (normal images: by default those the model
was fitted on, what the graph will mostly see). Only the backbone blocks' linear layers are quantized, the products of a weight
matrix and the tokens (``MatMul``/``Gemm`` with an initializer, inside a numbered block); what
decides stays float32: the patch embedding, the attention products of two activations, the
layer norms, the neuron selection, the gallery distances and their minimum, the scope
distance, and the text head (final norm, projection, prompt similarity). See docs/DEPLOY.md
for how far its scores and decisions move, and its speed.

Why uint8 weights (U8U8) and not ONNX Runtime's usual int8 weights (U8S8): on a CPU with AVX2
but no VNNI, as the one this was measured on, ONNX Runtime's documentation warns that its
uint8 x int8 product (``vpmaddubsw``, 16-bit sums) can saturate; on the tiny CLIP and 40 real tire images
(benchmarks/export_agreement.py --static-variants) U8S8 moved scores by up to 393 % and changed
29 decisions, S8S8 470 % and 29, U8S8 with 7-bit weights (``reduce_range``) 36 % and 8, U8U8
18 % and 3 (those 3 from the scope check only; docs/DEPLOY.md).
"""

from __future__ import annotations

import logging
import re
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from ..errors import ConfigError

#: A node inside a numbered transformer block (HF CLIP/SigLIP ``layers.N``, DINOv2 ``layer.N``, timm ``blocks.N``).
BLOCK_NODE = re.compile(r"^/(?:[\w.]+/)*(?:layers|layer|blocks)\.\d+/")
#: Fewest calibration images accepted (the activation ranges of fewer say little).
MIN_CALIBRATION = 2


def quantizable_nodes(model, *, attention: bool = False) -> list[str]:
    """Names of the nodes of ``model`` (an ``onnx.ModelProto``) that int8-static quantizes:
    ``MatMul``/``Gemm`` inside a numbered block whose second input is a weight (an initializer);
    with ``attention``, also the blocks' products of two activations (the attention's)."""
    weights = {i.name for i in model.graph.initializer}
    names = []
    for n in model.graph.node:
        if n.op_type not in ("MatMul", "Gemm") or not BLOCK_NODE.match(n.name):
            continue
        if attention or (len(n.input) > 1 and n.input[1] in weights):
            names.append(n.name)
    return names


class _Reader:
    """``onnxruntime.quantization.CalibrationDataReader`` over preprocessed pixels, ``batch`` at a time."""

    def __init__(self, input_name: str, pixels: np.ndarray, batch: int) -> None:
        self.input_name, self.pixels, self.batch = input_name, pixels, batch
        self._it: Iterator[dict[str, np.ndarray]] | None = None

    def _batches(self) -> Iterator[dict[str, np.ndarray]]:
        for s in range(0, len(self.pixels), self.batch):
            part = self.pixels[s : s + self.batch]
            if part.shape[0] < self.batch:  # a fixed-batch graph: pad with the last image
                part = np.concatenate([part, np.repeat(part[-1:], self.batch - part.shape[0], axis=0)])
            yield {self.input_name: np.ascontiguousarray(part, dtype=np.float32)}

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._it is None:
            self._it = self._batches()
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = None


def quantize_int8_static(onnx_bytes: bytes, pixels: np.ndarray, *, input_name: str = "pixels", batch: int | None = None,
                         method: str = "minmax", attention: bool = False, reduce_range: bool = False,
                         weights: str = "uint8", activations: str = "uint8") -> bytes:
    """``onnx_bytes`` with the blocks' linear layers in int8 (QDQ; weights per channel, activations
    calibrated on ``pixels``, ``(n, 3, S, S)`` float32 as the graph takes them); the rest float32.

    ``method``: how activation ranges are read from the calibration (``minmax``, ``percentile``,
    ``entropy``); ``attention``: quantize the attention's activation products too;
    ``reduce_range``: 7-bit weights (avoids the saturation of AVX2's u8 x s8 products);
    ``weights``, ``activations``: ``uint8`` or ``int8`` (see the module docstring)."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    if pixels.ndim != 4 or len(pixels) < MIN_CALIBRATION:
        raise ConfigError(f"int8-static needs at least {MIN_CALIBRATION} calibration images (the model's normal images), "
                          f"got {len(pixels) if pixels.ndim == 4 else 0}")
    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile, "entropy": CalibrationMethod.Entropy}
    if method not in methods:
        raise ConfigError(f"calibration method must be one of {', '.join(methods)}, got {method!r}")
    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    if weights not in types or activations not in types:
        raise ConfigError(f"weights and activations must be uint8 or int8, got {weights!r} and {activations!r}")
    model = onnx.load_from_string(onnx_bytes)
    nodes = quantizable_nodes(model, attention=attention)
    if not nodes:
        raise ConfigError("int8-static found no linear layer inside a numbered backbone block to quantize in this graph")
    reader = type("Reader", (_Reader, CalibrationDataReader), {})(input_name, pixels, batch or 1)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_static's advice to pre-process, logged on the root logger
    try:
        with tempfile.TemporaryDirectory(prefix="lakead-int8-") as d:
            src, dst = Path(d) / "fp32.onnx", Path(d) / "int8.onnx"
            src.write_bytes(onnx_bytes)
            quantize_static(src, dst, reader, quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul", "Gemm"],
                            nodes_to_quantize=nodes, per_channel=True, reduce_range=reduce_range,
                            activation_type=types[activations], weight_type=types[weights],
                            calibrate_method=methods[method], extra_options={"CalibTensorRangeSymmetric": False})
            return dst.read_bytes()
    finally:
        root.setLevel(level)


def calibration_pixels(images: Sequence[np.ndarray], meta: dict) -> np.ndarray:
    """``(H, W, 3)`` uint8 images preprocessed as the runtime feeds the graph (``meta``: the export's JSON)."""
    from ..images import preprocess

    p = meta["preprocessing"]
    return preprocess(list(images), int(p["image_size"]), p["mean"], p["std"], int(p["resample"]), float(p["rescale"]))


#: Most calibration images used (evenly spaced over those given): the ranges settle well before.
MAX_CALIBRATION = 64


def calibration_images(det, given: Sequence[np.ndarray] | None, where: str) -> tuple[list[np.ndarray], str]:
    """The calibration images, ``(H, W, 3)`` uint8, and where they came from: ``given``, else the
    support images the model was fitted on, read again from the paths its ``lakead.json`` lists
    (as written at fit time, so relative to the directory ``fit`` ran in); a :class:`ConfigError`
    naming what is missing when neither is there."""
    from ..support import spread_subset

    if given is not None:
        images = list(given)
        source = "given (--calibrate)"
    else:
        support = list(det.state_.support)
        found = [s for s in support if Path(s).is_file()]
        if len(found) < MIN_CALIBRATION:
            missing = next((s for s in support if not Path(s).is_file()), None)
            raise ConfigError(
                f"{where}: int8-static calibrates on the model's normal images: give them with --calibrate (the "
                f"support images it was fitted on are not readable from here: {len(found)} of {len(support)} found"
                + (f", e.g. {missing!r} is missing" if missing else "") + ")")
        images = [det.read_image(s) for s in found]
        source = f"the model's support images ({len(found)} of {len(support)} readable)"
    if len(images) < MIN_CALIBRATION:
        raise ConfigError(f"{where}: int8-static needs at least {MIN_CALIBRATION} calibration images, got {len(images)}")
    picked = [images[i] for i in spread_subset(len(images), MAX_CALIBRATION)]
    return picked, source
