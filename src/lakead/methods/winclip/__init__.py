"""WinCLIP (Jeong et al., CVPR 2023), WinCLIP+ and WinCLIP+LAKE: see :mod:`.detector` and docs/METHODS.md."""

from .config import WinCLIPConfig
from ..._lazy import lazy_names

# The detector and its state pull in torch: imported on first use (PEP 562), so that the
# command line can build its options from WinCLIPConfig without importing torch.
_LAZY = {"WinCLIPDetector": ".detector", "WinCLIPState": ".state"}


__getattr__, __dir__ = lazy_names(__name__, globals(), _LAZY)


__all__ = ["WinCLIPConfig", "WinCLIPDetector", "WinCLIPState"]
