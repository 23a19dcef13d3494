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


#: The two-search fit of ``distance="cosine"`` (Euclidean leave-one-out while streaming, then the
#: cosine one again) as it was before the leave-one-out ran once with the configured distance:
#: recorded from commit 50ecd52 by ``python tests/regression/cases.py record-cosine`` and checked
#: by ``tests/test_lake_distance.py``. name -> (backbone, detector options, fit memory: None = the
#: default, one pass; a small one forces the two-pass fit; 20_000 also gives the leave-one-out
#: images a pass of their own). The scope check is on (the default).
COSINE_RECORD = HERE / "cosine.npz"
COSINE_CASES: dict[str, tuple[str, dict, int | None]] = {
    "cosine": ("clip", dict(k=8, layer=2, image_size=64, batch_size=4, distance="cosine"), None),
    "cosine_two_pass": ("clip", dict(k=8, layer=2, image_size=64, batch_size=3, distance="cosine", scope_check=False),
                        100_000),
    "cosine_top_loo_pass": ("clip", dict(k=8, layer=2, image_size=64, batch_size=4, distance="cosine",
                                         visual_top_percent=10), 20_000),
    "cosine_auto_filter": ("clip", dict(k="auto", layer=[2, 3], filter_outliers=True, image_size=64, batch_size=4,
                                        distance="cosine", visual_top_percent=5), 100_000),
    "euclidean_top": ("clip", dict(k=8, layer=2, image_size=64, batch_size=4, visual_top_percent=10), 100_000),
    "cosine_onnx": ("onnx", dict(k=6, layer="block2_quantized", batch_size=4, distance="cosine"), None),
}


def run_cosine_case(det, memory: int | None) -> dict[str, np.ndarray]:
    """Fit on :func:`normals` (``memory``: the fit memory), predict :func:`held_out_images`: the
    leave-one-out arrays, the gallery, the decision levels (``None`` ones left out) and the
    predictions (the maps of the two defective images)."""
    det.fit(normals(), "tile", memory=memory)
    pred = det.predict(held_out_images())
    s = det.state_
    out = {
        "scores": pred.scores, "visual": pred.visual, "semantic": pred.semantic, "map3": pred.maps[3],
        "map4": pred.maps[4], "neurons": s.neurons.numpy(), "gallery": s.gallery.cpu().numpy(),
        "visual_scale": s.visual_scale, "loo_scores": s.loo_scores, "loo_visual": s.loo_visual,
        "loo_semantic": s.loo_semantic, "loo_tokens": s.loo_tokens, "loo_scope": s.loo_scope,
        "map_range": s.map_range, "threshold": s.threshold, "seed_threshold": s.seed_threshold,
        "pixel_threshold": s.pixel_threshold, "scope_threshold": s.scope_threshold, "passes": det.fit_passes,
    }
    return {k: np.asarray(v) for k, v in out.items() if v is not None}


def _record_cosine() -> None:  # pragma: no cover - run by hand
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
    for name, (kind, opts, memory) in COSINE_CASES.items():
        det = LakeDetector(clip if kind == "clip" else onnx, **opts)
        for key, value in run_cosine_case(det, memory).items():
            record[f"{name}/{key}"] = np.asarray(value)
    np.savez_compressed(COSINE_RECORD, **record)
    print(f"recorded {len(record)} arrays of {len(COSINE_CASES)} cases in {COSINE_RECORD}")


if __name__ == "__main__" and sys.argv[1:] == ["record"]:
    _record()
if __name__ == "__main__" and sys.argv[1:] == ["record-cosine"]:
    _record_cosine()
