"""WinCLIP (Jeong et al., CVPR 2023), WinCLIP+ and WinCLIP+LAKE: see :mod:`.detector` and docs/METHODS.md."""

from .config import WinCLIPConfig
from .detector import WinCLIPDetector
from .state import WinCLIPState

__all__ = ["WinCLIPConfig", "WinCLIPDetector", "WinCLIPState"]
