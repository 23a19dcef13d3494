"""``lakead`` and ``python -m lakead``: the command line (:mod:`lakead.cli`).

On a runtime-only install (docs/DEPLOY.md: the package without its dependencies, to run exported
models with ``lakead-runtime``) the packages of the command line are missing; the ``lakead``
command then says so in one line, names what to install and what runs there instead, and exits
with status 1, instead of a traceback.
"""

from __future__ import annotations

import importlib.util
import sys

#: What the ``lakead`` command imports that a runtime-only install lacks (looked up, not imported).
NEEDED = ("typer", "rich", "torch", "transformers", "safetensors", "sklearn")


def missing_packages() -> list[str]:
    """The packages of :data:`NEEDED` that are not installed."""
    return [name for name in NEEDED if importlib.util.find_spec(name) is None]


def runtime_only_message(missing: list[str]) -> str:
    return (f"lakead: this is a runtime-only install ({', '.join(missing)} not installed): the lakead command needs "
            "the full package with its dependencies (in the repository: pip install -e . ; README, Quick start). "
            "Here, exported models run with: lakead-runtime predict EXPORTED_DIR IMAGES --out DIR (docs/DEPLOY.md)")


def main() -> None:
    missing = missing_packages()
    if missing:
        print(runtime_only_message(missing), file=sys.stderr)
        sys.exit(1)
    from .cli import app

    app()


if __name__ == "__main__":  # pragma: no cover
    main()
