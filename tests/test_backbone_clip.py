"""The CLIP adapter: block outputs, the joint-space mapping, preprocessing, loading errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from lakead.backbones import CLIPBackbone, load_backbone
from lakead.errors import BackboneUnavailableError, ConfigError


def _pixels(backbone, n=3, size=None, seed=0):
    rng = np.random.default_rng(seed)
    imgs = [rng.integers(0, 256, (40, 50, 3), dtype=np.uint8) for _ in range(n)]
    return backbone.preprocessing(imgs, size or backbone.info.image_size)


def test_joint_mapping_of_class_token_equals_image_embedding(tiny_backbone):
    x = _pixels(tiny_backbone)
    model = tiny_backbone.model
    with torch.inference_mode():
        hidden = model.vision_model(pixel_values=x, output_hidden_states=True).hidden_states
        ours = tiny_backbone.to_joint(hidden[-1][:, 0, :])  # (B, E)
        theirs = model.get_image_features(pixel_values=x)
    theirs = theirs if isinstance(theirs, torch.Tensor) else theirs.pooler_output
    assert ours.shape == theirs.shape
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_blocks_read_equal_the_models_own_hidden_states_exactly(tiny_backbone):
    x = _pixels(tiny_backbone)
    with torch.inference_mode():
        full = tiny_backbone.model.vision_model(pixel_values=x, output_hidden_states=True).hidden_states
    for layer in (1, 2, 4):
        f = tiny_backbone.extract(x, [layer])
        assert f.blocks[layer].shape == (3, 16, 32) and f.grids[layer] == (4, 4) and f.joint is None
        assert torch.equal(f.blocks[layer], full[layer][:, 1:, :])
    f = tiny_backbone.extract(x, [1, 3], 4)  # several blocks and the joint one, in one pass
    assert torch.equal(f.blocks[1], full[1][:, 1:, :]) and torch.equal(f.blocks[3], full[3][:, 1:, :])
    assert f.joint.shape == (3, 16, 16) and f.joint_grid == (4, 4)
    with torch.inference_mode():
        want = tiny_backbone.to_joint(full[4][:, 1:, :])
    assert torch.equal(f.joint, want)


def test_forward_runs_only_the_needed_blocks_and_leaves_the_model_as_it_was(tiny_backbone):
    layers = tiny_backbone.model.vision_model.encoder.layers
    before = list(layers)
    calls = []
    handles = [blk.register_forward_hook(lambda m, i, o, n=n: calls.append(n)) for n, blk in enumerate(layers)]
    try:
        tiny_backbone.extract(_pixels(tiny_backbone, 1), [2])
    finally:
        for h in handles:
            h.remove()
    assert calls == [0, 1]
    assert tiny_backbone.model.vision_model.encoder.layers is layers and list(layers) == before


def test_blocks_of_any_depth_in_any_order_give_the_same_features(tiny_clip_dir):
    """A shallow read first, then a full one, on one backbone (as the service does with models of
    several blocks), and the model's own forward in between: each block is still its own."""
    reference = CLIPBackbone.from_pretrained(str(tiny_clip_dir))
    shared = CLIPBackbone.from_pretrained(str(tiny_clip_dir))
    x = _pixels(shared, 2, size=64)
    want = {depth: reference.extract(x, [depth], 4) for depth in (1, 2, 3)}
    for depth in (2, 1, 4, 3, 2):  # shallow first, then deeper, then shallow again
        f = shared.extract(x, [depth])
        assert torch.equal(f.blocks[depth], reference.extract(x, [depth]).blocks[depth])
    with torch.inference_mode():
        shared.model.vision_model(pixel_values=x, output_hidden_states=True, interpolate_pos_encoding=True)
    for depth in (1, 2, 3):
        f = shared.extract(x, [depth], 4)
        assert torch.equal(f.blocks[depth], want[depth].blocks[depth]) and torch.equal(f.joint, want[depth].joint)


