"""What a long step inside the library is doing, for whoever shows it (the command line's bars).

A step loops through :func:`steps` (``for i in steps(images, "leave-one-out"): ...``); nothing
is shown and nothing is paid unless the caller installed a listener with :func:`reporting`, in
its own thread or task (a context variable: concurrent fits in the service do not see it).

>>> seen = []
>>> def listener(what, total):
...     seen.append((what, total))
...     return lambda n: seen.append(n)
>>> with reporting(listener):
...     [i * 2 for i in steps([1, 2], "doubling")]
[2, 4]
>>> seen
[('doubling', 2), 1, 1]
>>> list(steps([1, 2], "not shown"))  # no listener: the items, nothing else
[1, 2]
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TypeVar

T = TypeVar("T")
#: ``listener(what, total) -> advance``: a step of ``total`` items starts (None: a stage of
#: unknown length); ``advance(n)`` after each ``n`` of them (a stage: once, when it ends).
Listener = Callable[[str, "int | None"], Callable[[int], None]]

_listener: ContextVar[Listener | None] = ContextVar("lakead_progress", default=None)


@contextmanager
def reporting(listener: Listener | None) -> Iterator[None]:
    """Steps started inside this block are reported to ``listener`` (None: to nobody)."""
    token = _listener.set(listener)
    try:
        yield
    finally:
        _listener.reset(token)


@contextmanager
def stage(what: str) -> Iterator[None]:
    """A step of unknown length (tracing a graph, writing a file), reported as it starts and
    when it ends."""
    listener = _listener.get()
    done = listener(what, None) if listener is not None else None
    yield
    if done is not None:
        done(1)


def steps(items: Sequence[T], what: str) -> Iterator[T]:
    """The ``items``, reported as a step named ``what`` (one item done each time the loop asks
    for the next)."""
    listener = _listener.get()
    if listener is None or not items:
        yield from items
        return
    advance = listener(what, len(items))
    for item in items:
        yield item
        advance(1)
