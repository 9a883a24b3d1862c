"""Bounded storage calls (data_pipeline/storage.py): timeout, retries with backoff, one error naming the
URL and the key, a stop request that ends the wait at once; HTTP error statuses; reads bounded by their
progress, not their length."""

from __future__ import annotations

import functools
import http.server
import os
import re
import tempfile
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from data_pipeline import storage
from data_pipeline.shards import DataError, write_array_shards
from data_pipeline.storage import StopRequested, StorageTimeout, bounded, made_progress


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


class HTTPError(Exception):
    """What aiohttp raises for an error status, as far as storage.py looks: the ``status``."""

    def __init__(self, status: int):
        super().__init__(f"{status}, message='Some Reason'")
        self.status, self.message = status, "Some Reason"


def fails_then_answers(error: BaseException, times: int, calls: list[int]):
    def call():
        calls.append(1)
        if len(calls) <= times:
            raise error
        return b"shard"

    return call


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_http_statuses_that_say_come_back_later_are_retried(policy, status):
    calls = []
    assert bounded(fails_then_answers(HTTPError(status), 2, calls), "http://store/x.tar") == b"shard"
    assert len(calls) == 3
    with pytest.raises(StorageTimeout, match=f"failed 3 times; last error: HTTPError: {status}"):
        bounded(fails_then_answers(HTTPError(status), 3, []), "http://store/x.tar", "shard read")


def test_a_status_behind_fsspecs_file_not_found_counts(policy):
    def not_found_from(status):
        # fsspec's http info: a HEAD and a GET that both fail become FileNotFoundError raised from the last.
        error = FileNotFoundError("http://store/x.tar")
        error.__cause__ = HTTPError(status)
        return error

    calls = []
    assert bounded(fails_then_answers(not_found_from(503), 1, calls), "http://store/x.tar") == b"shard"
    assert len(calls) == 2
    with pytest.raises(DataError, match="HTTP 403"):
        bounded(fails_then_answers(not_found_from(403), 1, []), "http://store/x.tar")
    with pytest.raises(FileNotFoundError):
        bounded(fails_then_answers(not_found_from(404), 1, []), "http://store/x.tar")


@pytest.mark.parametrize("status", [400, 401, 403, 405, 501])
def test_other_http_statuses_are_a_data_error_naming_the_url_and_the_status(policy, status):
    calls = []
    with pytest.raises(DataError) as error:
        bounded(fails_then_answers(HTTPError(status), 1, calls), "http://store/x.tar", "shard read")
    assert not isinstance(error.value, StorageTimeout)
    assert "shard read of http://store/x.tar" in str(error.value) and f"HTTP {status} Some Reason" in str(error.value)
    assert len(calls) == 1  # final: not retried


@pytest.mark.parametrize("status", [404, 410])
def test_http_not_found_is_a_missing_file(policy, status):
    calls = []
    with pytest.raises(FileNotFoundError, match="http://store/x.tar"):
        bounded(fails_then_answers(HTTPError(status), 1, calls), "http://store/x.tar")
    assert len(calls) == 1


