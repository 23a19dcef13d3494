"""On the inspection line (issue 29): ``lakead update``, ``history``, ``rollback`` and ``watch`` (registered
on the app of :mod:`lakead.cli_common`; :mod:`lakead.cli` imports this module). docs/LINE.md."""

from __future__ import annotations

import getpass
import json
import math
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .api import Runtime
from .cli_common import app, errors_as_messages, out, progress_bar
from .options import runtime_options

_MODEL = typer.Argument(..., help="A model directory written by 'lakead fit'.", show_default=False)


def _who(by: Optional[str]) -> Optional[str]:
    if by is not None:
        return by
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return None


def _level(v: Optional[float]) -> str:
    return "-" if v is None else "inf" if math.isinf(v) else f"{v:.4g}"


@app.command()
@runtime_options()
def update(
    model_dir: Path = _MODEL,
    add_normal: list[Path] = typer.Option(..., "--add-normal", help="Image files or folders (searched recursively) to add "
                                          "as normal: their tokens join the gallery, the decision level is derived again "
                                          "(repeat the option for several).", show_default=False),
    by: Optional[str] = typer.Option(None, help="Who asked, for the history (default: the user running the command)."),
    as_json: bool = typer.Option(False, "--json", help="Print what the update did as one JSON object."),
    *,
    runtime: Runtime,
) -> None:
    """Add normal images to a fitted model without a refit; writes a new version (lakead history)."""
    from .images import list_images
    from .line.update import update_model

    with errors_as_messages():
        paths = list_images(add_normal)
        with progress_bar("update", len(paths)) as advance:
            upd, version = update_model(model_dir, [str(p) for p in paths], by=_who(by), device=runtime.device,
                                        batch_size=runtime.batch_size, precision=runtime.precision, on_progress=advance)
    if as_json:
        print(json.dumps({**upd.to_dict(), "version": version}))
        return
    out.print(f"version {version} of {model_dir}: {len(upd.added)} image(s) added as normal ({upd.support_before} -> "
              f"{upd.support_after} support images), threshold {_level(upd.threshold_before)} -> "
              f"{_level(upd.threshold_after)}, in {upd.seconds['total']:.1f} s", highlight=False, soft_wrap=True)
    for note in upd.inexact:
        out.print(f"not as a refit: {note}", highlight=False, markup=False, soft_wrap=True)


@app.command()
def history(model_dir: Path = _MODEL,
            as_json: bool = typer.Option(False, "--json", help="Print the history as JSON.")) -> None:
    """List a model's versions: when, what was added, by whom, the threshold before and after."""
    from .line.versions import read_history

    with errors_as_messages():
        hist = read_history(model_dir)
    if as_json:
        print(json.dumps(hist, indent=2))
        return
    table = Table(title=str(model_dir), title_justify="left")
    for col in ("version", "time", "action", "added", "by", "support", "threshold"):
        table.add_column(col)
    for e in hist["versions"]:
        added = e.get("added") or []
        shown = ", ".join(added[:3]) + (f" and {len(added) - 3} more" if len(added) > 3 else "")
        mark = " (current)" if e["version"] == hist["current"] else ""
        table.add_row(f"{e['version']}{mark}", str(e.get("time") or "-"), e.get("action", "-"),
                      f"{len(added)}: {shown}" if added else "-", str(e.get("by") or "-"), str(e.get("support", "-")),
                      f"{_level(e.get('threshold_before'))} -> {_level(e.get('threshold_after'))}")
    out.print(table)
    for r in hist.get("rollbacks", []):
        out.print(f"rolled back from {r['from']} to {r['version']} at {r['time']}" + (f" by {r['by']}" if r.get("by") else ""),
                  highlight=False)


@app.command()
def rollback(model_dir: Path = _MODEL,
             version: int = typer.Argument(..., help="The version to make current again (lakead history lists them).",
                                           show_default=False),
             by: Optional[str] = typer.Option(None, help="Who asked, for the history (default: the user running the command).")) -> None:
    """Make an earlier version of a model the current one again (its files, byte for byte)."""
    from .line.versions import rollback as do_rollback

    with errors_as_messages():
        entry = do_rollback(model_dir, version, by=_who(by))
    if entry["from"] == version:
        out.print(f"version {version} of {model_dir} is already the current one", highlight=False)
    else:
        out.print(f"{model_dir}: version {version} is current again (was {entry['from']})", highlight=False)


