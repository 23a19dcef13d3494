"""LAKE (latent anomaly knowledge excavation): the method, in four modules.

- :mod:`.config`: :class:`LakeConfig`, every saved option with its help text;
- :mod:`.state`: :class:`LakeState`, every learned tensor and fact, declared once;
- :mod:`.fit`: the steps of the fit as tensor functions (neurons, leave-one-out, threshold);
- :mod:`.score`: scoring a batch against the state (shared by predict and explain);
- :mod:`.detector`: :class:`LakeDetector`, which ties them to a backbone (fit, predict, save, load).
"""

from .config import LakeConfig
from .detector import LakeDetector
from .state import LakeState

__all__ = ["LakeConfig", "LakeDetector", "LakeState"]
