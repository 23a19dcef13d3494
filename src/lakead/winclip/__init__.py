"""WinCLIP (Jeong et al., CVPR 2023), WinCLIP+ and WinCLIP+LAKE: see :mod:`.detector` and docs/METHODS.md."""

from .config import WinCLIPConfig

# The detector and its state pull in torch: imported on first use (PEP 562), so that the
# command line can build its options from WinCLIPConfig without importing torch.
_LAZY = {"WinCLIPDetector": ".detector", "WinCLIPState": ".state"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["WinCLIPConfig", "WinCLIPDetector", "WinCLIPState"]
