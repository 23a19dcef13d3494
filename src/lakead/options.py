"""Command-line options (and form fields) made from the configuration's own fields.

Every option of a model is declared once, as a field of :class:`~lakead.methods.lake.LakeConfig`
(its type, default and ``metadata["help"]``). This module turns those fields into the
options of ``lakead fit``, ``eval``, ``ablate`` and ``baselines`` (and the service builds its
form fields from the same :func:`option_specs`), so the commands cannot drift apart:

- :func:`config_options` appends one option per field to a typer command and hands the
  command one validated configuration as ``config=``;
- :func:`runtime_options` appends ``--device``, ``--batch-size`` and ``--precision`` and
  hands the command an :class:`~lakead.api.Runtime` as ``runtime=``.

How a field becomes an option: ``use_text`` -> ``--text/--no-text`` (its ``metadata["flag"]``),
any other ``bool`` -> ``--name/--no-name``; a ``Literal`` -> one of its words (checked: another
word is a usage error, exit status 2); a number or a word (``k``: an integer or ``auto``); a
block (``layer``: a block number or an ONNX tensor name, several as ``12,18`` or ``a+b``).

Typer reads a command's parameters from ``inspect.signature`` and its type hints: the
decorators set ``__signature__`` and ``__annotations__`` (with real types, not the strings
of ``from __future__ import annotations``) on the function they return.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

import typer
import typer.core
from rich.markup import escape

from .api import PRECISIONS, Runtime
from .fields import field_types, literal_choices, parse_layer
from .errors import ConfigError
from .methods.lake.config import LakeConfig

#: Help panels of ``--help``: the options of the model, and how a run is carried out.
MODEL_PANEL = "Model options"
RUN_PANEL = "Run options"

#: How a run is carried out (:class:`~lakead.api.Runtime`): help of each setting.
RUNTIME_HELP = {
    "device": "auto (CUDA when available), cpu, cuda or cuda:N.",
    "batch_size": "Images per forward pass.",
    "precision": "Backbone arithmetic: float32 (the reference) or bfloat16 (faster on GPUs and CPUs with "
                 "AVX512-BF16/AMX; docs/PERFORMANCE.md).",
}

#: What a list option (``lists=`` of :func:`config_options`) adds to the field's help.
LIST_HELP = "Comma-separated alternatives, each one run."
LAYER_LIST_HELP = ("Comma-separated alternatives, each one run; '+' joins several blocks into one alternative "
                   "(12,18,12+18: block 12, block 18, and both concatenated).")

Kind = Literal["flag", "choice", "block", "blocks", "number_or_word", "value"]


def _invalid(message: str) -> ValueError:
    """The error a parser raises for a bad value: typer shows it as ``Invalid value for
    '--name': message`` (a usage error, exit status 2)."""
    try:  # recent typer coerces through pydantic: a custom error keeps the message as it is
        from pydantic_core import PydanticCustomError

        return PydanticCustomError("lakead_option", "{message}", {"message": message})
    except ImportError:  # pragma: no cover - older typer (click) reads any ValueError
        return ValueError(message)


def _without_none(hint: Any) -> tuple[Any, bool]:
    """``Optional[X]`` -> ``(X, True)``; anything else -> ``(hint, False)``."""
    if typing.get_origin(hint) is Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) < len(typing.get_args(hint)):
            return (args[0] if len(args) == 1 else Union[tuple(args)]), True
    return hint, False


def _plain_types(hint: Any) -> set[type]:
    """The plain types a hint admits besides its Literal words."""
    if isinstance(hint, type):
        return {hint}
    if typing.get_origin(hint) is Literal:
        return set()
    out: set[type] = set()
    for arg in typing.get_args(hint):
        out |= _plain_types(arg)
    return out


@dataclass(frozen=True)
class OptionSpec:
    """One field of a configuration as an option: what it accepts and how text is read."""

    name: str
    hint: Any  # the field's type, resolved
    default: Any
    help: str
    kind: Kind
    choices: tuple[Any, ...] = ()  # choice: every value; number_or_word: the words besides a number
    base: type = str  # value, number_or_word: the type of a plain value
    optional: bool = False  # None is a value (it means "the default rule")
    flag: str | None = None  # flag: "--text/--no-text"
    panel: str = MODEL_PANEL  # the help panel (metadata["panel"]: "Reading options" for window and slices)

    @property
    def option(self) -> str:
        """The option's name on the command line: ``--semantic-layer``."""
        return "--" + self.name.replace("_", "-")

    @property
    def metavar(self) -> str:
        if self.kind == "choice":
            return "[" + "|".join(map(str, self.choices)) + "]"
        if self.kind == "block":
            return "BLOCK"
        if self.kind == "blocks":
            return "BLOCK[,BLOCK]"
        name = {int: "INTEGER", float: "FLOAT"}.get(self.base, "TEXT")
        return "|".join([name, *map(str, self.choices)]) if self.kind == "number_or_word" else name

    @property
    def form_type(self) -> Any:
        """The type of the field in a form (FastAPI): its own type without None, blocks as
        text (read with :meth:`parse`)."""
        if self.kind == "flag":
            return bool
        if self.kind in ("block", "blocks"):
            return str
        if self.kind == "choice":
            return Literal[self.choices]  # type: ignore[valid-type]
        return _without_none(self.hint)[0]

    def parse(self, value: Any) -> Any:
        """Text as typed -> the field's value; a value that is not text is returned as it is
        (defaults). Raises ``ValueError`` with a message naming what was expected."""
        if not isinstance(value, str):
            return value
        v = value.strip()
        if self.kind == "flag":
            words = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
            if v.lower() not in words:
                raise _invalid(f"expected true or false, got {value!r}")
            return words[v.lower()]
        if self.kind == "choice":
            for c in self.choices:
                if v.lower() == str(c).lower():
                    return c
            raise _invalid(f"{value!r} is not one of {', '.join(map(str, self.choices))}")
        if self.kind in ("block", "blocks"):
            if not v:
                raise _invalid("expected a block number or a tensor name, got nothing")
            layer = parse_layer(v)
            if isinstance(layer, list) and self.kind == "block":
                raise _invalid(f"one block only, got {value!r}")
            return layer
        if self.kind == "number_or_word":
            for c in self.choices:
                if v.lower() == str(c).lower():
                    return c
        try:
            return self.base(v)
        except ValueError:
            expected = {int: "an integer", float: "a number"}.get(self.base, "text")
            words = " or ".join(repr(str(c)) for c in self.choices) if self.kind == "number_or_word" else ""
            raise _invalid(f"expected {expected}{' or ' + words if words else ''}, got {value!r}") from None

    def parse_list(self, value: Any) -> list[Any]:
        """Comma-separated alternatives -> a list of values (``+`` joins blocks into one)."""
        if not isinstance(value, str):
            return list(value)
        items = [v.strip() for v in value.split(",") if v.strip()]
        if not items:
            raise _invalid(f"expected one or more comma-separated values, got {value!r}")
        return [self.parse(v) for v in items]


