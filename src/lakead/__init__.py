"""lakead: training-free few-shot visual anomaly detection with LAKE.

Fit on a few normal images, then score new ones: a higher score means more anomalous.

>>> from lakead import LakeDetector                                     # doctest: +SKIP
>>> det = LakeDetector(backbone="openai/clip-vit-large-patch14-336")    # doctest: +SKIP
>>> det.fit(["good/000.png", "good/001.png"], class_name="screw")       # doctest: +SKIP
>>> pred = det.predict(["test/001.png"])                                # doctest: +SKIP
>>> pred.scores, pred.anomalous, pred.maps[0].shape                      # doctest: +SKIP
"""

from ._version import __version__
from .errors import (
    BackboneUnavailableError,
    ConfigError,
    ImageLoadError,
    LakeadError,
    ModelFormatError,
    NotFittedError,
)
from ._lazy import lazy_names

# The names below pull in torch; they are imported on first use (PEP 562), so that
# ``import lakead.runtime`` and ``lakead --help`` do not pay for torch and transformers.
_LAZY = {
    "Detector": ".api", "Prediction": ".api", "Runtime": ".api",
    "LakeConfig": ".methods.lake", "LakeDetector": ".methods.lake",
}


__getattr__, __dir__ = lazy_names(__name__, globals(), _LAZY)


__all__ = [
    "BackboneUnavailableError",
    "ConfigError",
    "Detector",
    "ImageLoadError",
    "LakeConfig",
    "LakeDetector",
    "LakeadError",
    "ModelFormatError",
    "NotFittedError",
    "Prediction",
    "Runtime",
    "__version__",
]
