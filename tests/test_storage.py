"""Bounded storage calls (data_pipeline/storage.py): timeout, retries with backoff, one error naming the
URL and the key, a stop request that ends the wait at once."""

from __future__ import annotations

import threading
import time

import pytest

from data_pipeline import storage
from data_pipeline.shards import DataError
from data_pipeline.storage import StopRequested, StorageTimeout, bounded


@pytest.fixture
def policy():
    saved = storage.IOPolicy(**vars(storage.policy()))
    storage.configure(timeout=0.3, retries=2, backoff=0.05, stop=threading.Event())
    yield storage.policy()
    for key, value in vars(saved).items():
        setattr(storage.policy(), key, value)


def never_answers(release: threading.Event, calls: list[float]):
    def call():
        calls.append(time.monotonic())
        release.wait()  # a read blocked in a socket
        return b"late"

    return call


def test_a_call_that_never_answers_is_tried_three_times_then_named(policy):
    release, calls = threading.Event(), []
    start = time.monotonic()
    with pytest.raises(StorageTimeout) as error:
        bounded(never_answers(release, calls), "http://store/x.tar", "shard read")
    took = time.monotonic() - start
    release.set()
    assert isinstance(error.value, DataError)  # one line through the CLI wrapper
    assert "http://store/x.tar" in str(error.value) and "data.io_timeout=0.3" in str(error.value)
    assert len(calls) == 3
    # 3 timeouts and the pauses between them, doubling: 0.05 then 0.1. A wait ends no sooner than
    # asked (the lower bounds are the schedule); a loaded machine may end it later, so the upper
    # bounds only tell a retry from a call that was never given up.
    assert 0.3 + 0.05 - 0.02 <= calls[1] - calls[0] < 0.3 + 0.05 + 2
    assert 0.3 + 0.1 - 0.02 <= calls[2] - calls[1] < 0.3 + 0.1 + 2
    assert 3 * 0.3 + 0.15 - 0.02 <= took < 3 * 0.3 + 0.15 + 5


def test_a_transient_failure_is_retried_and_a_missing_file_is_not(policy):
    attempts = []

    def flaky():
        attempts.append(1)
        if len(attempts) < 3:
            raise ConnectionResetError("reset by the store")
        return 42

    assert bounded(flaky, "s3://b/k") == 42 and len(attempts) == 3
    missing = []

    def gone():
        missing.append(1)
        raise FileNotFoundError("s3://b/none")

    with pytest.raises(FileNotFoundError):
        bounded(gone, "s3://b/none")
    assert len(missing) == 1


def test_connection_failures_on_every_attempt_name_the_last_error(policy):
    def refused():
        raise ConnectionRefusedError("refused")

    with pytest.raises(StorageTimeout, match="ConnectionRefusedError: refused"):
        bounded(refused, "http://store/m.json")


def test_a_stop_request_ends_the_wait_at_once(policy):
    storage.configure(timeout=60.0)  # the stop, not the timeout, must end this wait
    release, calls = threading.Event(), []
    threading.Timer(0.1, policy.stop.set).start()
    start = time.monotonic()
    with pytest.raises(StopRequested):
        bounded(never_answers(release, calls), "http://store/x.tar")
    release.set()
    assert len(calls) == 1  # not retried after the stop
    assert time.monotonic() - start < 0.1 + storage.POLL_SECONDS + storage.STOP_PATIENCE_SECONDS + 10


def test_after_a_stop_request_a_call_that_answers_still_completes(policy):
    policy.stop.set()  # e.g. a SIGTERM during start-up: a local manifest is still read, to reach the save
    assert bounded(lambda: time.sleep(0.2) or "manifest", "data/manifest.json") == "manifest"


def test_a_readers_own_stop_ends_its_waits(policy):
    release, calls, own = threading.Event(), [], threading.Event()
    own.set()
    with storage.stop_on(own), pytest.raises(StopRequested):
        bounded(never_answers(release, calls), "x")
    release.set()
    assert bounded(lambda: 7, "x") == 7  # other waits of the thread are not stopped


def test_an_abandoned_read_does_not_write_into_the_next_reads_buffer(policy, tmp_path, monkeypatch):
    from data_pipeline.shard_io import ReadBuffer

    shard = tmp_path / "s.tar"
    shard.write_bytes(b"x" * 100)
    buffer = ReadBuffer()
    buffer.read(str(shard))
    first = buffer._data
    plain, release = ReadBuffer._read, threading.Event()
    stalled = [True]

    def stall_once(self, path):
        if stalled.pop() if stalled else False:
            release.wait()
        return plain(self, path)

    monkeypatch.setattr(ReadBuffer, "_read", stall_once)
    assert bytes(buffer.read(str(shard))) == b"x" * 100  # the retry, into a fresh buffer
    assert buffer._data is not first
    release.set()


def test_the_timeout_must_be_positive():
    with pytest.raises(ValueError, match="data.io_timeout"):
        storage.configure(timeout=0)
    with pytest.raises(ValueError, match="data.io_timeout"):
        storage.configure(timeout=float("nan"))


@pytest.mark.parametrize("override", ["data.io_timeout=0", "data.io_timeout=-1", "train.collective_timeout=0"])
def test_the_wait_bounds_are_positive_in_the_configuration(override):
    from trainer.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        load_config("toy_25gaussians", [override])
