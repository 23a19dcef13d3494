"""Fixed inputs and configurations whose outputs were recorded from the code before the
architecture change (commit 412c465); ``tests/test_regression.py`` checks that the same
configuration still gives the same numbers.

Record again (only when a change of the numbers is intended and explained)::

    python tests/regression/cases.py record
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # conftest's image helpers

from conftest import texture, with_defect  # noqa: E402

RECORD = HERE / "v1.npz"
MODEL_V1 = HERE / "model_v1"  # a model directory written in format 1 by the old code

#: name -> (backbone: "clip" or "onnx", detector options). Options are the ones of 412c465, plus
#: the two that keep its decision: the threshold rule it had (median + 3 robust SDs) and no scope check.
OLD_DECISION = dict(threshold_rule="sigmas", scope_check=False)
CASES: dict[str, tuple[str, dict]] = {
    "lake": ("clip", dict(k=8, layer=2, image_size=64, batch_size=4)),
    "variants": ("clip", dict(k=6, layer=3, semantic_layer=3, semantic_agg="mean", selection="random", seed=3,
                              score_norm="none", sigma=2.0, image_size=32, lam=0.5, batch_size=3, threshold_sigmas=2.0)),
    "semantic_map": ("clip", dict(k=5, layer=1, map_source="semantic", image_size=48, batch_size=8)),
    "all_no_text": ("clip", dict(layer=4, selection="all", use_text=False, image_size=64, batch_size=2)),
    "auto_filter": ("clip", dict(k="auto", layer=2, filter_outliers=True, image_size=64, batch_size=4)),
    "onnx": ("onnx", dict(k=6, layer="block2_quantized", batch_size=4)),
}


def normals() -> list[np.ndarray]:
    rng = np.random.default_rng(10)
    return [texture(rng) for _ in range(8)]


def held_out_images() -> list[np.ndarray]:
    rng = np.random.default_rng(11)
    held = [texture(rng, (48, 80)) for _ in range(3)]
    return held + [with_defect(texture(rng), 24, 32, 16), with_defect(texture(rng, (80, 56)), 10, 5, 12)]


def run_case(det) -> dict[str, np.ndarray]:
    """Fit on :func:`normals`, predict :func:`test_images`: the numbers to compare."""
    det.fit(normals(), "tile")
    pred = det.predict(held_out_images())
    out = {
        "scores": pred.scores, "visual": pred.visual, "semantic": pred.semantic,
        "anomalous": pred.anomalous, "threshold": np.float64(pred.threshold),
        "neurons": det.neurons_.numpy(), "loo_scores": det.loo_scores_, "map_range": np.asarray(det.map_range_),
    }
    for i, m in enumerate(pred.maps):
        out[f"map{i}"] = m
    return out


def _record() -> None:  # pragma: no cover - run by hand
    import tempfile

    import torch

    from _onnx_models import save_tiny_onnx
    from lakead import LakeDetector
    from lakead.backbones import CLIPBackbone, load_backbone
    from lakead.testing import save_random_clip

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp())
    clip = CLIPBackbone.from_pretrained(str(save_random_clip(tmp / "clip", "tiny", seed=0)))
    onnx = load_backbone("onnx:" + str(save_tiny_onnx(tmp / "tiny.onnx")))
    record = {}
    for name, (kind, opts) in CASES.items():
        det = LakeDetector(clip if kind == "clip" else onnx, **opts)  # recorded with 412c465, before OLD_DECISION existed
        for key, value in run_case(det).items():
            record[f"{name}/{key}"] = np.asarray(value)
        if name == "lake":
            import shutil

            shutil.rmtree(MODEL_V1, ignore_errors=True)
            det.save(MODEL_V1)
    np.savez_compressed(RECORD, **record)
    print(f"recorded {len(record)} arrays of {len(CASES)} cases in {RECORD}")


if __name__ == "__main__" and sys.argv[1:] == ["record"]:
    _record()
