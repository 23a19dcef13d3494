"""The evaluation harness: fit on the shots, score the test split, compute the metrics, write
the report; ablation grids and baselines on the same data with the same metrics.

One function does one thing:

- :func:`evaluate_category` fits a detector of any method of :mod:`lakead.methods` (built by
  ``Method.build(config, backbone, runtime)``) on one category's shots and scores its test
  images, returning a :class:`CategoryResult` (metrics, error bounds, a few examples);
- :func:`evaluate` runs it over a dataset and writes ``metrics.json``, ``metrics.csv``,
  ``scores.csv``, ``report.md`` and one figure per category;
- :func:`run_grid` runs several variants (an ablation grid, the baselines, or rows of any
  methods) over the same categories and shots and writes one table: :func:`ablation_variants`
  and :func:`baseline_variants` build the variants.

How a run is carried out (device, batch size, precision) is a :class:`lakead.api.Runtime`
argument of each of them, recorded in the reports beside the configuration, never in it.

Metrics come from :mod:`lakead.metrics` (pixel metrics binned with computed error bounds,
recorded next to them). Images are read and scored one batch at a time and pixel metrics
are accumulated in fixed memory, so a category of thousands of full-size images fits.

Which module owns what (each imports only those before it):

- :mod:`.results`: the result dataclasses (:class:`Example`, :class:`CategoryResult`,
  :class:`EvalReport`, :class:`GridReport`) and pure helpers about them (table columns and
  headers, :func:`mean_metrics`, :func:`decision_rates`, :func:`format_percent`,
  :func:`choose_examples`);
- :mod:`.figures`: :func:`category_figure`, one PNG per category (matplotlib);
- :mod:`.report`: the files of one evaluation (:func:`write_report`, :func:`report_markdown`,
  :func:`metrics_table`);
- :mod:`.runner`: :func:`evaluate_category`, :func:`evaluate`, :class:`ImageCache` and
  the bookkeeping around them;
- :mod:`.grids`: :class:`Variant`, the variant builders, :func:`run_grid` and its table.

The scoring methods (``lake``, ``visual``, ``text``, ...) live in :mod:`lakead.methods` and
the feature cache of the grids in :mod:`lakead.backbones.cache`; both are re-exported here,
like every public name of the former single module.
"""

from __future__ import annotations

from ..backbones.cache import FeatureCache
from ..methods import METHODS, SCORE_FIELDS, Method, method_config
from .figures import category_figure
from .grids import (
    Variant,
    ablation_variants,
    baseline_variants,
    grid_images,
    grid_markdown,
    parse_shots,
    run_grid,
    write_grid,
)
from .report import metrics_table, report_markdown, write_report
from .results import (
    HEADERS,
    IMAGE_KEYS,
    METRIC_COLUMNS,
    PIXEL_KEYS,
    CategoryResult,
    EvalReport,
    Example,
    GridReport,
    choose_examples,
    DECISION_KEYS,
    decision_rates,
    format_percent,
    mean_metrics,
)
from .runner import EXAMPLE_SIDE, ImageCache, evaluate, evaluate_category, images_to_process, runtime_settings

__all__ = [
    "EXAMPLE_SIDE",
    "HEADERS",
    "IMAGE_KEYS",
    "METHODS",
    "METRIC_COLUMNS",
    "PIXEL_KEYS",
    "SCORE_FIELDS",
    "CategoryResult",
    "EvalReport",
    "Example",
    "FeatureCache",
    "GridReport",
    "ImageCache",
    "Method",
    "Variant",
    "ablation_variants",
    "baseline_variants",
    "category_figure",
    "choose_examples",
    "DECISION_KEYS",
    "decision_rates",
    "evaluate",
    "evaluate_category",
    "format_percent",
    "grid_images",
    "grid_markdown",
    "images_to_process",
    "mean_metrics",
    "method_config",
    "metrics_table",
    "parse_shots",
    "report_markdown",
    "run_grid",
    "runtime_settings",
    "write_grid",
    "write_report",
]