@app.command()
@runtime_options()
def watch(
    model_dir: Path = _MODEL,
    source: str = typer.Argument(..., help="A folder (new image files, each once complete), a video file, a stream "
                                 "(rtsp://, http://) or a camera (cam:0).", show_default=False),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Directory for scores.csv (one row per item), errors.csv, dropped.csv."),
    resume: bool = typer.Option(False, "--resume", help="Go on with the watch in --out: after its last scored item, "
                                "nothing scored twice or skipped; sinks get the results they had not confirmed."),
    every: int = typer.Option(1, "--every", min=1, help="Video: score every n-th frame."),
    fps: Optional[float] = typer.Option(None, "--fps", help="Video: score this many frames per second (of the video; of "
                                        "the clock for a live source)."),
    when_behind: str = typer.Option("block", "--when-behind", help="When scoring falls behind and the queue is full: "
                                    "block (the reader waits: every item scored, late) or drop-oldest (the oldest "
                                    "waiting item is dropped and listed in dropped.csv)."),
    queue_size: int = typer.Option(16, "--queue", min=1, help="Items read ahead of scoring, at most."),
    settle: float = typer.Option(1.0, help="Folder: a file is complete when its size and time have not changed for this many seconds."),
    poll: float = typer.Option(0.2, help="Folder: seconds between two looks at the folder."),
    idle_exit: Optional[float] = typer.Option(None, help="Folder: stop after this many seconds with no new file (default: run until stopped)."),
    max_items: Optional[int] = typer.Option(None, help="Stop after this many items."),
    as_json: bool = typer.Option(False, "--json", help="Also print each result as one JSON line on stdout."),
    mqtt: Optional[str] = typer.Option(None, help="Publish each result to this MQTT broker: HOST[:PORT] or mqtt[s]://HOST[:PORT]."),
    mqtt_topic: str = typer.Option("lakead/{model}/results", help="MQTT topic ({model}: the model folder's name, {item}: the item)."),
    mqtt_qos: int = typer.Option(1, help="MQTT quality of service: 0, 1 or 2."),
    mqtt_credentials: Optional[Path] = typer.Option(None, help="File of username=... and password=... lines (default: "
                                                    "$LAKEAD_MQTT_USERNAME and $LAKEAD_MQTT_PASSWORD; never on the command line)."),
    mqtt_tls: bool = typer.Option(False, "--mqtt-tls", help="Connect to the broker over TLS (the system's CAs)."),
    mqtt_ca: Optional[Path] = typer.Option(None, help="CA file of the broker's certificate (implies TLS)."),
    webhook: Optional[str] = typer.Option(None, help="POST each result as JSON to this URL (retried with backoff; what "
                                          "is still refused goes to --out/webhook-dead.jsonl; a bearer token from $LAKEAD_WEBHOOK_TOKEN)."),
    *,
    runtime: Runtime,
) -> None:
    """Score what a folder, a video file, a stream or a camera brings, as it comes; write scores.csv
    and publish each result (stdout, MQTT, a webhook). A new model version (lakead update,
    rollback) is used from the next item on."""
    from .line.record import Record
    from .line.sinks import JsonLines, MqttSink, Webhook
    from .line.watch import WHEN_BEHIND, watch as run_watch

    if when_behind not in WHEN_BEHIND:
        raise typer.BadParameter(f"one of {', '.join(WHEN_BEHIND)}", param_hint="--when-behind")

    def sinks(record: Record) -> list:
        made: list = []
        if mqtt is not None:
            made.append(MqttSink(mqtt, topic=mqtt_topic, qos=mqtt_qos, model=model_dir.resolve().name,
                                 credentials=None if mqtt_credentials is None else str(mqtt_credentials),
                                 tls=mqtt_tls, ca_file=None if mqtt_ca is None else str(mqtt_ca)))
        if webhook is not None:
            made.append(Webhook(webhook, record.dir / "webhook-dead.jsonl"))
        return made

    with errors_as_messages("interrupted: every result written is in scores.csv; go on with --resume"):
        summary = run_watch(model_dir, source, out_dir, resume=resume, when_behind=when_behind, queue_size=queue_size,
                            sinks=[JsonLines()] if as_json else [], every=every, fps=fps, settle=settle, poll=poll,
                            idle_exit=idle_exit, max_items=max_items, device=runtime.device, batch_size=runtime.batch_size,
                            precision=runtime.precision, make_sinks=sinks)
    p50, p99 = summary.latency(0.5), summary.latency(0.99)
    lat = f"; latency p50 {p50:.3f} s, p99 {p99:.3f} s" if p50 is not None else ""
    err_console().print(f"scored {summary.scored} item(s), {summary.anomalous} anomalous, {summary.dropped} dropped, "
                        f"{summary.failed} unreadable{lat}; results in {out_dir / 'scores.csv'}", highlight=False, soft_wrap=True)


def err_console():
    from .cli_common import err

    return err
