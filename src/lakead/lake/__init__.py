"""LAKE (latent anomaly knowledge excavation): the method, in four modules.

- :mod:`.config`: :class:`LakeConfig`, every saved option with its help text;
- :mod:`.state`: :class:`LakeState`, every learned tensor and fact, declared once;
- :mod:`.fit`: the steps of the fit as tensor functions (neurons, leave-one-out, threshold);
- :mod:`.score`: scoring a batch against the state (shared by predict and explain);
- :mod:`.detector`: :class:`LakeDetector`, which ties them to a backbone (fit, predict, save, load).
"""

from .config import LakeConfig

# The detector and its state pull in torch: imported on first use (PEP 562), so that the
# command line can build its options from LakeConfig without importing torch.
_LAZY = {"LakeDetector": ".detector", "LakeState": ".state"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["LakeConfig", "LakeDetector", "LakeState"]
