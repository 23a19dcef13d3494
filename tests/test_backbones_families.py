"""The transformers adapters beyond CLIP: DINOv2 (with and without registers), DINOv3, SigLIP,
SigLIP 2. Tiny random models of every family are built from a config once per session (no
download); each adapter must read the model's own hidden states exactly, run only the blocks
needed, leave the model as it was, map tokens into the joint space as the model pools, and
say how to get weights when they are missing."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from lakead.backbones import load_backbone
from lakead.backbones.dinov2 import DINOv2Backbone, DINOv3Backbone
from lakead.backbones.siglip import SigLIP2Backbone, SigLIPBackbone
from lakead.errors import BackboneUnavailableError, ConfigError
from lakead.ops import anomaly_probability
from lakead.testing import FAMILY_PRESETS, main, save_random_backbone

#: preset -> (adapter class, kind, class + register tokens dropped)
FAMILIES = {
    "tiny-dinov2": (DINOv2Backbone, "dinov2", 1),
    "tiny-dinov2-registers": (DINOv2Backbone, "dinov2", 5),
    "tiny-dinov3": (DINOv3Backbone, "dinov3", 5),
    "tiny-siglip": (SigLIPBackbone, "siglip", 0),
    "tiny-siglip2": (SigLIP2Backbone, "siglip2", 0),
}
TEXT = ("tiny-siglip", "tiny-siglip2")


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory):
    """Every tiny family in the save_pretrained layout (32 px, patch 8, width 32, 4 blocks)."""
    root = tmp_path_factory.mktemp("families")
    return {name: save_random_backbone(root / name, name, seed=0) for name in FAMILIES}


@pytest.fixture(scope="session")
def family_backbones(family_dirs):
    return {name: load_backbone(str(d)) for name, d in family_dirs.items()}


def _pixels(bb, n=3, size=None, seed=0):
    rng = np.random.default_rng(seed)
    imgs = [rng.integers(0, 256, (40, 50, 3), dtype=np.uint8) for _ in range(n)]
    return bb.preprocessing(imgs, size or bb.info.image_size)


def _own_hidden_states(bb, x):
    """The model's own ``output_hidden_states`` for pixels ``x`` (index l: output of block l)."""
    m, size = bb.model, x.shape[-1]
    with torch.inference_mode():
        if bb.kind in ("dinov2", "dinov3"):
            return m(pixel_values=x, output_hidden_states=True).hidden_states
        if bb.kind == "siglip":
            return m.vision_model(pixel_values=x, output_hidden_states=True,
                                  interpolate_pos_encoding=size != m.config.vision_config.image_size).hidden_states
        patches, g = bb.patchify(x), size // bb.info.patch_size
        return m.vision_model(pixel_values=patches, pixel_attention_mask=torch.ones(patches.shape[:2], dtype=torch.int32),
                              spatial_shapes=torch.tensor([[g, g]] * x.shape[0]), output_hidden_states=True).hidden_states


@pytest.mark.parametrize("name", FAMILIES)
def test_the_checkpoints_model_type_picks_the_adapter(family_backbones, name):
    cls, kind, prefix = FAMILIES[name]
    bb = family_backbones[name]
    assert type(bb) is cls and bb.info.kind == kind and bb.prefix_tokens == prefix
    assert bb.supports_autocast and bb.width == 32 and bb.info.num_layers == 4 and bb.info.patch_size == 8
    assert bb.info.image_size == 32 and bb.has_text == (name in TEXT)
    assert bb.info.joint_dim == (32 if name in TEXT else None)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("size", [32, 64])
