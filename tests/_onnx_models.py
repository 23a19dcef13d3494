"""Tiny ONNX image models built with onnx.helper, for tests (no download, no exporter)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def save_tiny_onnx(path: Path, *, size: int | None = 32, batch: int | None = None, seed: int = 0) -> Path:
    """A small CNN: ``input (N, 3, S, S)`` -> Conv 3x3 (8 ch) -> Relu ``"feat1"`` (8 x S x S)
    -> Conv 3x3 stride 2 (12 ch) ``"conv2"`` -> QuantizeLinear ``"block2_quantized"``
    (uint8, with ``block2_scale`` / ``block2_zero_point``) -> DequantizeLinear ``"block2"``
    (12 x S/2 x S/2) -> GlobalAveragePool -> Flatten ``"output"`` (N, 12).

    ``size=None`` makes the height and width dynamic; ``batch=None`` a dynamic batch.
    Returns the weights' path. The weights are seeded, so the file is the same every time.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.5, (8, 3, 3, 3)).astype(np.float32)
    w2 = rng.normal(0, 0.3, (12, 8, 3, 3)).astype(np.float32)
    inits = [
        numpy_helper.from_array(w1, "w1"),
        numpy_helper.from_array(w2, "w2"),
        numpy_helper.from_array(np.array(0.05, np.float32), "block2_scale"),
        numpy_helper.from_array(np.array(128, np.uint8), "block2_zero_point"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "w1"], ["conv1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv1"], ["feat1"]),
        helper.make_node("Conv", ["feat1", "w2"], ["conv2"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("QuantizeLinear", ["conv2", "block2_scale", "block2_zero_point"], ["block2_quantized"]),
        helper.make_node("DequantizeLinear", ["block2_quantized", "block2_scale", "block2_zero_point"], ["block2"]),
        helper.make_node("GlobalAveragePool", ["block2"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["output"]),
    ]
    dims = [batch if batch else "N", 3, size if size else "H", size if size else "W"]
    graph = helper.make_graph(
        nodes, "tiny-cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [dims[0], 12])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path
