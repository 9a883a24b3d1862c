"""Bounded storage calls: every open, listing and read of data goes through ``bounded``, which gives it
``data.io_timeout`` seconds (a read that reports its progress: that long without progress), retries
with exponential backoff, then fails with one error naming the URL and the key. The call runs on a
daemon thread, so a read blocked in a socket (a store that accepts a connection and never answers)
never blocks its caller, and a stop request ends the wait at once."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NoReturn, TypeVar

from data_pipeline.cli import DataError

log = logging.getLogger(__name__)
T = TypeVar("T")

POLL_SECONDS = 0.2  # how often a wait looks at the stop requests
# After a stop request a call still gets this long: one that answers (a local manifest at start-up)
# lets the process reach the point where it saves; one that hangs is left.
STOP_PATIENCE_SECONDS = 1.0


class StopRequested(Exception):
    """The trainer was asked to stop (SIGTERM, SIGUSR1) while it waited for data."""


class PatientStop:
    """A stop request that data waits see ``seconds`` after it came or after the process's latest
    progress (``progressed``), whichever is later: the data of slow storage may still come. (A rank of
    several that waits for data when a stop comes should reach the metric reduction where every rank
    saves together; giving up at once ends the job at the newest checkpoint.)"""

    def __init__(self, stop: threading.Event, seconds: float):
        self.stop, self.seconds = stop, seconds
        self._seen: float | None = None
        self._progress = time.monotonic()

    def progressed(self) -> None:
        self._progress = time.monotonic()

    def is_set(self) -> bool:
        if not self.stop.is_set():
            return False
        if self._seen is None:
            self._seen = time.monotonic()
        return time.monotonic() - max(self._seen, self._progress) >= self.seconds


class StorageTimeout(DataError):
    """A storage call that failed on every attempt: no answer within data.io_timeout, a dropped
    connection, or a store that kept asking to come back later (HTTP 503)."""


@dataclass
class IOPolicy:
    timeout: float = 60.0  # seconds per attempt (data.io_timeout)
    retries: int = 2  # attempts after the first
    backoff: float = 1.0  # seconds before the first retry; doubles after each
    stop: threading.Event | PatientStop | None = None  # the process's stop request (set by the signal handlers)


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


def stop_signalled() -> bool:
    """Whether the process was asked to stop, whatever the patience: a data source that fails after
    that failed of it (Slurm's SIGTERM to the whole job step ends pipe: commands and DataLoader workers)."""
    stop = _policy.stop
    return stop is not None and (stop.stop if isinstance(stop, PatientStop) else stop).is_set()


def stop_requested() -> bool:
    own = getattr(_local, "stop", None)
    return bool((_policy.stop is not None and _policy.stop.is_set()) or (own is not None and own.is_set()))


@dataclass
class _Attempt:
    """One attempt at a bounded call, shared between the thread that runs it and the one that waits."""

    done: threading.Event = field(default_factory=threading.Event)
    given_up: threading.Event = field(default_factory=threading.Event)  # the waiter left (a timeout, a stop)
    steps: int = 0  # progress the call reported (made_progress)
    value: object = None
    error: BaseException | None = None


def made_progress() -> bool:
    """Called by a call that ``bounded`` runs after each step of its work (a block read), so that
    data.io_timeout bounds the wait for the next step rather than the whole call. False when the
    attempt was given up: nobody waits for its result, and it should stop and release its handle."""
    attempt: _Attempt | None = getattr(_local, "attempt", None)
    if attempt is None:  # not run by bounded
        return True
    attempt.steps += 1
    return not attempt.given_up.is_set()


def _wait(done: threading.Event, seconds: float, attempt: _Attempt | None = None) -> bool:
    """Waits up to ``seconds`` for ``done``, or with ``attempt`` up to ``seconds`` after its last
    progress; raises StopRequested when a stop is requested and the call does not end within
    STOP_PATIENCE_SECONDS of it."""
    deadline = time.monotonic() + seconds
    steps = attempt.steps if attempt is not None else 0
    while True:
        if stop_requested():
            if done.wait(STOP_PATIENCE_SECONDS):
                return True
            raise StopRequested
        if attempt is not None and attempt.steps != steps:
            steps, deadline = attempt.steps, time.monotonic() + seconds
        left = deadline - time.monotonic()
        if left <= 0:
            return done.is_set()
        if done.wait(min(left, POLL_SECONDS)):
            return True


# HTTP statuses that say "not now" (a timeout, throttling, an overloaded or restarting server): tried
# again like a dropped connection. Any other error status is the request's own fault and final.
TRANSIENT_HTTP_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
MISSING_HTTP_STATUSES = frozenset({404, 410})


def http_status(error: BaseException) -> int | None:
    """The HTTP error status a store answered with, or None. Read from the ``status`` attribute
    (aiohttp's ClientResponseError: fsspec's http backend is optional), on the error itself or the one
    it was raised from: fsspec's http ``info`` turns a failed HEAD and GET into FileNotFoundError."""
    for candidate in (error, error.__cause__):
        status = getattr(candidate, "status", None)
        if isinstance(status, int) and not isinstance(status, bool) and 400 <= status < 600:
            return status
    return None


def _transient(error: BaseException) -> bool:
    """A failure worth another attempt: the connection, or a store that asks to come back later (a
    missing file is final)."""
    if isinstance(error, TimeoutError | ConnectionError) or http_status(error) in TRANSIENT_HTTP_STATUSES:
        return True
    try:
        import aiohttp
    except ImportError:  # fsspec's http backend is optional
        return False
    return isinstance(error, aiohttp.ClientConnectionError | aiohttp.ServerTimeoutError)


def unreachable(error: BaseException, url: str) -> DataError | None:
    """A DataError for a store that cannot be found or will not let this process in (a host name that does
    not resolve, no credentials), naming ``url`` and the fix; None for any other error."""
    if isinstance(error, socket.gaierror):
        return DataError(f"cannot reach {url}: its host name does not resolve ({error.strerror}): check the address")
    if type(error).__name__.endswith("CredentialsError"):  # botocore's, google.auth's: by name, neither is needed
        return DataError(
            f"no credentials to reach {url} ({type(error).__name__}: {error}): set the store's (AWS_PROFILE or "
            "AWS_ACCESS_KEY_ID for s3://, GOOGLE_APPLICATION_CREDENTIALS for gs://), or use a URL open to all"
        )
    return None


def _raise_final(error: BaseException, url: str, what: str) -> NoReturn:
    """Raises a failure that is not tried again: an HTTP "not found" as FileNotFoundError (what callers
    report as a missing file, as for the other stores), any other HTTP error status, an unknown host or
    missing credentials as a DataError naming the URL and the fix, anything else unchanged."""
    found = unreachable(error, url)
    if found is not None:
        raise found from error
    status = http_status(error)
    if status is None or (status in MISSING_HTTP_STATUSES and isinstance(error, FileNotFoundError)):
        raise error
    if status in MISSING_HTTP_STATUSES:
        raise FileNotFoundError(url) from error
    reason = getattr(error, "message", None) or getattr(error.__cause__, "message", None)
    raise DataError(
        f"the store refused the {what} of {url}: HTTP {status}{f' {reason}' if reason else ''}. Check the URL "
        "and that these credentials may read it."
    ) from error


def _run(call: Callable[[], object], attempt: _Attempt) -> None:
    _local.attempt = attempt  # for made_progress
    try:
        attempt.value = call()
    except BaseException as e:  # noqa: BLE001 (handed to the caller)
        attempt.error = e
    finally:
        attempt.done.set()


def bounded(call: Callable[[], T], url: str, what: str = "read", on_abandon: Callable[[], None] | None = None) -> T:
    """``call()``'s result, run on a daemon thread and awaited at most data.io_timeout per attempt, or
    for a call that reports its progress (made_progress) at most data.io_timeout after its last step.

    A call that times out (or fails on its connection, or is told to come back later: HTTP 503) is
    tried again after a pause that doubles, ``retries`` times; then StorageTimeout names ``what``,
    ``url`` and the key. An attempt that timed out is abandoned, still blocked; ``on_abandon`` lets
    the caller drop what it shares with it (a buffer). Other errors (a missing file) are raised at
    once, an HTTP error status as a DataError. StopRequested when a stop is requested."""
    p = _policy
    attempts = p.retries + 1
    last_error, stalled = "", False
    for number in range(attempts):
        attempt = _Attempt()
        threading.Thread(target=_run, args=(call, attempt), name=f"storage-{what}", daemon=True).start()
        try:
            finished = _wait(attempt.done, p.timeout, attempt)
        except StopRequested:
            attempt.given_up.set()
            raise
        if finished:
            if attempt.error is None:
                return attempt.value  # type: ignore[return-value]
            if not _transient(attempt.error):
                _raise_final(attempt.error, url, what)
            last_error = f"{type(attempt.error).__name__}: {attempt.error}"
        else:
            attempt.given_up.set()
            last_error = ""
            stalled = attempt.steps > 0  # a transfer that stopped part-way, not a store that never answered
            if on_abandon is not None:
                on_abandon()
        if number + 1 < attempts:
            pause = p.backoff * 2**number
            why = last_error or _timeout_text(stalled, p.timeout)
            log.warning("storage %s of %s: %s (attempt %d of %d); retrying in %g s", what, url, why, number + 1,
                        attempts, pause)  # fmt: skip
            _wait(threading.Event(), pause)  # a pause that a stop request ends (after the patience)
    if last_error:  # the last attempt failed rather than hung: "did not answer" would be false
        raise StorageTimeout(
            f"storage failed: {what} of {url} failed {attempts} times; last error: {last_error}. Check the store."
        )
    raise StorageTimeout(
        f"storage {'stalled' if stalled else 'did not answer'}: {what} of {url} got "
        f"{_timeout_text(stalled, p.timeout)} in {attempts} attempts. Check the store (or raise "
        "data.io_timeout for a slow one)."
    )


def _timeout_text(stalled: bool, timeout: float) -> str:
    return f"{'no further data' if stalled else 'no answer'} within data.io_timeout={timeout:g} s"
