"""LAKE (latent anomaly knowledge excavation): the method, in its modules.

- :mod:`.config`: :class:`LakeConfig`, every saved option with its help text;
- :mod:`.state`: :class:`LakeState`, every learned tensor and fact, declared once;
- :mod:`.fit`: the steps of the fit as tensor functions (neurons, leave-one-out, threshold);
- :mod:`.score`: scoring a batch against the state (shared by predict and explain);
- :mod:`.head`: the same scoring as one traceable module (what export traces);
- :mod:`.detector`: :class:`LakeDetector`, which ties them to a backbone (fit, predict, save, load).
"""

from .config import LakeConfig
from ..._lazy import lazy_names

# The detector and its state pull in torch: imported on first use (PEP 562), so that the
# command line can build its options from LakeConfig without importing torch.
_LAZY = {"LakeDetector": ".detector", "LakeState": ".state"}


__getattr__, __dir__ = lazy_names(__name__, globals(), _LAZY)


__all__ = ["LakeConfig", "LakeDetector", "LakeState"]
