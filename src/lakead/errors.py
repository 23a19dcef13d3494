"""Exceptions raised by lakead.

Every error a user can cause (a bad file, a bad option, a model directory from another
version) is a :class:`LakeadError`, so the command line can print its message and exit
with a non-zero status without a traceback. Messages name the file or the option and the
problem.
"""

from __future__ import annotations

import re

#: Control characters (C0, DEL, C1): never printed raw, never in a class name.
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text: object, keep: str = "") -> str:
    """``text`` safe to print on a terminal (and in messages): control characters (ESC, BEL,
    ...) written as ``\\x1b``, so that a file or class name cannot drive it; those in ``keep``
    are left."""
    return CONTROL_CHARACTERS.sub(lambda m: m[0] if m[0] in keep else f"\\x{ord(m[0]):02x}", str(text))


class LakeadError(Exception):
    """Base class of every error a user of lakead can cause."""


class ImageLoadError(LakeadError):
    """An input could not be turned into an RGB image.

    ``source`` is the path (or a short description of an in-memory input) and ``problem``
    says what is wrong with it.
    """

    def __init__(self, source: str, problem: str) -> None:
        self.source = source
        self.problem = problem
        super().__init__(f"{source}: {problem}")


class ConfigError(LakeadError, ValueError):
    """An option has a value that cannot work (k larger than the width, a bad layer, ...)."""


class BackboneUnavailableError(LakeadError):
    """The backbone's weights could be loaded neither from a local directory nor the hub."""


class ModelFormatError(LakeadError):
    """A saved model directory is missing, corrupt, from another format version or backbone."""


class NotFittedError(LakeadError):
    """A method that needs a fitted detector was called before ``fit`` or ``load``."""
