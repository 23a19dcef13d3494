"""Damaged saved models (issue 28 item 7): one validation on load (lakead.validate), for every
method's state and every field. Each damage gives one ModelFormatError line naming the file and
the field, or a model that predicts finite scores; never a traceback, a hang, a huge allocation
or a silent NaN (NaN scores called normal, exit 0).

The named cases are the issue's; a hypothesis fuzz test damages lakead.json fields and state
tensors at random, for LAKE, PatchCore, AnomalyDINO and WinCLIP+."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from conftest import texture, with_defect
from lakead.errors import LakeadError, ModelFormatError
from lakead.methods import get_method, load_detector
from lakead.methods.lake import LakeConfig


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(7)
    return [texture(rng) for _ in range(5)], [texture(rng), with_defect(texture(rng), 20, 20, 14)]


@pytest.fixture(scope="module")
def saved(tiny_backbone, images, tmp_path_factory):
    """method -> a saved model directory (fitted once per module)."""
    normal, _ = images
    root = tmp_path_factory.mktemp("saved")
    out = {}
    for method, options in (("lake", dict(layer=3)), ("patchcore", dict(layer=3)), ("anomalydino", dict(layer=3)),
                            ("winclip+", {})):
        m = get_method(method)
        cfg = m.configure(LakeConfig.from_options(backbone=tiny_backbone.info.source, **options), {})
        det = m.build(cfg, tiny_backbone).fit(normal, "tile")
        out[method] = det.save(root / method.replace("+", "plus"))
    return out


def damaged_copy(src, dst, meta_change=None, tensor_change=None):
    shutil.copytree(src, dst)
    if meta_change is not None:
        meta = json.loads((dst / "lakead.json").read_text())
        text = meta_change(meta)
        (dst / "lakead.json").write_text(text if isinstance(text, str) else json.dumps(meta))
    if tensor_change is not None:
        tensors = load_file(str(dst / "tensors.safetensors"))
        tensor_change(tensors)
        save_file(tensors, str(dst / "tensors.safetensors"))
    return dst


def _set(key, value):
    def change(meta):
        target = meta
        *head, last = key.split(".")
        for k in head:
            target = target[k]
        target[last] = value
    return change


def _tensor(name, make):
    def change(tensors):
        tensors[name] = make(tensors[name])
    return change


def _nan_at_0(t):
    t = t.clone()
    t.view(-1)[0] = math.nan
    return t


def _inf_at_0(t):
    t = t.clone()
    t.view(-1)[0] = math.inf
    return t


def _duplicate(t):
    t = t.clone()
    t[1] = t[0]
    return t


CASES = [  # (id, method, meta change, tensor change, words of the refusal)
    ("layer 99", "lake", _set("layer", 99), None, "layer 99 does not fit the backbone"),
    ("layer 0", "lake", _set("layer", 0), None, "layer 0 does not fit the backbone"),
    ("layer abc", "lake", _set("layer", "abc"), None, "layer 'abc' does not fit the backbone"),
    ("semantic_layer 7", "lake", _set("semantic_layer", 7), None, "semantic_layer 7 does not fit"),
    ("bank layer 99", "patchcore", _set("layer", 99), None, "layer 99 does not fit the backbone"),
    ("image_size 0", "lake", _set("image_size", 0), None, "image_size must be in [1, 4096]"),
    ("image_size -8", "lake", _set("image_size", -8), None, "image_size must be in [1, 4096]"),
    ("image_size 1e5", "lake", _set("image_size", 100000), None, "image_size must be in [1, 4096]"),
    ("image_size 1e5 bank", "anomalydino", _set("image_size", 100000), None, "image_size must be in [1, 4096]"),
    ("image_size 30", "lake", _set("image_size", 30), None, "image_size does not fit the backbone"),
    ("config image_size 1e5", "lake", _set("config.image_size", 100000), None, "image_size 100000 is larger than lakead runs"),
    ("threshold inf", "lake", _set("threshold", math.inf), None, "threshold is Infinity"),
    ("threshold -inf", "patchcore", _set("threshold", -math.inf), None, "threshold is -Infinity"),
    ("threshold 1e999", "lake", lambda m: json.dumps(m).replace(f'"threshold": {json.dumps(m["threshold"])}', '"threshold": 1e999'),
     None, "threshold is 1e999"),
    ("deep json", "lake", lambda m: json.dumps(m)[:-1] + ', "x": ' + "[" * 200_000 + "]" * 200_000 + "}", None,
     "nested deeper than Python can read"),
    ("5000 digits", "lake", lambda m: json.dumps(m)[:-1] + ', "x": ' + "7" * 5000 + "}", None, "an integer of 5000 digits"),
    ("float neurons", "lake", None, _tensor("neurons", lambda t: t.float() + 0.5), "tensor neurons must hold whole numbers"),
    ("duplicate neurons", "lake", None, _tensor("neurons", _duplicate), "tensor neurons names a channel twice"),
    ("text embeddings shape", "lake", None, _tensor("text_embeddings", lambda t: t[:, :7].contiguous()),
     "tensor text_embeddings has shape (2, 7)"),
    ("text embeddings NaN", "lake", None, _tensor("text_embeddings", _nan_at_0), "tensor text_embeddings holds NaN"),
    ("gallery NaN", "lake", None, _tensor("gallery", _nan_at_0), "tensor gallery holds NaN"),
    ("gallery inf", "lake", None, _tensor("gallery", _inf_at_0), "tensor gallery holds infinite"),
    ("scope gallery NaN", "lake", None, _tensor("scope_gallery", _nan_at_0), "tensor scope_gallery holds NaN"),
    ("bank NaN", "patchcore", None, _tensor("bank", _nan_at_0), "tensor bank holds NaN"),
    ("loo inf", "anomalydino", None, _tensor("loo_scores", _inf_at_0), "tensor loo_scores holds infinite"),
    ("winclip text NaN", "winclip+", None, _tensor("text_embeddings", _nan_at_0), "tensor text_embeddings holds NaN"),
]


@pytest.mark.parametrize("case,method,meta_change,tensor_change,words", CASES, ids=[c[0] for c in CASES])
def test_a_damaged_model_is_refused_with_one_line(saved, tiny_backbone, tmp_path, case, method, meta_change, tensor_change, words):
    path = damaged_copy(saved[method], tmp_path / "m", meta_change, tensor_change)
    with pytest.raises(ModelFormatError) as err:
        load_detector(path, backbone=tiny_backbone)
    message = str(err.value)
    assert words in message and str(path) in message and "\n" not in message, message


# -- the fuzz test ------------------------------------------------------------------------------

def _leaves(value, path=()):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(value, list) and value:
        for i, v in enumerate(value):
            yield from _leaves(v, (*path, i))
    yield path


JSON_VALUES = st.one_of(
    st.none(), st.booleans(), st.sampled_from([math.nan, math.inf, -math.inf, 0, -1, 1e9, 10**40, 2.5, -0.5]),
    st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
    st.lists(st.integers(-3, 300), max_size=3), st.just({}), st.just([[[[[1]]]]]),
)

TENSOR_DAMAGE = st.sampled_from(["nan", "inf", "negative", "float", "int", "drop_row", "add_dim", "empty", "drop"])


def _damage_tensor(t: torch.Tensor, how: str) -> torch.Tensor | None:
    if how == "drop":
        return None
    if how == "empty":
        return t[:0].clone()
    if how == "drop_row":
        return t[1:].clone() if t.ndim and t.shape[0] > 1 else t[:0].clone()
    if how == "add_dim":
        return t.unsqueeze(0).clone()
    if how == "float":
        return t.float() + 0.5
    if how == "int":
        return t.to(torch.int64)
    t = t.clone()
    if t.numel():
        if how in ("nan", "inf") and t.is_floating_point():
            t.view(-1)[0] = math.nan if how == "nan" else math.inf
        elif how == "negative":
            t.view(-1)[0] = -7
    return t


def _expect_line_or_finite(path, tiny_backbone, test):
    try:
        det = load_detector(path, backbone=tiny_backbone)
    except ModelFormatError as exc:
        assert "\n" not in str(exc) and str(path) in str(exc), str(exc)
        return
    try:
        pred = det.predict(test)
    except LakeadError:
        return  # a clear error naming the problem (a ConfigError on a changed option...)
    assert np.isfinite(pred.scores).all() and np.isfinite(pred.visual).all() and np.isfinite(pred.semantic).all(), \
        f"silent non-finite scores from a damaged model: {pred.scores}"
    assert all(np.isfinite(m).all() for m in pred.maps)


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(method=st.sampled_from(["lake", "patchcore", "anomalydino", "winclip+"]), data=st.data())
def test_fuzz_damaged_lakead_json(saved, tiny_backbone, images, tmp_path_factory, method, data):
    meta = json.loads((saved[method] / "lakead.json").read_text())
    paths = [p for p in _leaves(meta) if p and p[0] not in ("format", "format_version", "lakead_version", "fitted_at",
                                                            "support", "skipped", "support_rule")]
    where = data.draw(st.sampled_from(paths))
    value = data.draw(JSON_VALUES)

    def change(m):
        target = m
        for k in where[:-1]:
            target = target[k]
        target[where[-1]] = value

    path = damaged_copy(saved[method], tmp_path_factory.mktemp("fuzz") / "m", change)
    _expect_line_or_finite(path, tiny_backbone, images[1])


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(method=st.sampled_from(["lake", "patchcore", "anomalydino", "winclip+"]), data=st.data())
def test_fuzz_damaged_state_tensors(saved, tiny_backbone, images, tmp_path_factory, method, data):
    names = sorted(load_file(str(saved[method] / "tensors.safetensors")))
    name = data.draw(st.sampled_from(names))
    how = data.draw(TENSOR_DAMAGE)

    def change(tensors):
        new = _damage_tensor(tensors[name], how)
        if new is None:
            del tensors[name]
        else:
            tensors[name] = new.contiguous()

    path = damaged_copy(saved[method], tmp_path_factory.mktemp("fuzz") / "m", tensor_change=change)
    _expect_line_or_finite(path, tiny_backbone, images[1])


@pytest.fixture(scope="module")
def exported(saved, tiny_backbone, tmp_path_factory):
    from lakead.export import export_model

    return export_model(load_detector(saved["lake"], backbone=tiny_backbone), tmp_path_factory.mktemp("x") / "exported")


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(data=st.data())
def test_fuzz_damaged_export_json(exported, images, tmp_path_factory, data):
    from lakead.runtime import EXPORT_FILE, ExportedDetector

    meta = json.loads((exported / EXPORT_FILE).read_text())
    paths = [p for p in _leaves(meta) if p and p[0] not in ("format", "format_version", "lakead_version", "fitted_at",
                                                            "exported_at", "source", "check")]
    where = data.draw(st.sampled_from(paths))
    value = data.draw(JSON_VALUES)
    target = meta
    for k in where[:-1]:
        target = target[k]
    target[where[-1]] = value
    path = tmp_path_factory.mktemp("fuzz") / "x"
    shutil.copytree(exported, path)
    (path / EXPORT_FILE).write_text(json.dumps(meta))
    try:
        det = ExportedDetector.load(path)
    except ModelFormatError as exc:
        assert "\n" not in str(exc) and str(path) in str(exc), str(exc)
        return
    try:
        pred = det.predict_arrays(images[1])
    except LakeadError:
        return
    assert np.isfinite(pred.scores).all() and all(np.isfinite(m).all() for m in pred.maps)