def test_blocks_read_equal_the_models_own_hidden_states_exactly(family_backbones, name, size):
    """At the native size and at twice it (interpolated or rotary positions)."""
    bb = family_backbones[name]
    x = _pixels(bb, size=size)
    full = _own_hidden_states(bb, x)
    p, n = bb.prefix_tokens, (size // 8) ** 2
    assert len(full) == 5 and full[1].shape[1] == p + n
    for layer in (1, 2, 4):
        f = bb.extract(x, [layer])
        assert f.blocks[layer].shape == (3, n, 32) and f.grids[layer] == (size // 8, size // 8) and f.joint is None
        assert torch.equal(f.blocks[layer], full[layer][:, p:, :])
    f = bb.extract(x, [1, 3])
    assert torch.equal(f.blocks[1], full[1][:, p:, :]) and torch.equal(f.blocks[3], full[3][:, p:, :])
    if bb.has_text:
        f = bb.extract(x, [2], 4)
        assert torch.equal(f.blocks[2], full[2][:, p:, :]) and f.joint.shape == (3, n, 32) and f.joint_grid == f.grids[2]
        with torch.inference_mode():
            assert torch.equal(f.joint, bb.to_joint(full[4][:, p:, :]))


@pytest.mark.parametrize("name", FAMILIES)
def test_forward_runs_only_the_needed_blocks_and_leaves_the_model_as_it_was(family_backbones, name):
    bb = family_backbones[name]
    layers = bb._layers()
    before = list(layers)
    state = {k: v.clone() for k, v in bb.model.state_dict().items()}
    calls = []
    handles = [blk.register_forward_hook(lambda m, i, o, n=n: calls.append(n)) for n, blk in enumerate(layers)]
    try:
        bb.extract(_pixels(bb, 1), [2])
        bb.extract(_pixels(bb, 1, size=48), [1])
    finally:
        for h in handles:
            h.remove()
    assert calls == [0, 1, 0]
    assert bb._layers() is layers and list(layers) == before and not bb.model.training
    after = bb.model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)


@pytest.mark.parametrize("name", TEXT)
def test_siglip_joint_tokens_are_the_models_own_pooling_of_each_token(family_backbones, name):
    """A token's joint vector is ``head(post_layernorm(token))`` on that token alone; when every
    token of an image is the same, that is exactly the model's pooled image embedding."""
    bb = family_backbones[name]
    vision = bb.model.vision_model
    x = _pixels(bb, 2)
    hidden = _own_hidden_states(bb, x)[-1]  # (B, N, D)
    with torch.inference_mode():
        joint = bb.to_joint(hidden)
        alone = vision.head(vision.post_layernorm(hidden[:, 5:6, :]))  # (B, D): token 5 as a one-token image
        torch.testing.assert_close(joint[:, 5], alone, rtol=1e-5, atol=1e-6)
        same = hidden[:, :1, :].expand(-1, hidden.shape[1], -1)  # every token = token 0
        pooled = vision.head(vision.post_layernorm(same))  # what the model pools for that image
        torch.testing.assert_close(bb.to_joint(same)[:, 0], pooled, rtol=1e-5, atol=1e-5)
        # and the pooled embedding is what the model returns as its image features
        if name == "tiny-siglip":
            own = bb.model.get_image_features(pixel_values=x)
            own = own if isinstance(own, torch.Tensor) else own.pooler_output
            torch.testing.assert_close(own, vision.head(vision.post_layernorm(hidden)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", TEXT)
def test_siglip_probability_is_the_normalised_sigmoid_by_hand(family_backbones, name):
    bb = family_backbones[name]
    assert bb.logit_scale == pytest.approx(10.0) and bb.logit_bias == pytest.approx(-10.0)
    text = bb.text_embeddings(["a photo of a normal tile.", "a photo of an anomalous tile."])
    assert text.shape == (2, 32) and torch.isfinite(text).all() and not torch.allclose(text[0], text[1])
    joint = bb.extract(_pixels(bb, 2), [1], 4).joint  # (2, 16, 32)
    got = bb.text_probability(joint, text)
    assert got.shape == (2, 16) and ((got > 0) & (got < 1)).all()
    z, t = joint.double().numpy(), text.double().numpy()
    for b, i in [(0, 0), (1, 7), (1, 15)]:
        cos = [float(z[b, i] @ t[j] / np.linalg.norm(z[b, i]) / np.linalg.norm(t[j])) for j in (0, 1)]
        p = [1 / (1 + math.exp(-(10.0 * c - 10.0))) for c in cos]
        assert float(got[b, i]) == pytest.approx(p[1] / (p[0] + p[1]), rel=1e-5)
    # the bias counts (CLIP's softmax would give sigmoid(-10) here, the bias cancelling)
    extreme = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    probs = bb.text_probability(extreme, torch.eye(2))
    want = 1 / (1 + math.exp(10.0))  # p_n = sigmoid(0) = 0.5, p_a = sigmoid(-10)
    assert float(probs[0, 0]) == pytest.approx(want / (0.5 + want), rel=1e-5)


def test_the_default_text_probability_is_clips_softmax(tiny_backbone):
    joint, text = torch.randn(2, 5, 16), torch.randn(2, 16)
    assert torch.equal(tiny_backbone.text_probability(joint, text), anomaly_probability(joint, text, tiny_backbone.logit_scale))


@pytest.mark.parametrize("name", FAMILIES)
def test_defaults_layers_and_sizes(family_backbones, name):
    bb = family_backbones[name]
    assert bb.default_layer() == 3 and bb.resolve_layer(None) == 3 and bb.default_k() == 32
    assert bb.resolve_layer("2") == 2
    for bad in (0, 5, -1, "x"):
        with pytest.raises(ConfigError, match=r"1\.\.4"):
            bb.resolve_layer(bad)
    if bb.has_text:
        assert bb.resolve_layer(None, semantic=True) == 4
    else:
        with pytest.raises(ConfigError, match="no text tower"):
            bb.resolve_layer(None, semantic=True)
        with pytest.raises(ConfigError, match="no text tower"):
            bb.extract(_pixels(bb, 1), [2], 4)
    assert bb.check_image_size(64) == 64
    with pytest.raises(ConfigError, match="multiple of the patch size 8"):
        bb.check_image_size(60)


def test_default_block_and_k_scale_with_depth_and_width(tiny_backbone):
    """3/4 of the depth (18 of 24, 9 of 12); k = round(100 * width / 1024) (100 at 1024)."""
    from lakead.backbones.base import Backbone

    class Sized(Backbone):
        resolve_layer = extract = None

        def __init__(self, layers, width):
            self.info = tiny_backbone.info.__class__(**{**tiny_backbone.info.to_dict(), "num_layers": layers})
            self.width = width

    assert [Sized(n, 768).default_layer() for n in (24, 12, 40, 2)] == [18, 9, 30, 2]
    assert [Sized(12, w).default_k() for w in (1024, 768, 384, 1536, 64)] == [100, 100, 100, 150, 64]
    assert tiny_backbone.resolve_layer(None) == 3


@pytest.mark.parametrize("name", FAMILIES)
def test_preprocessing_comes_from_the_processor_config(family_dirs, family_backbones, name):
    cfg = json.loads((family_dirs[name] / "preprocessor_config.json").read_text())
    bb = family_backbones[name]
    assert bb.preprocessing.mean == tuple(cfg["image_mean"]) and bb.preprocessing.std == tuple(cfg["image_std"])
    assert bb.preprocessing.resample == cfg["resample"]


def test_siglip2_patches_are_the_image_processors(family_dirs, family_backbones):
    from transformers import AutoImageProcessor

    bb = family_backbones["tiny-siglip2"]
    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    theirs = AutoImageProcessor.from_pretrained(str(family_dirs["tiny-siglip2"]))(images=[img], return_tensors="pt")
    assert theirs["spatial_shapes"].tolist() == [[4, 4]]
    ours = bb.patchify(bb.preprocessing([img], 32))
    torch.testing.assert_close(ours, theirs["pixel_values"].float(), rtol=0, atol=1e-5)


def test_siglip_without_text_tower_is_the_same_model(family_dirs, family_backbones):
    full = family_backbones["tiny-siglip"]
    bb = SigLIPBackbone.from_pretrained(str(family_dirs["tiny-siglip"]), need_text=False)
    assert not bb.has_text and bb.model.text_model is None and bb.info.same_model(full.info)
    with pytest.raises(ConfigError, match="without its text tower"):
        bb.text_embeddings(["x"])


def test_different_weights_give_different_fingerprints(family_dirs, family_backbones, tmp_path):
    other = load_backbone(str(save_random_backbone(tmp_path / "d", "tiny-dinov2", seed=1)))
    assert not other.info.same_model(family_backbones["tiny-dinov2"].info)
    copy = tmp_path / "copy"
    shutil.copytree(family_dirs["tiny-dinov2"], copy)
    assert load_backbone(str(copy)).info.same_model(family_backbones["tiny-dinov2"].info)


@pytest.mark.parametrize("cls", [DINOv2Backbone, DINOv3Backbone, SigLIPBackbone, SigLIP2Backbone])
def test_missing_weights_name_both_ways(cls, tmp_path):
    for source in ("no-such-org/no-such-model", str(tmp_path / "missing-dir")):
        with pytest.raises(BackboneUnavailableError) as info:
            cls.from_pretrained(source)
        msg = str(info.value)
        assert cls.FAMILY in msg and source in msg and "Hub" in msg and "save_pretrained" in msg
        assert "--backbone" in msg and f"lakead download-backbone {cls.EXAMPLE}" in msg
    (tmp_path / "empty").mkdir()
    with pytest.raises(BackboneUnavailableError, match="no config.json"):
        cls.from_pretrained(str(tmp_path / "empty"))


def test_a_directory_without_its_processor_or_of_another_family_is_refused(family_dirs, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(family_dirs["tiny-dinov2"], bare)
    (bare / "preprocessor_config.json").unlink()
    with pytest.raises(BackboneUnavailableError, match="no preprocessor_config.json"):
        load_backbone(str(bare))
    with pytest.raises(ConfigError, match="'siglip' model; the DINOv2 adapter"):
        DINOv2Backbone.from_pretrained(str(family_dirs["tiny-siglip"]))
    no_tok = tmp_path / "no-tok"
    shutil.copytree(family_dirs["tiny-siglip"], no_tok)
    for f in no_tok.glob("tokenizer*"):
        f.unlink()
    with pytest.raises(BackboneUnavailableError, match="tokenizer"):
        load_backbone(str(no_tok))
    assert not load_backbone(str(no_tok), need_text=False).has_text


def test_an_unknown_family_lists_the_supported_ones(tmp_path):
    from transformers import ViTConfig, ViTModel

    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                       image_size=32, patch_size=8)).save_pretrained(tmp_path / "vit")
    with pytest.raises(ConfigError) as info:
        load_backbone(str(tmp_path / "vit"))
    msg = str(info.value)
    assert "'vit' model" in msg and all(t in msg for t in ("clip", "dinov2", "dinov3_vit", "siglip2", "onnx:PATH"))


def test_every_preset_is_written_by_the_command(tmp_path, capsys):
    assert set(FAMILIES) <= set(FAMILY_PRESETS)
    main(["tiny-siglip2", str(tmp_path / "s2")])
    assert str(tmp_path / "s2") in capsys.readouterr().out
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json"} <= {
        p.name for p in (tmp_path / "s2").iterdir()}
    assert type(load_backbone(str(tmp_path / "s2"))) is SigLIP2Backbone
