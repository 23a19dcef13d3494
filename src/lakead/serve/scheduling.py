"""Who runs when: worker slots shared fairly between models, a server-wide pixel budget, and
stopping the work of a client that went away.

- :class:`FairSlots`: ``workers`` slots. Waiting requests queue per model and the models
  take turns (round robin), so a cheap prediction on one model never waits behind a queue of
  slow ones on another; with two or more workers one model holds at most ``workers - 1`` of
  them, so another model always finds a slot as soon as the running call on it ends (never
  behind minutes of someone else's queue). At most ``max_queued`` requests wait per model;
  more are refused at once (503, ``Retry-After``).
- :class:`PixelBudget`: the decoded pixels all requests hold at once; a request waits until
  its pixels fit (one that alone is over the budget is refused, 413).
- :func:`run_for_client`: runs blocking work in a thread while watching the connection; when
  the client disconnects, the wait for a slot ends and the running work is told to stop
  (it checks between batches of images and raises :class:`~lakead.serve.uploads.Cancelled`);
  so is work that runs past the server's time limit (``max_seconds``, :class:`TimedOut`, 503).
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any, TypeVar

import anyio
from starlette.requests import Request

from ..errors import LakeadError
from .uploads import Cancelled, UploadRejected

T = TypeVar("T")


class Busy(LakeadError):
    """Too many requests are waiting: answered 503 with ``Retry-After``."""


class FairSlots:
    """``workers`` slots taken in turn by the keys (models) that wait for one."""

    def __init__(self, workers: int, max_queued: int, what: str = "predictions") -> None:
        self.workers = workers
        self.per_key = max(1, workers - 1)
        self.max_queued = max_queued
        self.what = what
        self.running: dict[str, int] = {}
        self.waiting: OrderedDict[str, deque[anyio.Event]] = OrderedDict()  # round-robin order of keys

    def _free(self) -> int:
        return self.workers - sum(self.running.values())

    def _grant(self) -> None:
        """Give free slots to the first waiting keys in turn (each key then goes last)."""
        while self._free() > 0:
            for key, queue in self.waiting.items():
                if self.running.get(key, 0) < self.per_key:
                    event = queue.popleft()
                    if not queue:
                        del self.waiting[key]
                    else:
                        self.waiting.move_to_end(key)
                    self.running[key] = self.running.get(key, 0) + 1
                    event.set()
                    break
            else:
                return

    def _release(self, key: str) -> None:
        self.running[key] -= 1
        if not self.running[key]:
            del self.running[key]
        self._grant()

    @asynccontextmanager
    async def slot(self, key: str) -> AsyncIterator[None]:
        queue = self.waiting.get(key)
        if queue is not None and len(queue) >= self.max_queued:
            raise Busy(f"too many {self.what} waiting for {key!r}: {len(queue)} already queued "
                       f"(lakead serve --max-queued); try again later")
        event = anyio.Event()
        self.waiting.setdefault(key, deque()).append(event)
        self._grant()
        try:
            await event.wait()
        except BaseException:  # cancelled while waiting (the client went away)
            if event.is_set():
                self._release(key)
            else:
                self.waiting[key].remove(event)
                if not self.waiting[key]:
                    del self.waiting[key]
            raise
        try:
            yield
        finally:
            self._release(key)


class PixelBudget:
    """Decoded pixels held by all requests at once, at most ``total``."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0
        self.peak = 0
        self._cond = threading.Condition()

    @contextmanager
    def hold(self, pixels: int, cancelled: Callable[[], bool] = lambda: False) -> Iterator[None]:
        if pixels > self.total:
            raise UploadRejected(413, f"the images of this request hold {pixels / 1e6:.1f} MP once decoded, more than "
                                      f"this server's budget of {self.total / 1e6:.1f} MP (--max-server-megapixels)")
        with self._cond:
            while self.used + pixels > self.total:
                if cancelled():
                    raise Cancelled()
                self._cond.wait(0.05)
            self.used += pixels
            self.peak = max(self.peak, self.used)
        try:
            yield
        finally:
            with self._cond:
                self.used -= pixels
                self._cond.notify_all()


class TimedOut(LakeadError):
    """The work ran past the server's time limit and was stopped: answered 503."""


async def run_for_client(request: Request, slots: FairSlots, key: str, work: Callable[[threading.Event], T],
                         max_seconds: float | None = None) -> T:
    """``work(cancel)`` in a worker thread once ``slots`` gives ``key`` a turn. If the client
    disconnects meanwhile, the wait ends, ``cancel`` is set for running work (which stops
    at its next check), and :class:`Cancelled` is raised. Work still running ``max_seconds``
    after its turn came is told to stop the same way, and :class:`TimedOut` is raised: a
    request cannot hold a worker for longer, whatever it asked for."""
    cancel = threading.Event()
    timed_out = threading.Event()
    result: list[Any] = []

    def run(cancel: threading.Event) -> T:
        timer = None
        if max_seconds is not None:
            timer = threading.Timer(max_seconds, lambda: (timed_out.set(), cancel.set()))
            timer.daemon = True
            timer.start()
        try:
            return work(cancel)
        except Cancelled:
            if timed_out.is_set():
                raise TimedOut(f"stopped after {max_seconds:g} s, the longest this server lets one request run "
                               "(lakead serve --max-seconds): send fewer images, or ask for less") from None
            raise
        finally:
            if timer is not None:
                timer.cancel()

    async def watch(scope: anyio.CancelScope) -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                cancel.set()
                scope.cancel()
                return

    failed: list[Exception] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(watch, tg.cancel_scope)
        try:
            async with slots.slot(key):
                result.append(await anyio.to_thread.run_sync(run, cancel))
        except Exception as exc:  # noqa: BLE001 - raised below, outside the task group
            failed.append(exc)
        tg.cancel_scope.cancel()
    if failed:
        raise failed[0]
    if not result:
        raise Cancelled("the client disconnected: its work was stopped")
    return result[0]
