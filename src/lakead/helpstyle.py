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
    """A command whose ``--help`` shows plain types (INTEGER, PATH, TEXT...; none for flags),
    and, when ``--method M`` is given with ``--help``, only the model options method ``M`` has
    (each method owns its options: ``lakead fit --method patchcore --help``)."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        ctx.meta["lakead.args"] = list(args)  # read by --help, which click runs before the other options
        return super().parse_args(ctx, args)

    def format_help(self, ctx: Any, formatter: Any) -> None:
        ctx.meta["lakead.help"] = True
        try:
            super().format_help(ctx, formatter)
        finally:
            ctx.meta.pop("lakead.help", None)

    def get_params(self, ctx: Any) -> list[Any]:
        params = _plain(super().get_params(ctx))
        method = _method_asked(ctx) if ctx.meta.get("lakead.help") else None
        return params if method is None else method_params(params, method)


def _method_asked(ctx: Any) -> str | None:
    """The ``--method`` given on the command line being helped (None: none, or not a method)."""
    args = ctx.meta.get("lakead.args") or []
    for i, a in enumerate(args):
        value = a.split("=", 1)[1] if a.startswith("--method=") else args[i + 1] if a == "--method" and i + 1 < len(args) else None
        if value is not None:
            from .methods import METHODS

            return value if value in METHODS else None
    return None


def method_params(params: list[Any], method: str) -> list[Any]:
    """``params`` less the model options of other methods: an option named after a field of
    some method's config is kept only when ``method``'s config has that field (shown under
    "Model options"); the command's own options are kept."""
    import copy
    import dataclasses

    from .methods import METHODS, get_method
    from .options import METHOD_PANEL, MODEL_PANEL

    fields = {m.name: {f.name for f in dataclasses.fields(m.config_class)} for m in METHODS.values()}
    everyone = set().union(*fields.values())
    own = fields[get_method(method).name]
    out = []
    for p in params:
        if p.name in everyone and p.name not in own:
            continue
        if getattr(p, "rich_help_panel", None) == METHOD_PANEL:
            p = copy.copy(p)
            p.rich_help_panel = MODEL_PANEL
        out.append(p)
    return out


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
