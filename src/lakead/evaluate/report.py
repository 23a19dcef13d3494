"""The files of one evaluation: ``metrics.json``, ``metrics.csv``, ``scores.csv``, ``report.md``
and the figures (:func:`write_report`); the markdown metrics table shared with the grids."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..fileio import atomic_write_bytes, atomic_write_text
from ..metrics import PRO_FPR_LIMIT
from ..outputs import EVALUATION, output_directory
from .figures import category_figure
from .results import HEADERS, METRIC_COLUMNS, EvalReport, _clean, format_percent


def _csv(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()})
    return buf.getvalue()


def write_report(report: EvalReport, *, figures: bool = True, into: Path | None = None) -> None:
    """``metrics.json``, ``metrics.csv``, ``scores.csv``, ``report.md`` and
    ``figures/<category>.png`` in ``into`` (a folder being built by :func:`lakead.outputs.output_directory`),
    or else in a new ``report.out_dir`` (one holding only an earlier evaluation is replaced when
    the new one is complete)."""
    if into is None:
        with output_directory(report.out_dir, EVALUATION) as tmp:
            write_report(report, figures=figures, into=tmp)
        return
    out = into
    doc = {
        "settings": report.settings,
        "categories": [r.to_json() for r in report.results],
        "mean": _clean(report.mean),
    }
    atomic_write_text(out / "metrics.json", json.dumps(doc, indent=2) + "\n")
    table = [{"category": r.name, "n_normal": r.counts["test_normal"], "n_defect": r.counts["test_defect"],
              "pixel_images": r.pixel_images, "shots": len(r.support), **r.metrics()} for r in report.results]
    table.append({"category": "mean", **report.mean})
    atomic_write_text(out / "metrics.csv", _csv(table, ["category", "n_normal", "n_defect", "pixel_images", "shots", *METRIC_COLUMNS]))
    rows = [row for r in report.results for row in r.rows]
    atomic_write_text(out / "scores.csv", _csv(rows, ["category", "path", "label", "defect", "score", "fused", "visual", "semantic", "anomalous"]))
    fig_files = {}
    if figures:
        for r in report.results:
            name = "figures/" + r.name.replace("/", "__") + ".png"
            atomic_write_bytes(out / name, category_figure(r))
            fig_files[r.name] = name
    atomic_write_text(out / "report.md", report_markdown(report, fig_files))


def metrics_table(rows: Sequence[tuple[Any, dict[str, float]]], first: str | Sequence[str] = "category") -> str:
    """A markdown table: label column(s) and the seven metrics in percent. A row's label is
    one value, or a sequence of values when ``first`` names several columns."""
    names = [first] if isinstance(first, str) else list(first)
    head = "| " + " | ".join([*names, *(HEADERS[c] for c in METRIC_COLUMNS)]) + " |"
    sep = "|" + "---|" * len(names) + "---:|" * len(METRIC_COLUMNS)
    body = []
    for label, m in rows:
        cells = [label] if isinstance(first, str) else list(label)
        body.append("| " + " | ".join([*map(str, cells), *(format_percent(m.get(c)) for c in METRIC_COLUMNS)]) + " |")
    return "\n".join([head, sep, *body])


def _device(rt: dict[str, Any]) -> str:
    """The device of a run as given, with what it resolved to when that differs ("auto (cpu)")."""
    given, used = rt.get("device", "?"), rt.get("device_used")
    return f"{given} ({used})" if used and used != given else str(given)


def report_markdown(report: EvalReport, figures: dict[str, str]) -> str:
    s = report.settings
    cfg = s["config"]
    bb = s["backbone"]
    lines = [
        "# lakead evaluation",
        "",
        f"{s['date']}, lakead {s['lakead_version']}. Data: `{s['data_root']}`.",
    ]
    if s.get("command"):
        lines += ["", "Command:", "", "```", s["command"], "```"]
    rows = [(f"{r.name} ({r.counts['test_normal']} / {r.counts['test_defect']})", r.metrics()) for r in report.results]
    rows.append(("**mean**", report.mean))
    lines += [
        "",
        "## Results (%)",
        "",
        "I- = image level, P- = pixel level; (normal / defect test images). PRO: area under the "
        f"per-region-overlap curve for FPR 0 to {PRO_FPR_LIMIT}, divided by {PRO_FPR_LIMIT}. "
        "The mean is over categories; n/a: undefined (one class only).",
        "",
        metrics_table(rows),
        "",
        "## Decisions at the threshold learned from normal images only",
        "",
        "The fitted detector's own yes/no (fused score above the threshold derived from the normal "
        "images' leave-one-out scores for its false-alarm budget, or out of scope; no defect image is "
        "used to set it): the share of normal test images it flags (false alarms) and of defective ones "
        "(recall); the recall the best threshold on the image score would reach with no more false alarms "
        "(oracle, chosen knowing the test labels); the share of test images out of scope; and the defect "
        "masks at the fitted pixel level against the ground truth (pixel F1, share of ground-truth regions "
        "touched). The oracle thresholds the score alone, while the detector also flags images its scope "
        "check finds out of scope: those flags add recall (and false alarms), so the detector's recall can "
        "exceed the oracle's.",
        "",
        "| category | threshold | false alarms | recall | oracle recall | out of scope | mask pixel F1 | region recall |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        *(f"| {r.name} | {r.decision.get('threshold', float('nan')):.4g} | "
          f"{format_percent(r.decision.get('false_alarm_rate'))} | {format_percent(r.decision.get('recall'))} | "
          f"{format_percent(r.decision.get('oracle_recall'))} | {format_percent(r.decision.get('out_of_scope_rate'))} | "
          f"{format_percent(r.decision.get('mask_pixel_f1'))} | {format_percent(r.decision.get('region_recall'))} |"
          for r in report.results),
        "",
        "## Settings",
        "",
        f"- method: `{s['method']}`: {s['method_description']}; image score: `{s['image_score']}`",
        f"- backbone: `{bb['source']}` ({bb['kind']}, weights sha256 {bb['fingerprint'][:16]}...)",
        *(_lake_settings(cfg, bb, report.results) if "use_text" in cfg and "k" in cfg else
          [f"- options: {', '.join(f'{k}={v}' for k, v in cfg.items() if k != 'backbone')}"]),
        f"- decision: false-alarm budget {cfg.get('false_alarm_rate', 'n/a')}, threshold rule `{cfg.get('threshold_rule', 'n/a')}`"
        f" (used: {', '.join(sorted({r.decision.get('rule', '?') for r in report.results}))}), "
        f"scope check: {'on' if cfg.get('scope_check') else 'off'} (docs/DECISIONS.md)",
        f"- image size: {cfg.get('image_size') or bb['image_size']}",
        f"- run: device {_device(s.get('runtime') or {})}, batch size {(s.get('runtime') or {}).get('batch_size', '?')}, "
        f"precision {(s.get('runtime') or {}).get('precision', '?')}",
        f"- shots: {s['shots']} per category, seed {s['shot_seed']}:",
    ]
    for r in report.results:
        lines.append(f"  - {r.name}: {r.support_rule} (listed in metrics.json)")
    spro = [(r.name, r.pixel["spro"]) for r in report.results if "spro" in r.pixel]
    if spro:
        lines += ["", "## MVTec LOCO: AUC-sPRO (%)", "",
                  "Saturated per-region overlap (lakead.spro): each mask file is one defect, found once its "
                  "saturation area (defects_config.json) is flagged; FPR over the defect-free test images, up to 0.05.", ""]
        lines += [f"- {name}: {format_percent(v)}" for name, v in spro]
    excluded = [(r.name, len(r.pixel_excluded)) for r in report.results if r.pixel_excluded]
    if excluded:
        lines += ["", "## Images left out of pixel metrics", ""]
        lines += [f"- {name}: {n} defect image(s) without a mask count for image metrics only (listed in metrics.json)"
                  for name, n in excluded]
    worst = max((v for r in report.results for v in r.pixel_bounds.values() if v is not None and math.isfinite(v)), default=0.0)
    lines += [
        "",
        "## Notes",
        "",
        f"- Pixel metrics use score bins (lakead.metrics); the largest bound on the binning error of any pixel "
        f"metric above is {worst:.1e} (per metric in metrics.json).",
        f"- Time: fit {sum(r.fit_seconds for r in report.results):.1f} s in all; scoring "
        + ", ".join(f"{r.name} {1000 * r.predict_seconds_per_image:.0f} ms" for r in report.results)
        + " per image (reading, model, maps and metrics; this machine, not a benchmark).",
    ]
    lines += [f"- {note}." for note in s.get("data_notes", [])]
    if s.get("saved_maps"):
        lines.append("- Maps of every test image kept in " + " and ".join(
            folder for k, folder in (("png", "overlays/"), ("npy", "maps/")) if k in s["saved_maps"]) + " (lakead eval --save-maps).")
    if figures:
        lines += ["", "## Figures", ""]
        for r in report.results:
            lines += [f"### {r.name}", "", f"![{r.name}]({figures[r.name]})", ""]
    return "\n".join(lines) + "\n"


def _k_text(k: Any, results: Sequence[Any]) -> str:
    """The neurons each category's model kept and the k given ("6 (default)", "5 to 9 (auto)")."""
    used = sorted({r.neurons for r in results if getattr(r, "neurons", None) is not None})
    if isinstance(k, int) and not isinstance(k, bool) and used in ([], [k]):
        return str(k)
    kept = "?" if not used else str(used[0]) if len(used) == 1 else f"{used[0]} to {used[-1]} (per category in metrics.json)"
    return f"{kept} ({'default' if k is None else k})"


def _lake_settings(cfg: dict, bb: dict, results: Sequence[Any] = ()) -> list[str]:
    """The settings lines of a LAKE configuration (other methods list their options)."""
    return [
        f"- layer: `{cfg['layer']}`, k: {_k_text(cfg['k'], results)}, selection: `{cfg['selection']}` (seed {cfg['seed']}), "
        f"text probe: {'on' if cfg['use_text'] and bb['joint_dim'] else 'off'}, lam: {cfg['lam']}, "
        f"semantic layer: {cfg['semantic_layer']}, semantic aggregation: {cfg['semantic_agg']}",
        f"- score_norm: `{cfg['score_norm']}`, maps: `{cfg['map_source']}`, sigma: {cfg['sigma']}",
    ]
