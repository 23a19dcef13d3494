"""Settings kept in a file: ``--config FILE`` (YAML or TOML) and ``--print-config``.

A config file holds the options of a command under the names of its options (``k``,
``false_alarm_rate`` or ``false-alarm-rate``, ``out``, ``text: false``...). Its values become
the command's defaults (click's ``default_map``), so any option given on the command line
wins over the file. A key that is not an option of the command is an error naming the file,
the key and the closest option. ``--print-config`` writes every option of the command with
its current value (the file's, the command line's, or the default) as YAML, with each
option's help as a comment, and exits; that output read back with ``--config`` gives the same
values.
"""

from __future__ import annotations

import difflib
import tomllib
from pathlib import Path
from typing import Any, Optional

import typer

from .options import option_text

#: Parameters that are about the config file itself, never keys of one.
OWN = ("config_file", "print_config", "help")
#: Shown in place of a required value that is not known yet.
REQUIRED = "<required>"


def _strict_loader() -> type:
    import yaml

    class StrictLoader(yaml.SafeLoader):
        """YAML's safe loader, with a key given twice in one mapping an error (YAML keeps the last)."""

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} is given twice",
                                                            key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return StrictLoader


def read_config(path: Path) -> dict[str, Any]:
    """The mapping in a YAML (``.yaml``, ``.yml``) or TOML (``.toml``) file; raises
    ``typer.BadParameter`` naming the file and the problem."""
    def bad(problem: str) -> typer.BadParameter:
        return typer.BadParameter(f"{path}: {problem}", param_hint="--config")

    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".toml"):
        raise bad("a config file is YAML (.yaml, .yml) or TOML (.toml)")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise bad("no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise bad(f"cannot be read ({exc})") from None
    if suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise bad(f"not valid TOML: {exc}") from None
    else:
        import yaml

        try:
            data = yaml.load(text, Loader=_strict_loader())  # noqa: S506 - a SafeLoader that refuses a repeated key
        except yaml.YAMLError as exc:
            raise bad(f"not valid YAML: {' '.join(str(exc).split())}") from None
        except RecursionError:
            raise bad("nested deeper than a config file can be (option: value pairs)") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise bad(f"expected option: value pairs at the top level, got {type(data).__name__}")
    return data


def _keys(command: Any) -> dict[str, Any]:
    """Every name a file may use for a parameter of ``command`` -> the parameter: its own
    name and its long option names (``out`` for ``--out``, ``text`` for ``--text``), with
    ``-`` or ``_``."""
    out: dict[str, Any] = {}
    for p in command.params:
        if p.name in OWN or getattr(p, "hidden", False):
            continue
        names = [p.name] + [o.lstrip("-") for o in p.opts if o.startswith("--")]
        for n in names:
            out[n] = out[n.replace("-", "_")] = out[n.replace("_", "-")] = p
    return out


def _as_default(param: Any, value: Any) -> Any:
    """A file's value as the parameter's default: a list for an option that is not repeated
    becomes its comma-separated text (``layer: [12, 18]`` -> ``12,18``), read by its parser."""
    repeated = getattr(param, "multiple", False) or param.nargs != 1
    if isinstance(value, list) and not repeated:
        return option_text(value)
    if repeated and not isinstance(value, list):
        return [value]
    return value


def _load(ctx: typer.Context, param: Any, value: Optional[Path]) -> Optional[Path]:
    if value is None or ctx.resilient_parsing:
        return value
    data = read_config(value)
    keys = _keys(ctx.command)
    defaults = dict(ctx.default_map or {})
    for key, v in data.items():
        target = keys.get(str(key))
        if target is None:
            close = difflib.get_close_matches(str(key), sorted(k for k in keys if "-" not in k), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; the options are {', '.join(sorted(k for k in keys if '-' not in k))}"
            raise typer.BadParameter(f"{value}: unknown key {key!r}{hint}", param_hint="--config")
        defaults[target.name] = _as_default(target, v)
    ctx.default_map = defaults
    return value


def _print_mode(ctx: typer.Context, param: Any, value: bool) -> bool:
    """``--print-config``: required parameters get a placeholder, so the command can run to
    print its values without them."""
    if value and not ctx.resilient_parsing:
        defaults = dict(ctx.default_map or {})
        for p in ctx.command.params:
            if p.required and p.name not in defaults:
                defaults[p.name] = [REQUIRED] if p.nargs != 1 else REQUIRED
        ctx.default_map = defaults
    return value


def config_file_option() -> Any:
    return typer.Option(None, "--config", help="Read option values from this YAML or TOML file (option names as keys; "
                        "options on the command line win). 'lakead fit --print-config' writes one.",
                        is_eager=True, callback=_load, show_default=False)


def print_config_option() -> Any:
    return typer.Option(False, "--print-config", is_eager=True, callback=_print_mode,
                        help="Print every option with its value (from --config, the command line or the default) "
                             "as a YAML config file, and exit without running.")


def _plain(value: Any, param: Any) -> Any:
    """A value as a config file holds it."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        repeated = getattr(param, "multiple", False) or param.nargs != 1
        return [_plain(v, param) for v in value] if repeated else option_text(value)
    return value


def render_config(ctx: typer.Context) -> str:
    """The command's options and their current values as YAML, each with its help as a comment;
    a required value that is not given is left as a comment."""
    import yaml

    lines = [f"# lakead {ctx.info_name}: options and their values (read back with --config FILE;",
             "# options given on the command line win over the file)."]
    for p in ctx.command.params:
        if p.name in OWN or getattr(p, "hidden", False):
            continue
        key = next((o[2:] for o in p.opts if o.startswith("--")), p.name).replace("-", "_")
        help_text = " ".join((getattr(p, "help", None) or "").split())
        if help_text:
            lines.append("")
            lines += [f"# {chunk}" for chunk in _wrap(help_text)]
        value = ctx.params.get(p.name)
        if [str(v) for v in (value if isinstance(value, (list, tuple)) else [value])] == [REQUIRED]:
            lines.append(f"# {key}:   (required: give it here or on the command line)")
            continue
        lines.append(yaml.safe_dump({key: _plain(value, p)}, default_flow_style=False, sort_keys=False, width=1000).strip())
    return "\n".join(lines) + "\n"


def _wrap(text: str, width: int = 96) -> list[str]:
    import textwrap

    return textwrap.wrap(text.replace("\\[", "["), width) or [""]
