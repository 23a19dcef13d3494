#!/usr/bin/env python
"""Does OpenVINO's CPU plugin keep a node in float32 at the bf16 inference hint when the node is
marked? (Why ``--precision bf16`` writes the head as a second graph: docs/DEPLOY.md, "Mixed precision".)

A LAKE model on the tiny random CLIP (``--clip`` for another saved CLIP directory) is exported to
OpenVINO IR at float32; a copy of the IR gets ``<attribute name="precise" version="0"/>`` (the
IR form of ``ov::disable_fp16_compression``) in the ``rt_info`` of every ``/head/`` layer. Both
are compiled at ``INFERENCE_PRECISION_HINT=bf16`` and at ``f32`` and run on the same pixels.
Printed: how many layers carry the mark once read back, the largest difference of each output
from float32's, whether the marked and unmarked bf16 outputs are identical, and the runtime
precision of the compiled head's matrix-product nodes (FullyConnected / MatMul whose original
layers are ``/head/`` ones). Meaningful only on a CPU with bfloat16 arithmetic (printed).

    python benchmarks/ov_precise_mark.py
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np


def mark_head(xml: str) -> str:
    """The IR text with the precise mark on every layer named ``/head/...``."""
    def one(m: re.Match) -> str:
        layer = m.group(0)
        if 'name="/head/' not in layer.split(">", 1)[0]:
            return layer
        attr = '<attribute name="precise" version="0" />'
        if "<rt_info>" in layer:
            return layer.replace("<rt_info>", f"<rt_info>\n\t\t\t\t{attr}", 1)
        return layer.replace("</layer>", f"\t<rt_info>\n\t\t\t\t{attr}\n\t\t\t</rt_info>\n\t\t</layer>", 1)

    return re.sub(r"<layer .*?</layer>", one, xml, flags=re.S)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clip", default=None, help="a saved CLIP directory (default: the tiny random one)")
    args = ap.parse_args(argv)
    import openvino as ov

    from lakead.export import export_model
    from lakead.methods.lake import LakeDetector
    from lakead.runtime import cpu_description
    from lakead.testing import save_random_clip

    core = ov.Core()
    print("CPU:", cpu_description(), "| OpenVINO", ov.__version__, core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    with tempfile.TemporaryDirectory(prefix="lakead-precise-") as tmp:
        clip = args.clip or str(save_random_clip(Path(tmp) / "clip", "tiny", seed=0))
        rng = np.random.default_rng(0)
        normal = [(rng.random((64, 64, 3)) * 255).astype(np.uint8) for _ in range(5)]
        det = LakeDetector(clip, device="cpu", layer=3).fit(normal, "object")
        out = export_model(det, Path(tmp) / "ov", format="openvino")
        (out / "marked.xml").write_text(mark_head((out / "model.xml").read_text()))
        shutil.copy(out / "model.bin", out / "marked.bin")
        s = det.image_size_
        x = np.random.default_rng(1).normal(size=(2, 3, s, s)).astype(np.float32)
        results = {}
        for name, file, hint in (("f32", "model.xml", "f32"), ("bf16", "model.xml", "bf16"), ("bf16 marked", "marked.xml", "bf16")):
            model = core.read_model(str(out / file))
            marked = sum(1 for op in model.get_ops() if any("DisablePrecisionConversion" in k or k.startswith("precise")
                                                           for k in op.get_rt_info().keys()))
            compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint})
            r = compiled.create_infer_request().infer({0: x})
            results[name] = [np.asarray(r[o]) for o in compiled.outputs]
            head = []
            for op in compiled.get_runtime_model().get_ops():
                info = op.get_rt_info()
                if str(info["layerType"].astype(str)) in ("FullyConnected", "MatMul") and "/head/" in str(info["originalLayersNames"].astype(str)):
                    head.append(f"{op.get_friendly_name()}: {info['runtimePrecision'].astype(str)}")
            diff = [float(np.abs(a - b).max()) for a, b in zip(results[name], results["f32"])]
            print(f"{name:12s} layers marked {marked:3d}; largest difference from f32 per output {['%.3g' % d for d in diff]}; "
                  f"head products: {', '.join(head) or 'none found'}")
        same = all(np.array_equal(a, b) for a, b in zip(results["bf16"], results["bf16 marked"]))
        print("marked and unmarked bf16 outputs identical:", same)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
