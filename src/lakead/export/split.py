"""An exported graph cut in two at its head: the backbone graph (pixels -> features) and the head
graph (features -> outputs), so that a runtime can run the backbone at a lower precision and the
head, which decides, in float32.

Why two graphs and not one with the head's nodes marked: OpenVINO's CPU plugin (2026.4) runs
every matrix product at the inference precision hint, the head's gallery products included;
its per-node mark (``<attribute name="precise" version="0"/>`` in the IR, read as
``DisablePrecisionConversion``) gave bit-identical outputs to the unmarked graph in bf16 here
(``benchmarks/ov_precise_mark.py``). The head nodes are those the exporter named ``/head/...``
(``head/...`` in a graph merged with an ONNX backbone's): :class:`lakead.export.graph.TorchGraph`
registers the method's head as ``head``; the tensors the head reads from the rest are the cut.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import ConfigError


def is_head(name: str) -> bool:
    """A node of the head: named by the exporter inside ``TorchGraph.head`` (or merged as ``head/``)."""
    return name.startswith("/head/") or name.startswith("head/")


def split_head(onnx_bytes: bytes, input_name: str, outputs: Sequence[str]) -> tuple[bytes, bytes, list[str]]:
    """``onnx_bytes`` cut at its head: the backbone graph (``input_name`` -> the cut tensors), the
    head graph (the cut tensors -> ``outputs``) and the cut tensors' names, in the order the
    backbone graph returns them."""
    import onnx
    from onnx.utils import Extractor

    model = onnx.shape_inference.infer_shapes(onnx.load_from_string(onnx_bytes))
    body_out = {o for n in model.graph.node if not is_head(n.name) and n.op_type != "Constant" for o in n.output}  # constants: copied
    cut: list[str] = []
    for n in model.graph.node:
        if is_head(n.name):
            cut += [i for i in n.input if (i in body_out or i == input_name) and i not in cut]
    head_out = {o for n in model.graph.node if is_head(n.name) for o in n.output}
    if not cut or any(o not in head_out for o in outputs):
        raise ConfigError("this graph has no head to cut (its nodes are not named /head/...): it cannot run in two precisions")
    typed = {v.name for v in (*model.graph.value_info, *model.graph.input)}
    missing = [c for c in cut if c not in typed]
    if missing:
        raise ConfigError(f"the head's inputs {missing[:3]} have no known type: the graph cannot be cut")
    ex = Extractor(model)
    backbone = ex.extract_model([input_name], cut)
    head = Extractor(model).extract_model(cut, list(outputs))
    for m in (backbone, head):
        m.ir_version = model.ir_version
        del m.opset_import[:]
        m.opset_import.extend(model.opset_import)
        onnx.checker.check_model(m)
    return backbone.SerializeToString(), head.SerializeToString(), cut