def test_two_threads_run_forwards_at_once(tiny_clip_dir):
    """No lock: forwards of different depths overlap in time and each returns its own block."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    bb = CLIPBackbone.from_pretrained(str(tiny_clip_dir))
    x = _pixels(bb, 2)
    want = {depth: bb.extract(x, [depth]).blocks[depth] for depth in (1, 2, 3, 4)}
    inside, most = [0], [0]
    guard = threading.Lock()
    barrier = threading.Barrier(2, timeout=10)

    def enter(module, args):
        with guard:
            inside[0] += 1
            most[0] = max(most[0], inside[0])

    def leave(module, args, out):
        with guard:
            inside[0] -= 1

    first = bb.model.vision_model.encoder.layers[0]
    handles = [first.register_forward_pre_hook(enter), first.register_forward_hook(leave)]

    def run(depth):
        barrier.wait()
        return [bb.extract(x, [depth]).blocks[depth] for _ in range(20)]

    try:
        jobs = [1, 4, 2, 3] * 2
        with ThreadPoolExecutor(2) as pool:
            got = [pool.submit(run, d) for d in jobs[:2]]
            results = [g.result() for g in got]
    finally:
        for h in handles:
            h.remove()
    assert all(torch.equal(t, want[d]) for d, ts in zip(jobs[:2], results) for t in ts)
    assert most[0] == 2  # two forwards were inside the first block at the same time


def test_other_input_size_interpolates_position_embeddings(tiny_backbone):
    f = tiny_backbone.extract(_pixels(tiny_backbone, 2, size=64), [2], 4)
    assert f.blocks[2].shape == (2, 64, 32) and f.grids[2] == (8, 8) and f.joint.shape == (2, 64, 16)
    with pytest.raises(ConfigError, match="multiple of the patch size 8"):
        tiny_backbone.check_image_size(60)


def test_preprocessing_comes_from_the_processor_config(tiny_clip_dir, tmp_path):
    cfg = json.loads((tiny_clip_dir / "preprocessor_config.json").read_text())
    bb = CLIPBackbone.from_pretrained(str(tiny_clip_dir), need_text=False)
    assert bb.preprocessing.mean == tuple(cfg["image_mean"]) and bb.preprocessing.std == tuple(cfg["image_std"])
    assert bb.preprocessing.resample == cfg["resample"] and bb.info.image_size == cfg["crop_size"]["height"]
    # change the config: the adapter follows it
    other = tmp_path / "clip"
    shutil.copytree(tiny_clip_dir, other)
    cfg.update(image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.25, 0.25], resample=2)
    (other / "preprocessor_config.json").write_text(json.dumps(cfg))
    bb2 = CLIPBackbone.from_pretrained(str(other), need_text=False)
    white = np.full((32, 32, 3), 255, np.uint8)
    assert torch.allclose(bb2.preprocessing([white], 32), torch.full((1, 3, 32, 32), 2.0))
    assert bb2.info.fingerprint == bb.info.fingerprint  # same weights


def test_layers_are_validated(tiny_backbone):
    assert tiny_backbone.resolve_layer(None, semantic=True) == 4
    assert tiny_backbone.resolve_layer("3") == 3
    for bad in (0, 5, -1, "x"):
        with pytest.raises(ConfigError, match=r"1\.\.4"):
            tiny_backbone.resolve_layer(bad)


def test_text_embeddings_and_logit_scale(tiny_backbone):
    t = tiny_backbone.text_embeddings(["a photo of a normal tile.", "a photo of an anomalous tile."])
    assert t.shape == (2, 16) and torch.isfinite(t).all()
    assert not torch.allclose(t[0], t[1])
    assert tiny_backbone.logit_scale == pytest.approx(float(np.exp(2.6592)), rel=1e-4)


def test_unavailable_backbone_names_both_ways(tmp_path):
    for source in ("no-such-org/no-such-clip", str(tmp_path / "missing-dir")):
        with pytest.raises(BackboneUnavailableError) as info:
            load_backbone(source)
        msg = str(info.value)
        assert source in msg and "Hub" in msg and "save_pretrained" in msg and "--backbone" in msg
    (tmp_path / "empty").mkdir()
    with pytest.raises(BackboneUnavailableError, match="no config.json"):
        load_backbone(str(tmp_path / "empty"))


def test_not_a_clip_model_is_refused(tmp_path):
    from transformers import ViTConfig, ViTModel

    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                       image_size=32, patch_size=8)).save_pretrained(tmp_path / "vit")
    with pytest.raises(ConfigError, match="'vit' model"):
        load_backbone(str(tmp_path / "vit"))


def test_without_text_tower(tiny_clip_dir):
    bb = CLIPBackbone.from_pretrained(str(tiny_clip_dir), need_text=False)
    assert not bb.has_text and bb.model.text_model is None
    with pytest.raises(ConfigError, match="without its text tower"):
        bb.text_embeddings(["x"])
