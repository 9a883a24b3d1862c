"""Bounded storage calls: every open, listing and read of data goes through ``bounded``, which gives it
``data.io_timeout`` seconds, retries with exponential backoff, then fails with one error naming the URL
and the key. The call runs on a daemon thread, so a read blocked in a socket (a store that accepts a
connection and never answers) never blocks its caller, and a stop request ends the wait at once."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

from data_pipeline.cli import DataError

log = logging.getLogger(__name__)
T = TypeVar("T")

POLL_SECONDS = 0.2  # how often a wait looks at the stop requests
# After a stop request a call still gets this long: one that answers (a local manifest at start-up)
# lets the process reach the point where it saves; one that hangs is left.
STOP_PATIENCE_SECONDS = 1.0


class StopRequested(Exception):
    """The trainer was asked to stop (SIGTERM, SIGUSR1) while it waited for data."""


class StorageTimeout(DataError):
    """A storage call that did not answer within data.io_timeout, on every attempt."""


@dataclass
class IOPolicy:
    timeout: float = 60.0  # seconds per attempt (data.io_timeout)
    retries: int = 2  # attempts after the first
    backoff: float = 1.0  # seconds before the first retry; doubles after each
    stop: threading.Event | None = None  # the process's stop request (set by the signal handlers)


_policy = IOPolicy()
_local = threading.local()  # a reader thread's own stop event (its readers were closed)


def configure(
    timeout: float | None = None, retries: int | None = None, backoff: float | None = None, stop=None
) -> IOPolicy:
    """Sets the process's policy (the trainer does, from data.io_timeout and its stop event); returns it."""
    if timeout is not None:
        if not timeout > 0:
            raise ValueError(f"data.io_timeout must be > 0, got {timeout}")
        _policy.timeout = float(timeout)
    if retries is not None:
        _policy.retries = retries
    if backoff is not None:
        _policy.backoff = backoff
    if stop is not None:
        _policy.stop = stop
    return _policy


def policy() -> IOPolicy:
    return _policy


@contextmanager
def stop_on(event: threading.Event) -> Iterator[None]:
    """Storage waits on this thread also end when ``event`` is set (a reader whose epoch was closed)."""
    previous = getattr(_local, "stop", None)
    _local.stop = event
    try:
        yield
    finally:
        _local.stop = previous


def stop_requested() -> bool:
    own = getattr(_local, "stop", None)
    return bool((_policy.stop is not None and _policy.stop.is_set()) or (own is not None and own.is_set()))


def _wait(done: threading.Event, seconds: float) -> bool:
    """Waits up to ``seconds`` for ``done``; raises StopRequested when a stop is requested and the
    call does not end within STOP_PATIENCE_SECONDS of it."""
    deadline = time.monotonic() + seconds
    while True:
        if stop_requested():
            if done.wait(STOP_PATIENCE_SECONDS):
                return True
            raise StopRequested
        left = deadline - time.monotonic()
        if left <= 0:
            return done.is_set()
        if done.wait(min(left, POLL_SECONDS)):
            return True


def _transient(error: BaseException) -> bool:
    """A failure worth another attempt: the connection, not the request (a missing file is final)."""
    if isinstance(error, TimeoutError | ConnectionError):
        return True
    try:
        import aiohttp
    except ImportError:  # fsspec's http backend is optional
        return False
    return isinstance(error, aiohttp.ClientConnectionError | aiohttp.ServerTimeoutError)


def _attempt(call: Callable[[], object], box: dict[str, object], done: threading.Event) -> None:
    try:
        box["value"] = call()
    except BaseException as e:  # noqa: BLE001 (handed to the caller)
        box["error"] = e
    finally:
        done.set()


def bounded(call: Callable[[], T], url: str, what: str = "read", on_abandon: Callable[[], None] | None = None) -> T:
    """``call()``'s result, run on a daemon thread and awaited at most data.io_timeout per attempt.

    A call that times out (or fails on its connection) is tried again after a pause that doubles,
    ``retries`` times; then StorageTimeout names ``what``, ``url`` and the key. An attempt that timed
    out is abandoned, still blocked; ``on_abandon`` lets the caller drop what it shares with it (a
    buffer). Other errors (a missing file) are raised at once. StopRequested when a stop is requested."""
    p = _policy
    attempts = p.retries + 1
    last_error = ""
    for attempt in range(attempts):
        box: dict[str, object] = {}
        done = threading.Event()
        threading.Thread(target=_attempt, args=(call, box, done), name=f"storage-{what}", daemon=True).start()
        if _wait(done, p.timeout):
            error = box.get("error")
            if error is None:
                return box["value"]  # type: ignore[return-value]
            if not _transient(error):
                raise error  # type: ignore[misc]
            last_error = f"; last error: {type(error).__name__}: {error}"
        else:
            last_error = ""
            if on_abandon is not None:
                on_abandon()
        if attempt + 1 < attempts:
            pause = p.backoff * 2**attempt
            why = last_error[2:] or f"no answer within data.io_timeout={p.timeout:g} s"
            log.warning("storage %s of %s: %s (attempt %d of %d); retrying in %g s", what, url, why, attempt + 1,
                        attempts, pause)  # fmt: skip
            _wait(threading.Event(), pause)  # a pause that a stop request ends (after the patience)
    raise StorageTimeout(
        f"storage did not answer: {what} of {url} got no answer within data.io_timeout={p.timeout:g} s "
        f"in {attempts} attempts{last_error}. Check the store (or raise data.io_timeout for a slow one)."
    )