class ScriptedStore(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; ``errors[name]`` lists statuses to answer GETs of ``name`` with first, and
    ``pace`` (seconds per 64 KiB; ``stall``: stop after the first 64 KiB until released) slows bodies."""

    errors: dict[str, list[int]] = {}
    pace = 0.0
    stall: threading.Event | None = None

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        waiting = self.errors.get(self.path.lstrip("/"))
        if waiting:
            self.send_error(waiting.pop(0))
            return
        super().do_GET()

    def copyfile(self, source, destination) -> None:
        while block := source.read(64 << 10):
            destination.write(block)
            destination.flush()
            time.sleep(self.pace)
            if self.stall is not None:
                self.stall.wait()
                return


@pytest.fixture
def http_store(tmp_path) -> Iterator[tuple[str, type[ScriptedStore]]]:
    """A local HTTP store serving ``tmp_path`` (fsspec's http backend needs aiohttp): its URL, and
    its handler class to script."""
    pytest.importorskip("aiohttp", reason="http:// needs aiohttp")
    handler = type("Store", (ScriptedStore,), {"errors": {}})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        if handler.stall is not None:
            handler.stall.set()
        server.shutdown()
        server.server_close()


def test_one_503_from_an_http_store_is_retried_and_a_403_named(policy, http_store, tmp_path):
    from data_pipeline.shard_io import read_shard_bytes

    url, store = http_store
    (tmp_path / "s.tar").write_bytes(b"x" * 5000)
    store.errors["s.tar"] = [503]
    assert read_shard_bytes(f"{url}/s.tar") == b"x" * 5000
    assert store.errors["s.tar"] == []  # the 503 was answered, then retried
    store.errors["s.tar"] = [403]
    with pytest.raises(DataError, match=rf"shard read of {url}/s.tar: HTTP 403 Forbidden"):
        read_shard_bytes(f"{url}/s.tar")


def test_data_written_to_an_http_server_is_one_error_naming_the_url_and_the_way_out(http_store, tmp_path):
    from data_pipeline.convert import convert_toy

    url, _ = http_store
    temp = set(os.listdir(tempfile.gettempdir()))
    with pytest.raises(DataError) as caught:
        convert_toy("25gaussians", f"{url}/toy", 64, 2, seed=0)
    message = str(caught.value)
    # 501 or a broken pipe, as the server answers before or after reading the upload
    assert message.startswith(f"cannot write {url}/toy/25gaussians-train-000000.tar: "), message
    assert "an HTTP server takes no uploads" in message
    assert not {n for n in set(os.listdir(tempfile.gettempdir())) - temp if n.endswith(".partial")}  # no leftovers


def test_a_shard_gone_from_an_http_store_is_named(policy, http_store, tmp_path):
    from data_pipeline.shard_io import load_shard
    from data_pipeline.shards import read_manifest, write_array_shards

    url, _ = http_store
    write_array_shards(str(tmp_path), "img", "train", np.zeros((4, 2), np.float32), np.zeros(4), 2)
    manifest = read_manifest(url)
    (tmp_path / manifest.shards[1].url).unlink()
    with pytest.raises(DataError, match=f"shard {url}/img-train-000001.tar has disappeared"):
        load_shard(manifest.shard_urls()[1], manifest.shards[1], manifest)


def test_a_read_that_keeps_progressing_outlasts_the_timeout_and_a_stalled_one_stops(policy):
    stopped = threading.Event()

    def steady(steps: int):
        def call():
            for _ in range(steps):
                time.sleep(0.1)  # each step well within the 0.3 s timeout, all of them well beyond it
                if not made_progress():
                    stopped.set()
                    return b""
            return b"all"

        return call

    assert bounded(steady(10), "http://store/x.tar") == b"all"
    storage.configure(retries=0)
    stall = threading.Event()

    def stalls():
        made_progress()
        stall.wait()
        return steady(1)()

    with pytest.raises(StorageTimeout, match="storage stalled: read of http://store/x.tar got no further data within"):
        bounded(stalls, "http://store/x.tar")
    stall.set()
    assert stopped.wait(5)  # the abandoned read learnt at its next step that nobody waits for it


def test_a_slow_but_steady_http_download_is_not_a_timeout(policy, http_store, tmp_path):
    from data_pipeline.shard_io import read_shard_bytes

    url, store = http_store
    data = bytes(range(256)) * (4 << 10)  # 1 MiB: 16 blocks of 64 KiB, one per 0.06 s, about 1 s in all
    (tmp_path / "s.tar").write_bytes(data)
    store.pace = 0.06
    storage.configure(timeout=0.5, retries=0)
    assert read_shard_bytes(f"{url}/s.tar") == data
    store.stall = threading.Event()
    with pytest.raises(StorageTimeout, match="storage stalled: shard read of .* no further data within"):
        read_shard_bytes(f"{url}/s.tar")


def test_a_shard_of_many_blocks_reads_from_a_server_without_range_requests(policy, http_store, tmp_path, monkeypatch):
    from data_pipeline import shard_io

    url, _ = http_store  # python's http.server: it answers a range request with the whole file
    data = bytes(range(256)) * (12 << 10)  # 3 MiB: beyond what fsspec's first request reads ahead
    (tmp_path / "s.tar").write_bytes(data)
    monkeypatch.setattr(shard_io, "READ_BLOCK_BYTES", 64 << 10)
    assert shard_io.read_shard_bytes(f"{url}/s.tar") == data


def test_a_slow_network_filesystem_read_is_bounded_per_block(policy, tmp_path, monkeypatch):
    from data_pipeline import shard_io
    from data_pipeline.shard_io import ReadBuffer

    class SlowFile:
        """A file on a network filesystem that returns 64 KiB per read, 0.05 s each."""

        def __init__(self, path, *args, **kwargs):
            self.file = open(path, *args, **kwargs)  # noqa: SIM115 (closed in __exit__)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def fileno(self):
            return self.file.fileno()

        def readinto(self, view):
            time.sleep(0.05)
            return self.file.readinto(view[: 64 << 10])

    shard = tmp_path / "s.tar"
    shard.write_bytes(b"y" * (1 << 20))  # 16 reads: 0.8 s, beyond the 0.3 s timeout
    monkeypatch.setattr(shard_io, "open", SlowFile, raising=False)
    storage.configure(retries=0)
    assert bytes(ReadBuffer().read(str(shard))) == b"y" * (1 << 20)


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


class NoCredentialsError(Exception):
    """Named as botocore's is (the check goes by the name, so that neither botocore nor google.auth is needed)."""


@pytest.mark.parametrize(
    "error, says",
    [
        (OSError(-2, "Name or service not known"), "cannot reach ftp://x/y: its host name does not resolve"),
        (NoCredentialsError("Unable to locate credentials"), "no credentials to reach ftp://x/y (NoCredentialsError"),
    ],
)
def test_an_unknown_host_or_missing_credentials_is_named_with_the_fix_not_retried(policy, error, says):
    import socket

    if isinstance(error, OSError):
        error = socket.gaierror(*error.args)  # what getaddrinfo raises: a raw traceback before
    calls = []

    def fail():
        calls.append(1)
        raise error

    with pytest.raises(DataError, match=re.escape(says)):
        bounded(fail, "ftp://x/y")
    assert len(calls) == 1


def test_an_s3_data_set_without_credentials_is_a_data_error_naming_the_url(monkeypatch, tmp_path):
    pytest.importorskip("s3fs", reason="s3fs (an optional storage backend) is not installed")
    for name in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance metadata to wait for
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.aws
    from data_pipeline.shards import read_manifest

    with pytest.raises(DataError, match=re.escape("no credentials to reach s3://meg-no-bucket/d/manifest.json")):
        read_manifest("s3://meg-no-bucket/d")


def test_a_patient_stop_counts_its_patience_from_the_latest_progress():
    # Its patience ran from the first look at the stop: a rank that trained on for longer than it after
    # the signal gave a slow read no patience at all, and the job ended at the newest checkpoint.
    from data_pipeline.storage import PatientStop

    stop = threading.Event()
    patient = PatientStop(stop, 0.3)
    assert not patient.is_set()
    stop.set()
    assert not patient.is_set()  # seen now: 0.3 s from here
    time.sleep(0.4)
    assert patient.is_set()
    patient.progressed()  # the rank took a batch: a new wait for data gets the whole patience again
    assert not patient.is_set()
    time.sleep(0.4)
    assert patient.is_set()


def test_a_stopped_run_leaves_the_processes_storage_policy_as_it_found_it(tmp_path):
    # The stopped run's request stayed the process's: the next write of shards in it (a test, a KDD split)
    # was refused as stopped.
    from tests.conftest import tiny_overrides
    from trainer.config import load_config
    from trainer.job import run
    from trainer.meg_trainer import Preempted

    earlier = storage.policy()
    earlier_stop, earlier_timeout = earlier.stop, earlier.timeout
    stop = threading.Event()
    stop.set()
    with pytest.raises(Preempted):
        run(load_config("toy_25gaussians", [*tiny_overrides(tmp_path, steps=20), "data.io_timeout=7"]), stop)
    assert storage.policy().stop is earlier_stop and storage.policy().timeout == earlier_timeout
    write_array_shards(str(tmp_path / "after"), "pts", "train", np.zeros((4, 2), np.float32), np.zeros(4), 2)
    assert (tmp_path / "after" / "manifest.json").exists()
