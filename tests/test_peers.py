"""Methods are peers: what a saved model says of itself is its own method's description, and
no method is described with LAKE's keys (issue 26)."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import texture
from lakead.api import Runtime, describe_model, read_model_meta
from lakead.cli import app
from lakead.methods import get_method

#: What LAKE alone has: the sensitive neurons, the text probe, its gallery and leave-one-out rules.
LAKE_KEYS = {"k", "k_rule", "selection", "semantic_layer", "text_probe", "text_backbone", "gallery_rule", "loo_rule",
             "outliers_dropped", "score_norm", "visual_top_percent"}


@pytest.fixture(scope="module")
def normals():
    rng = np.random.default_rng(3)
    return [texture(rng, (64, 64)) for _ in range(4)]


def _fitted(method, options, tiny_backbone, normals, path):
    m = get_method(method)
    det = m.build(m.config_class(**options), tiny_backbone, Runtime(batch_size=4)).fit(normals, "tile")
    return det.save(path)


@pytest.mark.parametrize("method, options", [
    ("patchcore", {"layer": (1, 2), "image_size": 64}),
    ("anomalydino", {"layer": 2, "image_size": 64}),
    ("winclip", {"image_size": 64}),
    ("winclip+", {"image_size": 64}),
])
def test_info_shows_no_lake_key_for_other_methods(method, options, tiny_backbone, normals, tmp_path):
    path = _fitted(method, options, tiny_backbone, normals, tmp_path / "m")
    meta = read_model_meta(path)
    described = describe_model(meta)
    assert described["method"] == get_method(method).detector_class.method
    assert LAKE_KEYS.isdisjoint(described), sorted(LAKE_KEYS & set(described))
    r = CliRunner().invoke(app, ["info", str(path)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    shown = {line.strip().strip("│").split("│")[0].strip() for line in r.output.splitlines() if "│" in line}
    assert LAKE_KEYS.isdisjoint(shown), sorted(LAKE_KEYS & shown)
    assert {"threshold", "support_images"} <= shown


def test_lake_describes_its_own_facts(tiny_backbone, normals, tmp_path):
    path = _fitted("lake", {"layer": 2, "k": 8, "image_size": 64}, tiny_backbone, normals, tmp_path / "m")
    described = describe_model(read_model_meta(path))
    assert described["k"] == 8 and described["layer"] == 2 and described["text_probe"] is True
    assert described["support_images"] == 4


def test_service_lists_each_method_in_its_own_words(tiny_backbone, normals, tmp_path):
    from lakead.serve.store import model_info

    path = _fitted("anomalydino", {"layer": 2, "image_size": 64}, tiny_backbone, normals, tmp_path / "m")
    info = model_info("m", read_model_meta(path))
    assert LAKE_KEYS.isdisjoint(info) and LAKE_KEYS.isdisjoint(info["description"])
    assert info["description"]["bank_vectors"] > 0 and info["method"] == "anomalydino"


def _options_shown(*args: str) -> set[str]:
    r = CliRunner().invoke(app, list(args), catch_exceptions=False, env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    import re

    return {m.group(1) for line in r.output.splitlines() if (m := re.match(r"[│|]\s+(?:\*\s+)?(--[\w-]+)", line))}


def test_help_with_a_method_shows_that_methods_options_only():
    everything = _options_shown("fit", "--help")
    assert {"--k", "--lam", "--coreset", "--neighbourhood"} <= everything  # without --method: every method's
    patchcore = _options_shown("fit", "--method", "patchcore", "--help")
    assert {"--coreset", "--neighbourhood", "--layer", "--false-alarm-rate", "--out"} <= patchcore
    assert not {"--k", "--lam", "--selection", "--semantic-layer"} & patchcore  # LAKE's own
    lake = _options_shown("eval", "--method=lake", "--help")
    assert {"--k", "--lam"} <= lake and "--coreset" not in lake


def test_the_service_offers_each_method_its_own_options(tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from lakead.serve.app import create_app

    info = TestClient(create_app(tmp_path / "store", backbone="unused/backbone")).get("/info").json()
    by = info["options_by_method"]
    assert set(by) == set(info["methods"])
    assert {"coreset", "layer", "false_alarm_rate"} <= set(by["patchcore"]) and "k" not in by["patchcore"]
    assert {"k", "lam", "layer"} <= set(by["lake"]) and "coreset" not in by["lake"]
