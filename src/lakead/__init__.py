"""lakead: training-free few-shot visual anomaly detection with LAKE.

Fit on a few normal images, then score new ones: a higher score means more anomalous.

>>> from lakead import LakeDetector                                     # doctest: +SKIP
>>> det = LakeDetector(backbone="openai/clip-vit-large-patch14-336")    # doctest: +SKIP
>>> det.fit(["good/000.png", "good/001.png"], class_name="screw")       # doctest: +SKIP
>>> pred = det.predict(["test/001.png"])                                # doctest: +SKIP
>>> pred.scores, pred.anomalous, pred.maps[0].shape                      # doctest: +SKIP
"""

__version__ = "0.1.0"

from .detector import LakeConfig, LakeDetector, Prediction  # noqa: E402
from .errors import (  # noqa: E402
    BackboneUnavailableError,
    ConfigError,
    ImageLoadError,
    LakeadError,
    ModelFormatError,
    NotFittedError,
)

__all__ = [
    "BackboneUnavailableError",
    "ConfigError",
    "ImageLoadError",
    "LakeConfig",
    "LakeDetector",
    "LakeadError",
    "ModelFormatError",
    "NotFittedError",
    "Prediction",
    "__version__",
]
