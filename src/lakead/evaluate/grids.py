"""Grids: several variants (an ablation grid, or the baselines) over the same categories and
shots, one table. :func:`ablation_variants` and :func:`baseline_variants` build the variants;
:func:`run_grid` runs them and writes ``<title>.md``, ``.csv`` and ``.json``."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .._version import __version__
from ..api import Runtime
from ..backbones import Backbone, load_backbone
from ..backbones.cache import FeatureCache
from ..data import Category
from ..errors import ConfigError
from ..fileio import atomic_write_text
from ..methods.lake import LakeConfig
from ..methods import SCORE_FIELDS, get_method
from ..metrics import PRO_FPR_LIMIT
from ..outputs import check_output, grid_kind, output_directory
from .report import _csv, _device, metrics_table
from .results import DECISION_KEYS, METRIC_COLUMNS, GridReport, _clean, format_percent, mean_metrics
from .runner import ImageCache, _categories, evaluate_category, has_text_probe, images_to_process, runtime_settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Variant:
    """One row of a grid: a label, its method (any name of :data:`lakead.methods.METHODS`)
    and configuration, image score, shots and seeds. The detector of a row is
    ``get_method(method).build(config, backbone, runtime)``."""

    label: dict[str, Any]  # the settings that make this row, shown as table columns
    config: Any  # the method's configuration (a LakeConfig for the LAKE methods)
    score: str  # one of lakead.methods.SCORE_FIELDS
    shots: int | None
    seeds: tuple[int, ...] = (0,)  # selection="random": one run per seed, averaged
    method: str = "lake"


def parse_shots(value: str) -> int | None:
    """``"16"`` -> 16; ``"all"`` -> None (every training image)."""
    v = value.strip().lower()
    if v == "all":
        return None
    if not v.isdigit() or int(v) < 1:
        raise ConfigError(f"shots must be a positive integer or 'all', got {value!r}")
    return int(v)


def ablation_variants(
    base: LakeConfig,
    *,
    ks: Sequence[int],
    lams: Sequence[float],
    shots: Sequence[int | None],
    layers: Sequence[Any],
    selections: Sequence[str],
    seeds: Sequence[int] = (0, 1, 2),
    score_norms: Sequence[str] | None = None,
) -> list[Variant]:
    """Every combination of the lists (k is dropped for selection="all", which keeps every
    channel). Random selections run once per seed and are averaged."""
    norms = list(score_norms) if score_norms else [base.score_norm]
    out: list[Variant] = []
    seen = set()
    for layer, shot, sel, k, lam, norm in itertools.product(layers, shots, selections, ks, lams, norms):
        k_eff = "all" if sel == "all" else k  # None: the default k (lakead.fields.default_k)
        key = (str(layer), shot, sel, k_eff, lam, norm)  # a multi-block layer is a list
        if key in seen:
            continue
        seen.add(key)
        cfg = dataclasses.replace(base, layer=layer, selection=sel, k=base.k if sel == "all" else k, lam=lam,
                                  score_norm=norm).validate()
        shown_layer = "+".join(map(str, layer)) if isinstance(layer, (list, tuple)) else "default" if layer is None else layer
        label = {"layer": shown_layer, "shots": "all" if shot is None else shot, "selection": sel,
                 "k": "default" if k_eff is None else k_eff, "lam": lam, "score_norm": norm}
        out.append(Variant(label, cfg, "scores", shot, tuple(seeds) if sel == "random" else (cfg.seed,)))
    return out


def baseline_variants(
    base: LakeConfig,
    *,
    methods: Sequence[str],
    shots: int | None,
    seeds: Sequence[int] = (0, 1, 2),
    score_norms: Sequence[str] = ("loo", "none"),
    has_text: bool = True,
    options: dict[str, Any] | None = None,
) -> list[Variant]:
    """One row per method; LAKE once per ``score_norms`` entry (the normalisation changes
    only the fused score, so the other methods run once). Methods that need a text tower
    are left out, with a warning, when the backbone has none. ``options``: values of the
    other methods' own options (PatchCore's coreset...; see :meth:`lakead.methods.Method.configure`)."""
    out = []
    for name in methods:
        m = get_method(name)
        cfg = m.configure(base, options)
        if m.needs_text and not has_text:
            log.warning("method %r left out: the backbone has no text tower", name)
            continue
        fused = m.score == "scores" and has_text and getattr(cfg, "use_text", False)
        for norm in (score_norms if fused else [getattr(cfg, "score_norm", "-")]):
            c = dataclasses.replace(cfg, score_norm=norm).validate() if fused else cfg
            selection = getattr(c, "selection", None)
            k = "-" if m.score == "semantic" or not hasattr(c, "k") else "all" if selection == "all" else (
                "default" if c.k is None else c.k)  # the text probe and the memory-bank methods use no neurons
            label = {"method": name, "score_norm": norm if fused else "-", "k": k}
            out.append(Variant(label, c, m.score, shots, tuple(seeds) if selection == "random" else (getattr(c, "seed", 0),), method=name))
    return out


def grid_images(categories: Sequence[Category], variants: Sequence[Variant]) -> int:
    """Images read by :func:`run_grid`: the length of a progress bar."""
    return sum(images_to_process(categories, v.shots, len(v.seeds)) for v in variants)


def run_grid(
    data: str | Path | Sequence[Category],
    out_dir: str | Path,
    variants: Sequence[Variant],
    *,
    categories: Sequence[str] | None = None,
    shot_seed: int | None = 0,
    title: str = "ablation",
    command: str | None = None,
    backbone: Backbone | None = None,
    runtime: Runtime | None = None,
    cache_features: bool = True,
    on_progress: Callable[[int], None] | None = None,
) -> GridReport:
    """Run every variant on every category (the same shots for every variant with the same
    shot count) and write ``<title>.md``, ``<title>.csv`` and ``<title>.json``: one table,
    one row per variant, the mean over categories; then the same table per category.
    ``runtime`` says how every row runs (default :class:`Runtime`()).

    With ``cache_features`` the network runs once per image and block for all variants
    (:class:`FeatureCache`; memory: one category's features) and decoded images are kept
    (:class:`ImageCache`, up to 2 GiB)."""
    if not variants:
        raise ConfigError("nothing to run: the grid is empty")
    rt = (runtime or Runtime()).validate()
    methods = [get_method(v.method) for v in variants]  # an unknown method fails before any work
    for v in variants:
        if v.score not in SCORE_FIELDS:
            raise ConfigError(f"score must be one of {SCORE_FIELDS}, got {v.score!r}")
    cats, data_root = _categories(data, categories)
    check_output(out_dir, grid_kind(title), inputs=[data_root])  # before the work
    backbones = {v.config.backbone for v in variants}
    if len(backbones) != 1:
        raise ConfigError(f"a grid runs one backbone, got {sorted(backbones)}")
    wants_text = any(getattr(v.config, "use_text", False) or m.needs_text for v, m in zip(variants, methods))
    bb = backbone or load_backbone(variants[0].config.backbone, need_text=wants_text)
    for v, m in zip(variants, methods):
        if m.needs_text and not has_text_probe(v.config, bb):
            raise ConfigError(f"method {m.name!r} needs a text tower; backbone {bb.info.source} has none")
        if m.backbone_kinds and bb.info.kind not in m.backbone_kinds:
            raise ConfigError(f"method {m.name!r} runs on {', '.join(m.backbone_kinds)} backbones; {bb.info.source} is "
                              f"{bb.info.kind}: leave it out of --methods")
    if any(getattr(v.config, "use_text", False) and not has_text_probe(v.config, bb) for v in variants):
        log.warning("backbone %s has no text tower: the text probe is off (semantic scores are 0)", bb.info.source)
        variants = [dataclasses.replace(v, config=dataclasses.replace(v.config, use_text=False))
                    if getattr(v.config, "use_text", False) and not has_text_probe(v.config, bb) else v for v in variants]
    per_cat: list[dict[str, dict[str, float]]] = [{} for _ in variants]
    decisions: list[dict[str, dict[str, float]]] = [{} for _ in variants]  # per category: false alarms, recall, oracle
    spread: list[dict[str, dict[str, float]]] = [{} for _ in variants]
    bounds: list[dict[str, float]] = [{} for _ in variants]  # the largest binning-error bound per pixel metric
    reader = FeatureCache(bb) if cache_features else bb
    images = ImageCache() if cache_features else None
    for cat in cats:  # categories outside: the cache holds one category's features at a time
        for i, v in enumerate(variants):
            log.info("%s: row %d of %d (%s)", cat.name, i + 1, len(variants), ", ".join(f"{k}={x}" for k, x in v.label.items()))
            runs, decided = [], []
            for s in v.seeds:
                cfg = dataclasses.replace(v.config, seed=s) if hasattr(v.config, "seed") else v.config  # WinCLIP: no seed
                res = evaluate_category(cat, cfg, reader, runtime=rt, method=methods[i], shots=v.shots, seed=shot_seed,
                                        score=v.score, images=images, on_progress=on_progress)
                runs.append(res.metrics())
                decided.append({k: res.decision.get(k, float("nan")) for k in DECISION_KEYS})
                for key, b in res.pixel_bounds.items():
                    if math.isfinite(b):
                        bounds[i][key] = max(bounds[i].get(key, 0.0), b)
            per_cat[i][cat.name] = mean_metrics(runs) if len(runs) > 1 else runs[0]
            decisions[i][cat.name] = {k: float(np.nanmean([d[k] for d in decided])) for k in DECISION_KEYS}
            if len(runs) > 1:
                spread[i][cat.name] = {k: float(np.std([r[k] for r in runs])) for k in METRIC_COLUMNS}
        if isinstance(reader, FeatureCache):
            reader.clear()
        if images is not None:
            images.clear()
    rows = [
        {"label": v.label, "seeds": list(v.seeds), "mean": mean_metrics(list(per_cat[i].values())),
         "categories": per_cat[i], "seed_std": spread[i], "pixel_error_bounds": bounds[i], "config": v.config.to_dict(),
         "method": v.method, "score": v.score, "decision_categories": decisions[i],
         "decision": {k: _nanmean([d[k] for d in decisions[i].values()]) for k in DECISION_KEYS}}
        for i, v in enumerate(variants)
    ]
    label_keys = [k for k in variants[0].label if len({str(v.label[k]) for v in variants}) > 1] or list(variants[0].label)
    settings = {
        "lakead_version": __version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "data_root": data_root,
        "categories": [c.name for c in cats],
        "shot_seed": shot_seed,
        "backbone": bb.info.to_dict(),
        "base_config": variants[0].config.to_dict(),
        "runtime": runtime_settings(rt),
    }
    report = GridReport(rows, label_keys, Path(out_dir), settings)
    write_grid(report, title)
    return report


def write_grid(report: GridReport, title: str) -> None:
    """``<title>.json``, ``.csv`` and ``.md`` in a new ``report.out_dir`` (one holding only an
    earlier table of the same title is replaced when the new one is complete: :mod:`lakead.outputs`)."""
    with output_directory(report.out_dir, grid_kind(title)) as tmp:
        _write_grid_files(report, title, tmp)


def _write_grid_files(report: GridReport, title: str, out: Path) -> None:
    doc = {"settings": report.settings, "rows": [
        {**r, "mean": _clean(r["mean"]), "categories": {c: _clean(m) for c, m in r["categories"].items()},
         "decision": _clean(r.get("decision", {})),
         "decision_categories": {c: _clean(m) for c, m in r.get("decision_categories", {}).items()}} for r in report.rows]}
    atomic_write_text(out / f"{title}.json", json.dumps(doc, indent=2) + "\n")
    flat = []
    for r in report.rows:
        for cat, m in [("mean", r["mean"]), *r["categories"].items()]:
            flat.append({**r["label"], "seeds": " ".join(map(str, r["seeds"])), "category": cat, **m})
    all_keys = list(report.rows[0]["label"])
    atomic_write_text(out / f"{title}.csv", _csv(flat, [*all_keys, "seeds", "category", *METRIC_COLUMNS]))
    atomic_write_text(out / f"{title}.md", grid_markdown(report, title))


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _label(r: dict[str, Any], keys: Sequence[str]) -> list[str]:
    cells = [str(r["label"][k]) for k in keys]
    if len(r["seeds"]) > 1:
        cells[-1] += f" (mean of seeds {','.join(map(str, r['seeds']))})"
    return cells


def grid_markdown(report: GridReport, title: str) -> str:
    s = report.settings
    bb = s["backbone"]
    cfg = s["base_config"]
    rt = s.get("runtime") or {}
    keys = report.label_keys
    fixed = {k: v for k, v in report.rows[0]["label"].items() if k not in keys}
    lines = [f"# lakead {title}", "", f"{s['date']}, lakead {s['lakead_version']}. Data: `{s['data_root']}` "
             f"({', '.join(s['categories'])}). Backbone `{bb['source']}` (sha256 {bb['fingerprint'][:16]}...)."]
    if s.get("command"):
        lines += ["", "Command:", "", "```", s["command"], "```"]
    lines += [
        "",
        f"Mean over categories, in %. Fixed: {', '.join(f'{k}={v}' for k, v in fixed.items()) or 'nothing'}; "
        f"image size {cfg.get('image_size') or bb['image_size']}, shots drawn with seed {s['shot_seed']}. "
        f"PRO: FPR limit {PRO_FPR_LIMIT}." + (f" Run: device {_device(rt)}, batch size {rt.get('batch_size')}, "
                                              f"precision {rt.get('precision')}." if rt else ""),
        "",
        metrics_table([(_label(r, keys), r["mean"]) for r in report.rows], first=keys),
        "",
        "Pixel metrics are binned (lakead.metrics): the largest bound on the binning error of any pixel number "
        f"here is {max((b for r in report.rows for b in r.get('pixel_error_bounds', {}).values()), default=0.0):.1e} "
        "(per row in the .json).",
        "",
        "Decisions at each row's own fitted threshold (from the normal images alone; mean over categories, in %): "
        "false alarms on the good test images, recall on the defective ones, and the recall the best threshold "
        "would reach with no more false alarms (oracle).",
        "",
        "| " + " | ".join([*keys, "false alarms", "recall", "oracle recall"]) + " |",
        "|" + "---|" * len(keys) + "---:|" * 3,
        *("| " + " | ".join([*_label(r, keys), *(format_percent(r.get("decision", {}).get(k)) for k in DECISION_KEYS)]) + " |"
          for r in report.rows),
    ]
    for cat in s["categories"]:
        lines += ["", f"## {cat}", "", metrics_table([(_label(r, keys), r["categories"][cat]) for r in report.rows], first=keys)]
    return "\n".join(lines) + "\n"
