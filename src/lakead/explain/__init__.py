"""The neuron-level report: which sensitive neurons carry an anomaly, in pictures.

``lakead explain MODEL_DIR [IMAGES...] --out DIR [--compare OTHER_MODEL_DIR ...]`` writes::

    DIR/index.html    a self-contained page (no script, no stylesheet or font from elsewhere)
    DIR/report.json   every number the page shows
    DIR/img/*.png     the figures, overlays and neuron activation maps the page shows

What the page holds:

1. **Channel variance.** The variance of every channel of the visual block over all support
   tokens (Eq. 3), sorted from largest to smallest, with the model's ``k`` and the elbow
   estimate of :func:`lakead.neurons.knee_k` marked.
2. **Per image.** The overlay of the anomaly map (:mod:`lakead.viz`, the model's fixed colour
   scale) with the most anomalous patch outlined. At that patch, the squared distance to
   the nearest gallery vector (Eq. 7) is a sum over the sensitive neurons,
   ``sum_k (q_k - g_k)^2``; each neuron's term, as a share of the sum, is its
   *contribution*. The top contributors are listed, each with its activation map: the
   channel's value at every token of the image, coloured from the 1st to the 99th
   percentile of that channel over the support tokens (so bright = beyond what normal
   images showed).
3. **Across models** (``--compare``; one model per category, same backbone and block): the
   Jaccard overlap of their sensitive-neuron sets as a heat map, and a 2-D embedding of
   *neuron fingerprints*. A neuron's fingerprint is the vector, over the compared models, of
   its standardised log-variance on each model's support set
   (:func:`lakead.neurons.neuron_fingerprints`): how strongly that channel varies on normal
   images of each category, compared with the other channels of the block. The embedding
   is the first two principal components of the fingerprints of every channel.

The package has three parts, each usable alone:

* :mod:`lakead.explain.compute`: the computations, which return plain dataclasses
  (:func:`variance_curve` -> :class:`VarianceCurve`, :func:`explain_images` ->
  :class:`ImageExplanation` with its :class:`NeuronContribution` list, :func:`compare_models`
  -> :class:`ModelComparison`, and :func:`comparison_labels`). No file, no picture.
* :mod:`lakead.explain.figures`: the pictures, as PNG bytes (:func:`variance_figure`,
  :func:`jaccard_figure`, :func:`fingerprint_figure`, :func:`image_png`, :func:`overlay_png`,
  :func:`activation_png`).
* :mod:`lakead.explain.render`: the files. :func:`report_data` (the JSON-ready dict of every
  number, ``report.json``), :func:`render_html` (``index.html``, from the jinja2 template
  ``templates/report.html.j2``, autoescaped) and :func:`write_report`, which writes them all.

Every public name is importable from :mod:`lakead.explain` itself.
"""

from .compute import (
    NORMAL_PERCENTILES,
    ImageExplanation,
    ModelComparison,
    NeuronContribution,
    VarianceCurve,
    compare_models,
    comparison_labels,
    explain_images,
    variance_curve,
)
from .figures import (
    ACTIVATION_CMAP,
    DISPLAY_SIZE,
    THUMB_SIZE,
    activation_png,
    fingerprint_figure,
    image_png,
    jaccard_figure,
    overlay_png,
    variance_figure,
)
from .render import FINGERPRINT_DEFINITION, render_html, report_data, write_report

__all__ = [
    "ACTIVATION_CMAP",
    "DISPLAY_SIZE",
    "FINGERPRINT_DEFINITION",
    "NORMAL_PERCENTILES",
    "THUMB_SIZE",
    "ImageExplanation",
    "ModelComparison",
    "NeuronContribution",
    "VarianceCurve",
    "activation_png",
    "compare_models",
    "comparison_labels",
    "explain_images",
    "fingerprint_figure",
    "image_png",
    "jaccard_figure",
    "overlay_png",
    "render_html",
    "report_data",
    "variance_curve",
    "variance_figure",
    "write_report",
]