def option_specs(config_cls: type = LakeConfig) -> dict[str, OptionSpec]:
    """Field name -> :class:`OptionSpec`, in declaration order."""
    hints = field_types(config_cls)
    out = {}
    for f in dataclasses.fields(config_cls):
        hint = hints[f.name]
        inner, optional = _without_none(hint)
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = ...  # no default: a required option
        words = literal_choices(inner)
        plain = _plain_types(inner)
        common = dict(name=f.name, hint=hint, default=default, help=f.metadata.get("help", ""), optional=optional,
                      panel=f.metadata.get("panel", MODEL_PANEL))
        if inner is bool:
            spec = OptionSpec(kind="flag", flag=f.metadata.get("flag"), **common)
        elif words and not plain:
            spec = OptionSpec(kind="choice", choices=words, **common)
        elif words and plain & {int, float}:
            spec = OptionSpec(kind="number_or_word", choices=words, base=float if float in plain else int, **common)
        elif {int, str} <= plain:  # a block: a block number or a tensor name (Layer); with list, several (LayerSpec)
            spec = OptionSpec(kind="blocks" if list in plain else "block", **common)
        elif len(plain) == 1:
            spec = OptionSpec(kind="value", base=next(iter(plain)), **common)
        else:
            raise TypeError(f"{config_cls.__name__}.{f.name}: no command-line option for the type {hint!r}")
        out[f.name] = spec
    return out


