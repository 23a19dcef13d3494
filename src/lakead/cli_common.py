"""What the ``lakead`` commands share: the typer app and its global options, one-line error
messages, the progress bar, and the model and run options made from the configuration
(:mod:`lakead.options`). The commands are in :mod:`lakead.cli` and :mod:`lakead.cli_eval`."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Optional

import typer
from rich.console import Console, ConsoleDimensions
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

from ._version import __version__
from .errors import LakeadError
from .fileio import os_error_text
from .errors import printable
from .methods.lake import LakeConfig
from .helpstyle import PlainCommand, PlainGroup
from .options import MODEL_PANEL, config_options, option_specs
from .options import method_options as method_options  # noqa: F401 - for the commands

class _App(typer.Typer):
    """The program's typer app: every command shows plain types in --help (PlainCommand)."""

    def command(self, *args, **kwargs):  # type: ignore[override]
        kwargs.setdefault("cls", PlainCommand)
        return super().command(*args, **kwargs)


app = _App(
    name="lakead",
    cls=PlainGroup,
    help="Training-free few-shot visual anomaly detection (LAKE). Higher scores are more anomalous.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
err = Console(stderr=True, soft_wrap=True)  # messages stay on one line: greppable in logs
#: The width of stdout when it is not a terminal (a pipe, a file, a CI log) and COLUMNS is not set.
PIPED_WIDTH = 240


class _Stdout(Console):
    """stdout's console. Where stdout is piped, rich takes the width of the terminal on stdin or
    stderr, or 80, and cuts tables to it ("55." for 55.3, paths ending in "..."); piped output
    gets :data:`PIPED_WIDTH` columns instead (a table takes only what it needs). COLUMNS, when
    set, still decides."""

    def _size(self) -> ConsoleDimensions:
        size = Console.size.fget(self)  # type: ignore[attr-defined]
        if self._width is None and not self._environ.get("COLUMNS") and not self.is_terminal:
            return ConsoleDimensions(PIPED_WIDTH, size.height)
        return size

    size = property(_size, Console.size.fset)  # type: ignore[assignment]


out = _Stdout()


def _version(value: bool) -> None:
    if value:
        out.print(f"lakead {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Print progress details and debug information (also after the command)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only warnings and errors; no progress bar (also after the command)."),
    version: Optional[bool] = typer.Option(None, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """lakead: fit on a few normal images, then score, map and judge new ones."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logger = logging.getLogger("lakead")
    logger.handlers[:] = [RichHandler(console=err, show_time=False, show_path=False, markup=False)]
    logger.setLevel(level)
    logger.propagate = False
    state["quiet"] = quiet


state: dict[str, bool] = {"quiet": False}


def fail(message: str) -> "typer.Exit":
    err.print(f"[bold red]error:[/] {escape(printable(message, keep=chr(10)))}", highlight=False, markup=True, soft_wrap=True)
    return typer.Exit(code=1)


@contextmanager
def errors_as_messages(interrupted: str = "interrupted") -> Iterator[None]:
    """Print a :class:`LakeadError` or a system error (disk full, read-only, ...) as one clear
    message and exit 1, without a traceback; on Ctrl-C print ``interrupted`` and exit 130."""
    try:
        yield
    except LakeadError as exc:
        raise fail(str(exc)) from None
    except OSError as exc:
        raise fail(os_error_text(exc)) from None
    except KeyboardInterrupt:
        err.print(escape(interrupted), highlight=False)  # printed verbatim, like fail()
        raise typer.Exit(code=130) from None


@contextmanager
def progress_bar(description: str | None, total: int = 0) -> Iterator:
    """A progress bar on stderr; yields ``advance(n)``. The steps the library reports inside the
    block (:mod:`lakead.progress`: the leave-one-out, the scope check, an export's stages) get a
    row each, under the bar (``description`` None: those rows only). Nothing with -q."""
    from .progress import reporting

    if state["quiet"]:
        yield lambda n: None
        return
    columns = (SpinnerColumn(finished_text=" "), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=False) as bar:
        rows: dict[str, Any] = {}

        def listener(what: str, n: int | None):
            if what in rows:  # the same step again (the next category of an evaluation): its row starts over
                bar.reset(rows[what], total=n)
            else:
                rows[what] = bar.add_task(what, total=n)
            row = rows[what]
            if n is None:  # a stage of unknown length: done when it reports
                return lambda k: bar.update(row, total=1, completed=1)
            return lambda k: bar.advance(row, k)

        task = bar.add_task(description, total=total) if description is not None else None
        with reporting(listener):
            yield (lambda n: bar.advance(task, n)) if task is not None else (lambda n: None)


@contextmanager
def loading(what: str) -> Iterator[None]:
    """A spinner on stderr saying what is loading (importing torch, reading a backbone) where no
    bar can count it; nothing with -q or where stderr is not a terminal."""
    if state["quiet"] or not err.is_terminal:
        yield
        return
    with err.status(f"{what}...", spinner="dots"):
        yield


def check_hub(config: Any) -> None:
    """Without network, a hub backbone that is not cached is one message now (before torch is
    imported and a progress bar drawn), not a failure half-way (lakead.backbones.hub)."""
    from .backbones.hub import hub_options

    for spec in (config.backbone, getattr(config, "text_backbone", None)):  # every method has a backbone
        if spec is not None:
            hub_options(spec)


#: The default backbone: the configuration's (declared once, in lakead.methods.lake.config).
DEFAULT_BACKBONE: str = option_specs(LakeConfig)["backbone"].default


def model_options(**kwargs):
    """Every option of :class:`LakeConfig` on a command (see :func:`lakead.options.config_options`);
    a bad value is one message and exit status 1, a bad word a usage error (2)."""
    return config_options(LakeConfig, errors=errors_as_messages, **kwargs)


def configured(method: str, config: LakeConfig, options: dict | None = None):
    """The configuration ``method`` runs with from a command's model options and method options,
    and the method; a warning names the options given that the method does not read."""
    from .methods import get_method

    m = get_method(method)
    unused = m.unused(config, options)
    if unused:
        logging.getLogger("lakead").warning("method %s does not use %s", m.name,
                                            ", ".join("--" + u.replace("_", "-") for u in unused))
    return m.configure(config, options), m


#: The options the evaluation commands share (fit has its own --seed and --shots).
_CATEGORIES = typer.Option(None, "--categories", help="Only these categories (repeat the option or separate with commas; default: all).")
_EVAL_SEED = typer.Option(0, help="Seed of the shot sample; also seeds --selection random and the outlier filter.",
                          rich_help_panel=MODEL_PANEL)
_FIRST = typer.Option(False, "--first", help="Take the first N training images by name instead of a seeded sample.")


