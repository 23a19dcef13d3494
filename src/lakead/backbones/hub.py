"""The Hugging Face Hub, asked once and quickly: is it reachable, is a model in the cache.

Without network, ``transformers`` retries every file for about 30 s before it gives up. A
backbone given as a hub id is checked here first: when the hub cannot be reached (or
``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` is set) a cached model is read from the cache
alone (``local_files_only``), and a model that is not cached fails at once with one message
naming every way to give a backbone (:func:`offline_message`).
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlsplit

from ..errors import BackboneUnavailableError
from ..fields import DEFAULT_CLIP

#: Seconds the reachability check waits (name lookup and TCP connection together).
CONNECT_TIMEOUT = 3.0
#: Environment variables that switch the hub off (the values huggingface_hub reads as true).
OFFLINE_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
_TRUE = {"1", "on", "yes", "true"}
_checked: dict[str, str | None] = {}  # endpoint -> why it cannot be reached (None: reachable)


def endpoint() -> str:
    """The hub's address: ``$HF_ENDPOINT`` or https://huggingface.co."""
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or "https://huggingface.co"


def offline_reason() -> str | None:
    """Why the hub cannot be used now, or None when it can: an offline variable is set, or
    no TCP connection to :func:`endpoint` within :data:`CONNECT_TIMEOUT` (checked once per
    process and endpoint)."""
    for name in OFFLINE_ENV:
        if os.environ.get(name, "").strip().lower() in _TRUE:
            return f"{name} is set"
    url = endpoint()
    if url not in _checked:
        _checked[url] = _unreachable(url)
    return _checked[url]


def _unreachable(url: str) -> str | None:
    parts = urlsplit(url)
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    if not host:
        return f"HF_ENDPOINT {url!r} is not a URL"
    result: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=CONNECT_TIMEOUT).close()
            result.append(None)
        except OSError as exc:
            result.append(f"cannot reach {url} ({exc.strerror or exc})")

    worker = threading.Thread(target=connect, daemon=True)  # a name lookup may ignore the socket timeout
    worker.start()
    worker.join(CONNECT_TIMEOUT)
    return result[0] if result else f"cannot reach {url} (no answer within {CONNECT_TIMEOUT:g} s)"


def is_hub_id(spec: str) -> bool:
    """Whether ``spec`` names a hub model rather than a local directory or a prefixed path."""
    return ":" not in spec and not Path(spec).expanduser().exists()


def is_cached(repo_id: str) -> bool:
    """Whether the hub model's config is in the local cache (``~/.cache/huggingface``)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # not a valid repo id, ...: the loader reports it
        return False


def hub_options(source: str, *, family: str | None = None, example: str = DEFAULT_CLIP) -> dict[str, bool]:
    """Keyword arguments for ``from_pretrained`` and ``cached_file``: ``local_files_only``
    when ``source`` is a hub id and the hub cannot be reached; raises
    :class:`~lakead.errors.BackboneUnavailableError` at once when it is not cached either
    (``family`` and ``example``: the adapter's name and a hub id of its family, for the message)."""
    if not is_hub_id(source):
        return {}
    reason = offline_reason()
    if reason is None:
        return {}
    if not is_cached(source):
        raise BackboneUnavailableError(offline_message(source, reason, family=family, example=example))
    return {"local_files_only": True}


def offline_message(source: str, reason: str, *, family: str | None = None, example: str = DEFAULT_CLIP) -> str:
    """One message for a hub model that cannot be had: why, and every way to give a backbone."""
    looks_local = source.startswith((".", "/", "~")) or source.count("/") > 1 or os.sep in source.replace("/", "")
    what = ("it is not a local directory (no such folder) and " if looks_local else "") + \
        f"the Hugging Face Hub cannot be used ({reason}) and it is not in the cache"
    name = example.rsplit("/", 1)[-1]
    return (
        f"cannot load the {family + ' ' if family else ''}backbone {source!r}: {what}.\n"
        "Give --backbone (backbone= in Python) one of:\n"
        f"  a hub id, on a machine with network (downloaded once, then read from the cache): {example};\n"
        f"  a local directory in the save_pretrained layout, made where there is network with\n"
        f"    'lakead download-backbone {example} ./{name}' and copied here: --backbone ./{name};\n"
        "  an ONNX image model, read as it is (visual only): --backbone onnx:mobilenetv2-12-int8.onnx;\n"
        "  a tiny CLIP with random weights, to try the tool (its scores mean nothing):\n"
        "    'python -m lakead.testing tiny ./tiny-clip', then --backbone ./tiny-clip."
    )
