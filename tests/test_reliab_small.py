"""Smaller items of issue 28: GIF files in folder listings (25), PatchCore's neighbourhood
bounded by the token grid (26), lakead-runtime reports an unwritable --out in one line (18)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import texture
from lakead.errors import ConfigError
from lakead.images import iter_images


def test_gif_files_are_listed(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(texture(rng)).save(tmp_path / "a.gif")
    Image.fromarray(texture(rng)).save(tmp_path / "b.png")
    assert sorted(p.rsplit("/", 1)[-1] for p in map(str, iter_images([tmp_path]))) == ["a.gif", "b.png"]


def test_a_neighbourhood_larger_than_the_grid_is_refused(tiny_backbone):
    """neighbourhood=999 was accepted and gave every score 0."""
    from lakead.methods import get_method
    from lakead.methods.lake import LakeConfig

    rng = np.random.default_rng(1)
    m = get_method("patchcore")
    cfg = m.configure(LakeConfig.from_options(backbone="x", layer=3, image_size=32), {"neighbourhood": 999})
    with pytest.raises(ConfigError, match="neighbourhood 999 is larger than the 4-patch side"):
        m.build(cfg, tiny_backbone).fit([texture(rng) for _ in range(3)], "tile")


def test_the_runtime_reports_an_unwritable_out_in_one_line(tiny_backbone, tmp_path, capsys):
    from lakead import LakeDetector
    from lakead.export import export_model
    from lakead.runtime_cli import main

    rng = np.random.default_rng(2)
    out = export_model(LakeDetector(tiny_backbone, device="cpu", layer=3).fit([texture(rng) for _ in range(4)], "w"),
                       tmp_path / "x")
    Image.fromarray(texture(rng)).save(tmp_path / "a.png")
    (tmp_path / "file").write_text("not a folder")
    assert main(["predict", str(out), str(tmp_path / "a.png"), "--out", str(tmp_path / "file" / "results")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "file" in err and "Traceback" not in err
