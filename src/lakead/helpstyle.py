"""How ``--help`` shows types, and the program-wide flags that also work after the command.

typer would show ``<int>`` or ``<list[Path]>``; these command classes show INTEGER, PATH,
TEXT (nothing for flags), and the group moves ``-q``/``-v`` written after the command word in
front of it.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import typer.core

# -- how --help shows types ----------------------------------------------------------------

#: Plain names of value types in ``--help`` (typer would show ``<int>``, ``<list[Path]>``).
TYPE_NAMES = {int: "INTEGER", float: "FLOAT", str: "TEXT", Path: "PATH"}
#: Flags that belong to the whole program and also work after the command (``lakead fit ... -q``).
GLOBAL_FLAGS = ("-q", "--quiet", "-v", "--verbose")


def _plain_type(param: Any) -> str:
    """A parameter's type as ``--help`` shows it: its metavar, else INTEGER, FLOAT, TEXT or
    PATH (``...`` after an argument that takes several); nothing for a flag."""
    if getattr(param, "is_flag", False):
        return ""
    if param.metavar:
        return param.metavar
    hint = param.type_descriptor.annotation
    if typing.get_origin(hint) is list:
        hint = typing.get_args(hint)[0]
    return TYPE_NAMES.get(hint, "TEXT") + ("..." if param.param_type_name == "argument" and param.nargs != 1 else "")


class _PlainArgument(typer.core.TyperArgument):
    def display_type(self, ctx: Any) -> str:
        return _plain_type(self)

    def _usage_display_name(self) -> str:  # NAME..., [NAME]: click's own style
        name = self.name.upper() + ("..." if self.nargs != 1 else "")
        return name if self.required else f"[{name}]"


class _PlainOption(typer.core.TyperOption):
    def display_type(self, ctx: Any) -> str:
        return _plain_type(self)

    def display_type_rich(self, ctx: Any) -> str:
        return _plain_type(self)


def _plain(params: list[Any]) -> list[Any]:
    for p in params:  # the subclasses add no state: only how the type is shown
        if type(p) is typer.core.TyperArgument:
            p.__class__ = _PlainArgument
        elif type(p) is typer.core.TyperOption:
            p.__class__ = _PlainOption
    return params


class PlainCommand(typer.core.TyperCommand):
    """A command whose ``--help`` shows plain types (INTEGER, PATH, TEXT...; none for flags)."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _plain(super().get_params(ctx))


class PlainGroup(typer.core.TyperGroup):
    """The program: plain types in ``--help``, and the :data:`GLOBAL_FLAGS` also accepted
    after the command (moved in front of it before parsing)."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _plain(super().get_params(ctx))

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        return super().parse_args(ctx, hoist_global_flags(args, set(self.commands)))


def hoist_global_flags(args: list[str], commands: set[str]) -> list[str]:
    """``fit DIR -q`` -> ``-q fit DIR``: the :data:`GLOBAL_FLAGS` after the command word move in
    front of it (not after ``--``).

    >>> hoist_global_flags(["fit", "d", "-q", "--out", "m"], {"fit"})
    ['-q', 'fit', 'd', '--out', 'm']
    """
    at = next((i for i, a in enumerate(args) if a in commands), None)
    if at is None:
        return list(args)
    end = args.index("--") if "--" in args[at:] else len(args)
    moved = [a for a in args[at:end] if a in GLOBAL_FLAGS]
    rest = [a for a in args[at:end] if a not in GLOBAL_FLAGS]
    return [*args[:at], *moved, *rest, *args[end:]]