def option_text(value: Any) -> str:
    """A value as it is typed on the command line: a list is comma-separated, a list inside
    a list joined with ``+``.

    >>> option_text(18), option_text([12, 18]), option_text([12, [12, 18]])
    ('18', '12,18', '12,12+18')
    """
    if isinstance(value, (list, tuple)):
        return ",".join("+".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v) for v in value)
    return str(value)


def command_line(ctx: typer.Context) -> str:
    """The command as typed, rebuilt from its parameters (defaults left out), for reports:
    ``lakead eval DATA --out r --layer 12,18 --no-text``."""
    import shlex

    words = [ctx.find_root().info_name or "lakead", ctx.info_name or ""]
    for p in ctx.command.params:
        value = ctx.params.get(p.name)
        if p.name in ("config_file", "print_config"):  # the file's values are written out instead
            continue
        if p.param_type_name == "argument":
            words += [str(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
            continue
        if value in (None, [], ()) or option_text(value) == option_text(p.default):
            continue
        if getattr(p, "is_flag", False):
            secondary = getattr(p, "secondary_opts", None)
            if value or secondary:
                words.append(p.opts[0] if value else secondary[0])
        elif getattr(p, "multiple", False):
            words += [w for v in value for w in (p.opts[0], option_text(v))]
        else:
            words += [p.opts[0], option_text(value)]
    return " ".join(shlex.quote(w) for w in words)


# -- building the commands ----------------------------------------------------------------


def _typer_option(spec: OptionSpec, *, as_list: bool = False, list_default: Sequence[Any] | None = None) -> tuple[Any, Any]:
    """``(annotation, typer.Option)`` of a field."""
    help_text = escape(spec.help)  # typer reads help as rich markup: brackets are text here
    if as_list:
        alternatives = list(list_default) if list_default is not None else [spec.default]
        default = None if alternatives == [None] else option_text(alternatives)  # None: the field's own default
        extra = LAYER_LIST_HELP if spec.kind == "blocks" else LIST_HELP
        return Any, typer.Option(
            default, spec.option, parser=spec.parse_list, metavar=spec.metavar + ",...", help=f"{help_text} {extra}",
            rich_help_panel=spec.panel,
        )
    if spec.kind == "flag":
        decls = spec.flag or f"{spec.option}/--no-{spec.option[2:]}"
        return bool, typer.Option(spec.default, decls, help=help_text, rich_help_panel=spec.panel)
    return Any, typer.Option(
        spec.default, spec.option, parser=spec.parse, metavar=spec.metavar, help=help_text,
        show_default=spec.default is not None, rich_help_panel=spec.panel,
    )


def _extend(
    func: Callable[..., Any],
    added: list[inspect.Parameter],
    injected: Sequence[str],
    build: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]],
) -> Callable[..., Any]:
    """``func`` with the parameters ``added`` (after its own) and without those named in
    ``injected``: the wrapper takes the added values out of the call, and passes what
    ``build(added_values, own_values)`` returns (the injected parameters) instead."""
    sig = inspect.signature(func)
    hints = typing.get_type_hints(func)
    own = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in sig.parameters.values() if p.name not in injected]
    names = [p.name for p in added]

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        values = {name: kwargs.pop(name) for name in names if name in kwargs}
        return func(*args, **kwargs, **build(values, kwargs))

    params = own + added
    wrapper.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params if p.annotation is not inspect.Parameter.empty}
    if "return" in hints:
        wrapper.__annotations__["return"] = hints["return"]
    return wrapper


