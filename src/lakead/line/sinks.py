"""Where ``lakead watch`` publishes each result besides scores.csv: stdout, MQTT, a webhook.

A :class:`Sink` sends one result (a dict: item, ready, scored, score, visual, semantic, anomalous,
out_of_scope, regions, latency_s, model_version) and raises :class:`SinkDown` when it cannot now.
Each sink but stdout runs in a :class:`SinkWorker` thread that follows scores.csv from the sink's
own count (:class:`lakead.line.record.Record`), so a slow or unreachable endpoint never holds the
scoring up, and rows it has not confirmed are sent after ``--resume``.

- :class:`JsonLines`: one JSON object per line on stdout (for shell pipelines), as results come.
- :class:`MqttSink` (``paho-mqtt``): to ``topic`` (``{item}`` and ``{model}`` filled in) at QoS 0,
  1 or 2, over TLS when asked; credentials from a file (``username=`` and ``password=`` lines) or
  from ``LAKEAD_MQTT_USERNAME`` / ``LAKEAD_MQTT_PASSWORD``, never from the command line. paho
  reconnects by itself (1 to 30 s); a result is confirmed when the broker acknowledged it (QoS 1,
  2) or it was written to the socket (QoS 0).
- :class:`Webhook` (``httpx``): a JSON ``POST`` per result, retried with a backoff (0.5, 1, 2,
  4, 8 s) on a network error, a 5xx or a 429; a result still refused then, or refused with another
  4xx, goes to the dead-letter file (``webhook-dead.jsonl`` in the output directory, with the
  reason) so that nothing is lost. ``LAKEAD_WEBHOOK_TOKEN``, when set, is sent as a bearer token.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlparse

from ..errors import ConfigError, LakeadError
from .record import Record

log = logging.getLogger("lakead")


class SinkDown(LakeadError):
    """The sink cannot deliver now (the worker tries again later)."""


class Sink:
    name = "sink"

    def send(self, result: dict[str, Any]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class JsonLines(Sink):
    """One JSON object per result on ``stream`` (stdout)."""

    name = "stdout"

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream

    def send(self, result: dict[str, Any]) -> None:
        out = self.stream or sys.stdout
        out.write(json.dumps(result, separators=(",", ":")) + "\n")
        out.flush()


def read_credentials(path: str | os.PathLike | None, prefix: str) -> tuple[str | None, str | None]:
    """``(username, password)`` from a file of ``username=...`` and ``password=...`` lines, else
    from ``<prefix>_USERNAME`` and ``<prefix>_PASSWORD``; ``(None, None)`` when neither is there."""
    if path is not None:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{p}: cannot read the credentials ({exc.strerror or exc})") from None
        vals: dict[str, str] = {}
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            key, sep, value = line.partition("=")
            if not sep or key.strip() not in ("username", "password"):
                raise ConfigError(f"{p}, line {n}: expected username=... or password=...")
            vals[key.strip()] = value.strip()
        return vals.get("username"), vals.get("password")
    return os.environ.get(f"{prefix}_USERNAME"), os.environ.get(f"{prefix}_PASSWORD")


class MqttSink(Sink):
    """Results to an MQTT broker (see the module docstring)."""

    name = "mqtt"

    def __init__(self, url: str, *, topic: str = "lakead/{model}/results", qos: int = 1, model: str = "model",
                 credentials: str | None = None, tls: bool = False, ca_file: str | None = None,
                 client_id: str | None = None, timeout: float = 10.0) -> None:
        try:
            import paho.mqtt.client as mqtt
        except ImportError:
            raise ConfigError("the MQTT output needs paho-mqtt: pip install paho-mqtt") from None
        if qos not in (0, 1, 2):
            raise ConfigError(f"--mqtt-qos must be 0, 1 or 2, got {qos}")
        u = urlparse(url if "://" in url else f"mqtt://{url}")
        if u.scheme not in ("mqtt", "mqtts", "tcp", "ssl") or not u.hostname:
            raise ConfigError(f"--mqtt: expected HOST[:PORT] or mqtt[s]://HOST[:PORT], got {url!r}")
        if u.username or u.password:
            raise ConfigError("--mqtt: give credentials in a file (--mqtt-credentials) or in LAKEAD_MQTT_USERNAME and "
                              "LAKEAD_MQTT_PASSWORD, not in the URL (it shows in process lists and shell history)")
        tls = tls or u.scheme in ("mqtts", "ssl") or ca_file is not None
        self.topic, self.qos, self.model, self.timeout = topic, qos, model, timeout
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or f"lakead-watch-{os.getpid()}")
        user, password = read_credentials(credentials, "LAKEAD_MQTT")
        if user is not None:
            self.client.username_pw_set(user, password)
        if tls:
            self.client.tls_set(ca_certs=ca_file)
        self.client.reconnect_delay_set(1, 30)
        self.connected = threading.Event()
        self.client.on_connect = lambda c, u_, f, rc, p=None: self.connected.set() if not rc.is_failure else None
        self.client.on_disconnect = lambda *a: self.connected.clear()
        port = u.port or (8883 if tls else 1883)
        self.where = f"{u.hostname}:{port}"
        try:
            self.client.connect_async(u.hostname, port)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--mqtt {url}: {exc}") from None
        self.client.loop_start()

    def send(self, result: dict[str, Any]) -> None:
        if not self.connected.wait(self.timeout):
            raise SinkDown(f"MQTT broker {self.where} not connected")
        topic = self.topic.format(model=self.model, item=result["item"])
        info = self.client.publish(topic, json.dumps(result, separators=(",", ":")), qos=self.qos)
        if info.rc != 0:
            raise SinkDown(f"MQTT publish to {self.where} failed (code {info.rc})")
        try:
            info.wait_for_publish(self.timeout)
        except (RuntimeError, ValueError) as exc:
            raise SinkDown(f"MQTT publish to {self.where}: {exc}") from None
        if not info.is_published():
            raise SinkDown(f"MQTT broker {self.where} did not acknowledge within {self.timeout:.0f} s")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class Webhook(Sink):
    """Results POSTed to ``url`` (see the module docstring)."""

    name = "webhook"
    RETRIES = (0.5, 1.0, 2.0, 4.0, 8.0)

    def __init__(self, url: str, dead_letter: Path, *, timeout: float = 10.0, retries: tuple[float, ...] | None = None) -> None:
        import httpx

        u = urlparse(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ConfigError(f"--webhook: expected an http(s) URL, got {url!r}")
        headers = {"content-type": "application/json"}
        token = os.environ.get("LAKEAD_WEBHOOK_TOKEN")
        if token:
            headers["authorization"] = f"Bearer {token}"
        self.url, self.dead = url, Path(dead_letter)
        self.retries = self.RETRIES if retries is None else retries
        self.client = httpx.Client(timeout=timeout, headers=headers)
        self.httpx = httpx

    def send(self, result: dict[str, Any]) -> None:
        problem = ""
        for wait in (*self.retries, None):
            try:
                r = self.client.post(self.url, content=json.dumps(result))
                if 200 <= r.status_code < 300:
                    return
                problem = f"HTTP {r.status_code}"
                if 400 <= r.status_code < 500 and r.status_code != 429:
                    break  # the endpoint refuses this result: trying again will not help
            except self.httpx.HTTPError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            if wait is not None:
                time.sleep(wait)
        with open(self.dead, "a", encoding="utf-8") as fh:  # nothing lost: kept with the reason
            fh.write(json.dumps({"url": self.url, "error": problem, "result": result}) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        log.warning("webhook %s: %s; result for %s kept in %s", self.url, problem, result["item"], self.dead)

    def close(self) -> None:
        self.client.close()


class SinkWorker(threading.Thread):
    """Delivers the rows of scores.csv to one sink, from its count on, in its own thread."""

    #: Results held in memory for the sink; beyond, it reads them back from scores.csv.
    MAX_PENDING = 10_000

    def __init__(self, sink: Sink, record: Record) -> None:
        super().__init__(name=f"lakead-sink-{sink.name}", daemon=True)
        self.sink, self.record = sink, record
        self.next_row = record.delivered(sink.name)
        self.pending: deque[tuple[int, dict[str, Any]]] = deque()
        self.cond = threading.Condition()
        self.total = record.rows
        self.closing = False
        self.give_up = threading.Event()
        self.error: str | None = None

    def push(self, row: int, result: dict[str, Any]) -> None:
        with self.cond:
            if len(self.pending) < self.MAX_PENDING:
                self.pending.append((row, result))
            self.total = row + 1
            self.cond.notify()

    def _next(self) -> dict[str, Any] | None:
        while self.pending and self.pending[0][0] < self.next_row:
            self.pending.popleft()
        if self.pending and self.pending[0][0] == self.next_row:
            return self.pending[0][1]
        return next(self.record.results_from(self.next_row), None)  # not held: read back from scores.csv

    def run(self) -> None:
        backoff = 1.0
        while True:
            with self.cond:
                while self.next_row >= self.total and not self.closing:
                    self.cond.wait()
                if self.next_row >= self.total:
                    return
            result = self._next()
            if result is None:
                return
            try:
                self.sink.send(result)
            except SinkDown as exc:
                if self.error is None:
                    log.warning("%s: %s; holding its results and trying again (up to %.0f s apart)", self.sink.name, exc,
                                30.0)
                self.error = str(exc)
                if self.give_up.wait(backoff):
                    return
                backoff = min(30.0, backoff * 2)
                continue
            if self.error is not None:
                log.warning("%s: delivering again", self.sink.name)
            self.error, backoff = None, 1.0
            self.next_row += 1
            self.record.set_delivered(self.sink.name, self.next_row)

    def finish(self, timeout: float) -> bool:
        """Deliver what is left (at most ``timeout`` seconds), then stop; whether all was delivered."""
        with self.cond:
            self.closing = True
            self.cond.notify()
        self.join(timeout)
        if self.is_alive():
            self.give_up.set()
            self.join(60.0)
        self.sink.close()
        return self.next_row >= self.total