def config_options(
    config_cls: type = LakeConfig,
    *,
    lists: Sequence[str] | Mapping[str, Sequence[Any]] = (),
    errors: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a typer command one option per field of ``config_cls``; it receives one
    validated configuration as ``config=``.

    - A field the command declares itself (same parameter name) keeps the command's option
      (its default and help: ``--seed`` means more than the field's seed in ``fit``); its
      value goes into the configuration too, None meaning the field's default.
    - ``lists``: fields whose option takes comma-separated alternatives (``ablate``); a
      mapping gives their defaults (else the field's default alone). The command then also
      receives ``alternatives={field: [values]}``; every alternative is validated, and
      ``config`` holds the first of each.
    - ``errors``: a context manager the configuration is built in (the command line's
      turns a :class:`~lakead.errors.ConfigError` into one message and exit status 1).
    """
    specs = option_specs(config_cls)
    list_defaults: dict[str, Sequence[Any] | None] = (
        dict(lists) if isinstance(lists, Mapping) else {name: None for name in lists}
    )
    unknown = sorted(set(list_defaults) - set(specs))
    if unknown:
        raise TypeError(f"lists: {unknown} are not fields of {config_cls.__name__}")

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        declared = inspect.signature(func).parameters
        if "config" not in declared:
            raise TypeError(f"{func.__name__}: a command with config_options takes a 'config' parameter")
        if list_defaults and "alternatives" not in declared:
            raise TypeError(f"{func.__name__}: a command with list options takes an 'alternatives' parameter")
        added = []
        for name, spec in specs.items():
            if name in declared:
                continue
            annotation, default = _typer_option(spec, as_list=name in list_defaults, list_default=list_defaults.get(name))
            added.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation))

        def build(values: dict[str, Any], own: dict[str, Any]) -> dict[str, Any]:
            for name in specs:
                if name in declared and own.get(name) is not None:
                    values[name] = own[name]
            alternatives = {name: [None] if values[name] is None else list(values[name]) for name in list_defaults if name in values}
            with (errors or contextlib.nullcontext)():
                config = build_config(config_cls, values, alternatives)
            return {"config": config, **({"alternatives": alternatives} if list_defaults else {})}

        return _extend(func, added, ("config", "alternatives"), build)

    return decorate


def build_config(config_cls: type, values: Mapping[str, Any], alternatives: Mapping[str, Sequence[Any]] = ()) -> Any:
    """A validated configuration from option values; each field in ``alternatives`` takes
    its first alternative, and every alternative is validated in turn."""
    base = dict(values)
    for name, alts in dict(alternatives).items():
        if not alts:
            raise ConfigError(f"{name}: no value given")
        base[name] = alts[0]
    config = config_cls(**base).validate()
    for name, alts in dict(alternatives).items():
        for alt in alts[1:]:
            dataclasses.replace(config, **{name: alt}).validate()
    return config


def choice_option(default: Any, *param_decls: str, choices: Sequence[str], help: str, many: bool = False,
                  **kwargs: Any) -> Any:
    """A typer option that takes one of ``choices`` (``many``: several, comma-separated);
    another word is a usage error (exit status 2). Annotate its parameter ``Any``. ``choices``
    is read when the option is parsed, so a live mapping (the registry of methods) admits what
    was registered after the command was built."""
    words = tuple(choices)

    def parse_one(value: str) -> str:
        live = tuple(choices)
        for c in live:
            if value.strip().lower() == c.lower():
                return c
        raise _invalid(f"{value!r} is not one of {', '.join(live)}")

    def parse(value: Any) -> Any:
        if not isinstance(value, str):
            return value
        if not many:
            return parse_one(value)
        items = [v for v in value.split(",") if v.strip()]
        if not items:
            raise _invalid(f"expected one or more of {', '.join(words)}, comma-separated")
        return [parse_one(v) for v in items]

    metavar = "[" + "|".join(words) + "]" + (",..." if many else "")
    return typer.Option(default, *param_decls, parser=parse, metavar=metavar, help=help, **kwargs)


def runtime_options(*, defaults: Runtime | None = None, pixels: bool = True) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a typer command ``--device``, ``--batch-size`` and ``--precision``; it receives
    them as one :class:`~lakead.api.Runtime` (``runtime=``), not yet validated (the device is
    checked where it is used: a Ray cluster's workers may have a GPU the caller lacks).
    ``pixels``: also ``--max-pixels``, the pixel budget of every input file of the run
    (:mod:`lakead.limits`, set when the command starts)."""
    from .limits import DEFAULT_MAX_PIXELS, VOLUME_FACTOR, set_max_pixels

    base = defaults or Runtime()

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        if "runtime" not in inspect.signature(func).parameters:
            raise TypeError(f"{func.__name__}: a command with runtime_options takes a 'runtime' parameter")
        kw = inspect.Parameter.KEYWORD_ONLY
        added = [
            inspect.Parameter("device", kw, annotation=str, default=typer.Option(
                base.device, "--device", help=RUNTIME_HELP["device"], rich_help_panel=RUN_PANEL)),
            inspect.Parameter("batch_size", kw, annotation=int, default=typer.Option(
                base.batch_size, "--batch-size", min=1, help=RUNTIME_HELP["batch_size"], rich_help_panel=RUN_PANEL)),
            inspect.Parameter("precision", kw, annotation=Any, default=choice_option(
                base.precision, "--precision", choices=PRECISIONS, help=RUNTIME_HELP["precision"], rich_help_panel=RUN_PANEL)),
        ]
        if pixels:
            added.append(inspect.Parameter("max_pixels", kw, annotation=int, default=typer.Option(
                DEFAULT_MAX_PIXELS, "--max-pixels", min=1, rich_help_panel=RUN_PANEL,
                help=f"Most pixels one image file may have (width x height; a DICOM or NIfTI file {VOLUME_FACTOR} times as "
                     "many in all its frames or slices), read from its header: larger files are refused before they "
                     "are decoded (docs/DATA.md).")))

        def build(values: dict[str, Any], own: dict[str, Any]) -> dict[str, Any]:
            if pixels:
                set_max_pixels(values.pop("max_pixels", None))
            return {"runtime": Runtime(**values)}

        return _extend(func, added, ("runtime",), build)

    return decorate


# -- the options of methods other than LAKE --------------------------------------------------

#: Help panel of the options that only methods other than LAKE have.
METHOD_PANEL = "Options of the other methods"


def method_option_specs() -> dict[str, tuple[OptionSpec, tuple[str, ...]]]:
    """Field name -> (its :class:`OptionSpec`, the methods that have it), for every field of a
    registered method's configuration that :class:`LakeConfig` lacks (PatchCore's ``coreset``,
    AnomalyDINO's ``top_percent``...). A field two methods share must mean the same (same kind
    and default); a field LAKE also has is LAKE's option (``--layer``, ``--seed``, the decision
    options) and goes to every method that has it."""
    from .methods import METHODS

    lake = set(option_specs(LakeConfig))
    out: dict[str, tuple[OptionSpec, tuple[str, ...]]] = {}
    for m in METHODS.values():
        if m.config_class is LakeConfig:
            continue
        for name, spec in option_specs(m.config_class).items():
            if name in lake:
                continue
            if name in out:
                first = out[name][0]
                if (first.kind, first.default) != (spec.kind, spec.default):
                    raise TypeError(f"option {name!r}: methods {out[name][1]} and {m.name!r} give it different meanings")
                out[name] = (first, (*out[name][1], m.name))
            else:
                out[name] = (spec, (m.name,))
    return out


def method_options() -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a typer command one option per field of :func:`method_option_specs` (default: the
    method's own); it receives the values given as ``method_options={field: value}``."""
    specs = method_option_specs()

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        if "method_options" not in inspect.signature(func).parameters:
            raise TypeError(f"{func.__name__}: a command with method_options takes a 'method_options' parameter")
        added = []
        for name, (spec, methods) in specs.items():
            help_text = escape(f"{spec.help} [{', '.join(methods)}; default: {option_text(spec.default)}]")
            if spec.kind == "flag":
                annotation, default = Optional[bool], typer.Option(
                    None, f"{spec.option}/--no-{spec.option[2:]}", help=help_text, show_default=False,
                    rich_help_panel=METHOD_PANEL)
            else:
                annotation, default = Any, typer.Option(
                    None, spec.option, parser=spec.parse, metavar=spec.metavar, help=help_text, show_default=False,
                    rich_help_panel=METHOD_PANEL)
            added.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation))

        def build(values: dict[str, Any], own: dict[str, Any]) -> dict[str, Any]:
            return {"method_options": {k: v for k, v in values.items() if v is not None}}

        return _extend(func, added, ("method_options",), build)

    return decorate


__all__ = [
    "METHOD_PANEL",
    "LIST_HELP",
    "MODEL_PANEL",
    "RUN_PANEL",
    "OptionSpec",
    "build_config",
    "choice_option",
    "command_line",
    "config_options",
    "method_option_specs",
    "method_options",
    "option_specs",
    "option_text",
    "runtime_options",
]
