"""The sharded stream: exactly once across ranks x workers, resume by keys, bad data, remote stores."""

from __future__ import annotations

import dataclasses
import functools
import http.server
import io
import logging
import multiprocessing
import os
import socket
import threading

import numpy as np
import pytest
import torch

from data_pipeline import shard_io
from data_pipeline.config import DataConfig
from data_pipeline.shard_reader import CorruptShard, parse_shard, read_npy_header
from data_pipeline.shards import DataError, ShardWriter, read_manifest, write_array_shards
from data_pipeline.stream import ShardStream, StreamPosition, decode_samples, manifest_from_urls, read_split


def make_images(out: str, n: int = 512, shards: int = 8, shape=(1, 8, 8)) -> np.ndarray:
    x = np.random.default_rng(0).integers(0, 256, size=(n, *shape), dtype=np.uint8)
    write_array_shards(out, "img", "train", x, np.arange(n) % 10, shards)
    return x


def epoch_keys(manifest, world=2, workers=2, batch=16, position=None, seed=0, chunk=None, kind="thread"):
    """Keys per batch, rank after rank."""
    out = []
    for rank in range(world):
        stream = ShardStream(
            manifest, rank, world, batch, workers, shuffle_buffer=64, seed=seed, chunk_batches=chunk, worker_type=kind
        )
        out += [b["key"].tolist() for b in stream.epoch_batches(position or StreamPosition())]
    return out


def test_uint8_decodes_to_minus_one_one_and_keys_match_samples(tmp_path):
    x = make_images(str(tmp_path), n=64, shards=2)
    stream = ShardStream(read_manifest(str(tmp_path)), 0, 1, 8, 0, shuffle_buffer=32)
    batch = next(stream.epoch_batches(StreamPosition()))
    assert batch["x"].dtype == torch.uint8 and batch["x"].shape == (8, 1, 8, 8)  # as stored
    idx = [int(k) for k in batch["key"]]
    np.testing.assert_array_equal(batch["x"].numpy(), x[idx])
    decoded = decode_samples(batch["x"], "uint8")
    np.testing.assert_allclose(decoded.numpy(), x[idx].astype(np.float32) / 127.5 - 1, atol=1e-6)
    assert batch["label"].tolist() == [i % 10 for i in idx]


@pytest.mark.parametrize("kind", ["thread", "process"])
@pytest.mark.parametrize("chunk", [None, 3])  # one chunk per worker; chunks that straddle shards
def test_exactly_once_two_ranks_two_workers(tmp_path, chunk, kind):
    make_images(str(tmp_path))  # 8 shards x 64 samples, batch 16: nothing dropped
    m = read_manifest(str(tmp_path))
    batches = epoch_keys(m, chunk=chunk, kind=kind)
    keys = [k for b in batches for k in b]
    assert len(keys) == 512 and len(set(keys)) == 512
    assert len(batches) == 2 * ShardStream(m, 0, 2, 16, 2).batches_per_epoch(0)
    # (seed, epoch) set the order, whatever the kind of worker: the same again, another epoch differs
    assert epoch_keys(m, chunk=chunk, kind="process" if kind == "thread" else "thread") == batches
    assert epoch_keys(m, position=StreamPosition(epoch=1), chunk=chunk, kind=kind) != batches


def test_ranks_get_equal_batch_counts_with_uneven_shards(tmp_path):
    make_images(str(tmp_path), n=500, shards=5)  # shards of 100: 3 go to rank 0, 2 to rank 1
    m = read_manifest(str(tmp_path))
    per_rank = [sum(1 for _ in ShardStream(m, r, 2, 16, 1, seed=0).epoch_batches(StreamPosition())) for r in range(2)]
    assert per_rank[0] == per_rank[1] == ShardStream(m, 0, 2, 16, 1).batches_per_epoch(0)


def test_each_epoch_deals_the_shards_to_the_ranks_anew(tmp_path):
    # The shard list is shuffled with (seed, epoch): a rank does not see the same samples every epoch
    # (with a small shuffle buffer its batches would otherwise mix the same few shards each time).
    make_images(str(tmp_path))
    m = read_manifest(str(tmp_path))

    def rank_zero_keys(epoch):
        stream = ShardStream(m, 0, 2, 16, 1, shuffle_buffer=64, seed=0)
        return frozenset(k for b in stream.epoch_batches(StreamPosition(epoch=epoch)) for k in b["key"].tolist())

    seen = [rank_zero_keys(epoch) for epoch in range(4)]
    assert all(len(keys) == 256 for keys in seen)
    assert len(set(seen)) > 1


@pytest.mark.parametrize(("chunk", "kind"), [(None, "thread"), (3, "thread"), (3, "process")])
@pytest.mark.parametrize("done", [0, 1, 5, 6, 7, 13])
def test_resume_neither_repeats_nor_skips(tmp_path, done, chunk, kind):
    make_images(str(tmp_path))
    m = read_manifest(str(tmp_path))
    stream = ShardStream(m, 1, 2, 16, 2, shuffle_buffer=64, seed=3, chunk_batches=chunk, worker_type=kind)
    full = [b["key"].tolist() for b in stream.epoch_batches(StreamPosition())]
    position = StreamPosition()
    position.load_state_dict(StreamPosition(0, done).state_dict())  # as through a checkpoint
    rest = [b["key"].tolist() for b in stream.epoch_batches(position)]
    assert len(full) == 16 and full[:done] + rest == full


def test_truncated_and_corrupt_shards_are_skipped_and_counted(tmp_path, caplog):
    make_images(str(tmp_path))
    m = read_manifest(str(tmp_path))
    truncated, garbled = m.shard_urls()[2], m.shard_urls()[5]
    with open(truncated, "r+b") as f:
        f.truncate(os.path.getsize(truncated) // 2)
    with open(garbled, "r+b") as f:  # same size, headers overwritten
        f.seek(1500)
        f.write(os.urandom(3000))
    with caplog.at_level(logging.WARNING):
        m = read_manifest(str(tmp_path))  # a few bad shards: start-up warns, does not fail
        assert truncated in caplog.text
        corrupt, keys = 0, []
        for rank in range(2):
            for b in ShardStream(m, rank, 2, 16, 0, shuffle_buffer=64).epoch_batches(StreamPosition()):
                corrupt += b["corrupt_shards"]
                keys += b["key"].tolist()
    assert corrupt == 2
    assert garbled in caplog.text
    assert len(keys) == len(set(keys)) == 6 * 64  # every other shard is read in full
    bad = {int(k) // 64 for k in keys}
    assert bad == {0, 1, 2, 3, 4, 5, 6, 7} - {2, 5}
    # Read whole (a test split, a tool's --data), a set cannot spare one: said without "skipped".
    with pytest.raises(DataError, match=f"shard {truncated} is unreadable .* has no shard to spare, unlike training"):
        read_split(m)


def test_corrupt_last_shard_is_counted_and_loses_no_other_sample(tmp_path):
    make_images(str(tmp_path))
    m = read_manifest(str(tmp_path))
    stream = ShardStream(m, 0, 1, 16, 1, shuffle_buffer=64)
    last = stream._assignment(0, 0)[0][-1]  # the worker's last shard this epoch
    with open(m.shard_urls()[last], "r+b") as f:
        f.truncate(1000)
    m = read_manifest(str(tmp_path))
    batches = list(ShardStream(m, 0, 1, 16, 1, shuffle_buffer=64).epoch_batches(StreamPosition()))
    keys = [k for b in batches for k in b["key"].tolist()]
    assert sum(b["corrupt_shards"] for b in batches) == 1
    # the shuffle pool still held samples when the corrupt shard came: they are not dropped
    assert sorted({int(k) // 64 for k in keys}) == sorted(set(range(8)) - {last}) and len(keys) == 7 * 64


def test_missing_manifest_or_shard_fails_at_start_up(tmp_path):
    with pytest.raises(DataError, match="no manifest"):
        read_manifest(str(tmp_path / "nowhere"))
    make_images(str(tmp_path))
    os.remove(tmp_path / "img-train-000003.tar")
    with pytest.raises(DataError, match="missing shard.*img-train-000003.tar"):
        read_manifest(str(tmp_path))


def test_manifest_of_other_shards_fails_clearly(tmp_path):
    make_images(str(tmp_path / "a"), n=512)
    make_images(str(tmp_path / "b"), n=256)
    os.replace(tmp_path / "b" / "manifest.json", tmp_path / "a" / "manifest.json")
    with pytest.raises(DataError, match="does not match its shards"):
        read_manifest(str(tmp_path / "a"))
    # 60 instead of 64 samples per shard: tar padding gives the same byte size, the count differs
    make_images(str(tmp_path / "c"), n=480)
    make_images(str(tmp_path / "d"), n=512)
    os.replace(tmp_path / "c" / "manifest.json", tmp_path / "d" / "manifest.json")
    m = read_manifest(str(tmp_path / "d"))
    with pytest.raises(DataError, match=r"8 of its 8 shard\(s\) were unreadable.*64 samples, the manifest says 60"):
        next(ShardStream(m, 0, 1, 16, 0).epoch_batches(StreamPosition()))


@pytest.mark.parametrize(("workers", "kind"), [(0, "thread"), (2, "thread"), (2, "process")])
def test_samples_of_another_shape_than_the_manifest_fail(tmp_path, workers, kind):
    make_images(str(tmp_path))
    m = read_manifest(str(tmp_path))
    m.sample_shape = [3, 8, 8]
    with pytest.raises(DataError, match="shape") as caught:  # raised in a worker, reaches the consumer
        next(ShardStream(m, 0, 1, 16, workers, worker_type=kind).epoch_batches(StreamPosition()))
    # As the worker said it: from a process, the DataLoader's re-raise put its traceback in the message.
    assert "Traceback" not in str(caught.value) and "DataLoader worker" not in str(caught.value)
    # The failed epoch's worker processes are gone now, not whenever the collector breaks the
    # error's reference cycle: that shutdown (seconds of joins) once ran on another epoch's reader.
    assert multiprocessing.active_children() == []


@pytest.mark.slow
def test_leaving_an_epoch_early_stops_the_reader_threads(tmp_path):
    make_images(str(tmp_path))
    stream = ShardStream(read_manifest(str(tmp_path)), 0, 1, 16, 2, chunk_batches=1)

    def readers() -> int:
        return sum(t.name.startswith("shard-reader-") for t in threading.enumerate())

    batches = stream.epoch_batches(StreamPosition())
    next(batches)
    assert readers() == 2
    batches.close()  # as when a run stops mid-epoch
    assert readers() == 0


def test_fast_parser_matches_tarfile_on_writer_output(tmp_path):
    x = np.random.default_rng(1).normal(size=(40, 5)).astype(np.float32)
    labels = np.array([-1, 7, 12345] * 13 + [0])
    w = ShardWriter(str(tmp_path / "slow"), "t", "train", 40)
    for a, y in zip(x, labels, strict=True):
        w.write(a, int(y))
    w.finish()
    m = write_array_shards(str(tmp_path / "fast"), "t", "train", x, labels, 1)
    data = (tmp_path / "fast" / m.shards[0].url).read_bytes()
    assert data == (tmp_path / "slow" / m.shards[0].url).read_bytes()
    parsed = parse_shard(data)
    assert parsed.keys[3] == "000000003" and parsed.labels.tolist() == labels.tolist()
    np.testing.assert_array_equal(parsed.x, x)


@pytest.mark.parametrize("n, asked, sizes", [(10, 6, [2, 2, 2, 2, 1, 1]), (12, 4, [3] * 4), (3, 5, [1, 1, 1])])
def test_array_shards_are_as_many_as_asked_and_near_equal(tmp_path, n, asked, sizes):
    m = write_array_shards(str(tmp_path), "t", "train", np.arange(n, dtype=np.float32)[:, None], np.arange(n), asked)
    assert [s.num_samples for s in m.shards] == sizes
    parsed = [parse_shard((tmp_path / s.url).read_bytes()) for s in m.shards]
    assert np.concatenate([p.x[:, 0] for p in parsed]).tolist() == list(range(n))  # each sample once, in order


def test_fast_parser_rejects_a_header_tarfile_rejects(tmp_path):
    m = write_array_shards(str(tmp_path), "t", "train", np.zeros((4, 3), np.uint8), np.arange(4), 1)
    data = bytearray((tmp_path / m.shards[0].url).read_bytes())
    header = 2 * 4 * 512  # the third sample's .cls header: a sample is 4 blocks (2 headers, 2 data)
    data[header + 135] = ord("1")  # the size field's terminator becomes a 12th digit
    data[header + 148 : header + 156] = b"        "
    data[header + 148 : header + 155] = b"%06o\0" % sum(data[header : header + 512])
    with pytest.raises(CorruptShard):
        parse_shard(bytes(data))


def test_local_shards_are_read_whole_despite_short_reads(tmp_path, monkeypatch):
    x = make_images(str(tmp_path), n=64, shards=2)
    real_open = open

    class ShortReads:  # as a network filesystem, or read(2) of a file over 2 GiB
        def __init__(self, *args, **kwargs):
            self.f = real_open(*args, **kwargs)

        def readinto(self, view):
            return self.f.readinto(view[:1000])

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(shard_io, "open", ShortReads, raising=False)
    batches = list(ShardStream(read_manifest(str(tmp_path)), 0, 1, 8, 0).epoch_batches(StreamPosition()))
    assert sum(b["corrupt_shards"] for b in batches) == 0
    keys = [int(k) for b in batches for k in b["key"]]
    assert sorted(keys) == list(range(64))
    np.testing.assert_array_equal(np.concatenate([b["x"].numpy() for b in batches]), x[keys])


def test_brace_pattern(tmp_path):
    make_images(str(tmp_path))
    m = manifest_from_urls(str(tmp_path / "img-train-{000000..000007}.tar"))
    assert m.num_samples == 512 and m.sample_shape == [1, 8, 8] and m.dtype == "uint8"
    assert len({k for b in epoch_keys(m) for k in b}) == 512


# -- real remote stores --------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_http_store(tmp_path):
    make_images(str(tmp_path))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        m = read_manifest(url)
        keys = [k for b in epoch_keys(m) for k in b]
        assert len(keys) == len(set(keys)) == 512
        with pytest.raises(DataError, match="no manifest"):
            read_manifest(url + "/missing")
    finally:
        server.shutdown()
        server.server_close()
    # The server gone: it was "no manifest at ...: write the data set there first".
    with pytest.raises(DataError, match=f"cannot reach {url}/manifest.json: .*check the address, and that its server"):
        read_manifest(url)


@pytest.mark.slow
def test_s3_store_via_moto_server(tmp_path, monkeypatch):
    pytest.importorskip("s3fs", reason="s3:// needs s3fs (the dev extra)")
    moto_server = pytest.importorskip("moto.server", reason="needs moto[server] (the dev extra)")
    import fsspec

    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        for k, v in {
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
        }.items():
            monkeypatch.setenv(k, v)
        monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": f"http://127.0.0.1:{port}"})
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        fs.mkdir("meg-data")
        make_images("s3://meg-data/img")  # the writer uploads each finished shard
        assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls("meg-data/img"))[-1] == "manifest.json"
        m = read_manifest("s3://meg-data/img")
        keys = [k for b in epoch_keys(m) for k in b]
        assert len(keys) == len(set(keys)) == 512
        fs.rm("meg-data/img/img-train-000004.tar")
        fs.invalidate_cache()
        with pytest.raises(DataError, match="missing shard"):
            read_manifest("s3://meg-data/img")
    finally:
        server.stop()


@pytest.mark.parametrize(
    "array",
    [np.zeros((3, 8, 8), np.uint8), np.zeros(5, np.float32), np.zeros((), np.int64), np.zeros((2, 3), ">f8"),
     np.asfortranarray(np.zeros((4, 4), np.uint8)), np.zeros(2, dtype=[("a", "<i4")])],
)  # fmt: skip
def test_npy_headers_are_read_as_numpy_reads_them(array):
    # Read without ast where numpy's own format allows (threads parsing with ast can fail spuriously).
    raw = io.BytesIO()
    np.save(raw, array)
    ours, theirs = io.BytesIO(raw.getvalue()), io.BytesIO(raw.getvalue())
    np.lib.format.read_magic(theirs)
    assert read_npy_header(ours) == np.lib.format.read_array_header_1_0(theirs) and ours.tell() == theirs.tell()


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_reading_the_next_epoch_ahead_gives_the_same_batches_and_close_stops_it(tmp_path, kind):
    make_images(str(tmp_path))
    manifest = read_manifest(str(tmp_path))

    def keys(read_ahead: bool) -> list[list[str]]:
        stream = ShardStream(manifest, 0, 1, 16, 2, shuffle_buffer=64, chunk_batches=2, worker_type=kind,
                             read_ahead=read_ahead)  # fmt: skip
        out = []
        try:
            for epoch in range(3):
                out.append([k for b in stream.epoch_batches(StreamPosition(epoch, 0)) for k in b["key"].tolist()])
                if read_ahead and epoch < 2:
                    assert (
                        stream._opened is not None and stream._opened[0] == epoch + 1
                    )  # opened before it was asked for
            # Resuming mid-epoch does not use readers opened for an epoch's start.
            out.append([k for b in stream.epoch_batches(StreamPosition(1, 5)) for k in b["key"].tolist()])
        finally:
            stream.close()
        return out

    assert keys(True) == keys(False)
    assert not any(t.name.startswith("shard-reader-") for t in threading.enumerate())
    assert multiprocessing.active_children() == []


@pytest.mark.parametrize("workers, kind", [(0, "thread"), (2, "thread"), (1, "process")])
def test_pinned_chunks_are_pinned_where_they_are_read(tmp_path, workers, kind):
    # A CUDA trainer passes Tensor.pin_memory: every batch must be a view of a pinned chunk (so its
    # copy to the device is asynchronous), pinned by the reader threads when there are workers, not
    # on the trainer's thread. A CPU cannot pin, so a stand-in records what it was given.
    x = make_images(str(tmp_path), n=256, shards=4)
    pinned: list[tuple[torch.Tensor, str]] = []

    def pin(t: torch.Tensor) -> torch.Tensor:
        copy = t.clone()
        pinned.append((copy, threading.current_thread().name))
        return copy

    stream = ShardStream(read_manifest(str(tmp_path)), 0, 1, 16, workers, shuffle_buffer=32, worker_type=kind, pin=pin)
    batches = list(stream.epoch_batches(StreamPosition()))
    assert len(batches) == 16 and pinned
    storages = {t.untyped_storage().data_ptr() for t, _ in pinned}
    for b in batches:
        assert b["x"].untyped_storage().data_ptr() in storages
        np.testing.assert_array_equal(b["x"].numpy(), x[[int(k) for k in b["key"]]])
    threads = {name for _, name in pinned}
    assert threads == (
        {threading.current_thread().name}
        if workers == 0
        else {f"shard-reader-{w}" for w in range(1 if kind == "process" else workers)}
    )


def test_open_dataset_writes_a_toy_set_once_and_streams_it_split_over_ranks(tmp_path):
    import data_pipeline

    cfg = DataConfig(url=str(tmp_path / "toy"), toy="25gaussians", toy_num_samples=1024, toy_num_shards=4,
                     batch_size=64, num_workers=1)  # fmt: skip
    data_pipeline.write_toy_data(cfg, seed=0)
    manifest = tmp_path / "toy" / "manifest.json"
    written = manifest.stat().st_mtime_ns
    data_pipeline.write_toy_data(cfg, seed=1)  # there already: not written again
    assert manifest.stat().st_mtime_ns == written
    dataset = data_pipeline.open_dataset(cfg)
    assert dataset.location == str(manifest) and dataset.describe() == f"{manifest} (1024 samples, 4 shards)"
    keys = []
    for rank in range(2):
        batches = list(dataset.stream(rank, 2, seed=0, read_ahead=False).epoch_batches(StreamPosition()))
        assert {len(b["x"]) for b in batches} == {32}  # data.batch_size split over the ranks
        keys += [k for b in batches for k in b["key"].tolist()]
    assert len(keys) == len(set(keys)) == 1024


def test_a_stopped_toy_write_is_written_again_by_the_next_run_and_a_write_under_way_is_left_alone(tmp_path, caplog):
    # Ctrl-C while a large toy set was written: the writer went on until the watchdog ended it, and the
    # next run refused the folder ("holds files but no manifest.json ... Point data.url at an empty or new
    # folder"), the user's to find and delete.
    import fcntl

    import data_pipeline
    from data_pipeline import storage
    from data_pipeline.dataset import WRITING_LOCK

    folder = tmp_path / "toy"
    cfg = DataConfig(url=str(folder), toy="25gaussians", toy_num_samples=512, toy_num_shards=4)
    saved = storage.IOPolicy(**vars(storage.policy()))
    stop = threading.Event()
    storage.configure(stop=stop)
    try:
        stop.set()  # the trainer's stop signal, before the first shard
        with pytest.raises(storage.StopRequested, match=f"^{folder} has no manifest yet$"):
            data_pipeline.write_toy_data(cfg, seed=0)
    finally:
        for key, value in vars(saved).items():
            setattr(storage.policy(), key, value)
    assert not (folder / "manifest.json").exists() and not list(folder.glob("*.tar"))
    data_pipeline.write_toy_data(cfg, seed=0)
    (folder / "manifest.json").unlink()  # as a write stopped after its shards leaves them
    (folder / "tmpq8x_1zk2.tar.partial").write_bytes(b"half a shard")
    with caplog.at_level(logging.WARNING, logger="data_pipeline.dataset"):
        data_pipeline.write_toy_data(cfg, seed=0)
    assert "holds 5 file(s) of a 25gaussians write that was interrupted: writing it again" in caplog.text
    assert sorted(p.name for p in folder.iterdir()) == [f"25gaussians-train-00000{i}.tar" for i in range(4)] + [
        "manifest.json"
    ]
    assert data_pipeline.open_dataset(cfg).manifest.num_samples == 512
    (folder / "manifest.json").unlink()
    (folder / "notes.txt").write_text("mine")  # not the writer's: the user's to sort out
    with pytest.raises(DataError, match="holds files but no manifest.json: not writing 25gaussians shards over them"):
        data_pipeline.write_toy_data(cfg, seed=0)
    other = DataConfig(url=str(tmp_path / "busy"), toy="25gaussians", toy_num_samples=512, toy_num_shards=4)
    (tmp_path / "busy").mkdir()
    with open(tmp_path / "busy" / WRITING_LOCK, "a") as held:  # another job writing it now
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(DataError, match="is being written by another process now: rerun once it has finished"):
            data_pipeline.write_toy_data(other, seed=0)
    data_pipeline.write_toy_data(other, seed=0)
    assert not (tmp_path / "busy" / WRITING_LOCK).exists()


def test_toy_data_written_with_other_settings_is_refused_naming_each_difference(tmp_path):
    """Were ignored: the run trained on whatever data.url held (25 Gaussians for data.toy=8gaussians)."""
    import data_pipeline

    folder = tmp_path / "toy"
    written = DataConfig(url=str(folder), toy="25gaussians", toy_std=0.01768, toy_num_samples=256, toy_num_shards=2)
    data_pipeline.write_toy_data(written, seed=0)
    # The same data: its published std given as 0 or rounded as the presets do, and another train.seed.
    for same in (written, dataclasses.replace(written, toy_std=0.0)):
        data_pipeline.write_toy_data(same, seed=1)
        assert data_pipeline.open_dataset(same).manifest.num_samples == 256
    asked = dataclasses.replace(written, toy="8gaussians", toy_std=0.3, toy_num_samples=512, toy_num_shards=4)
    data_pipeline.write_toy_data(asked, seed=0)  # there already: left as it is
    with pytest.raises(DataError) as caught:
        data_pipeline.open_dataset(asked)
    assert str(caught.value) == (
        f"data.url={folder} holds data written with other settings than this run's: data.toy=8gaussians (the data: "
        "25gaussians); data.toy_std=0.3 (the data: 0.01768); data.toy_num_samples=512 (the data: 256); "
        f"data.toy_num_shards=4 (the data: 2). Give a new data.url to have the run's data written there, or delete "
        f"{folder} to have it rewritten (or give the data's values to train on it as it is)"
    )
    wide = dataclasses.replace(written, url=str(tmp_path / "wide"), toy_std=0.3)
    data_pipeline.write_toy_data(wide, seed=0)
    with pytest.raises(
        DataError, match=r"this run's: data.toy_std=0, the published 0.0176803 \(the data: 0.3\)\. Give"
    ):
        data_pipeline.open_dataset(dataclasses.replace(wide, toy_std=0.0))
    # Another data set asked for with its own std (0): the std is its, not a difference of its own.
    with pytest.raises(DataError, match=r"this run's: data.toy=8gaussians \(the data: 25gaussians\)\. Give"):
        data_pipeline.open_dataset(dataclasses.replace(written, toy="8gaussians", toy_std=0.0))
    assert (folder / "manifest.json").exists()  # refused, never rewritten


def test_toy_settings_are_checked_against_what_a_manifest_without_their_record_shows(tmp_path):
    """Data that data.toy did not write (another tool's, named like a toy set) records no std: its name
    and counts are still compared, its std cannot be."""
    import data_pipeline

    points = np.zeros((64, 2), np.float32)
    write_array_shards(str(tmp_path / "own"), "25gaussians", "train", points, np.zeros(64, np.int64), 2)
    own = DataConfig(url=str(tmp_path / "own"), toy="25gaussians", toy_std=0.3, toy_num_samples=64, toy_num_shards=2)
    assert data_pipeline.open_dataset(own).manifest.num_samples == 64
    with pytest.raises(DataError, match=r"this run's: data.toy_num_samples=65 \(the data: 64\)\. Give"):
        data_pipeline.open_dataset(dataclasses.replace(own, toy_num_samples=65))
    # data.toy unset: the data is taken as it is.
    assert data_pipeline.open_dataset(dataclasses.replace(own, toy="", toy_num_samples=65)).manifest.num_samples == 64


def test_open_dataset_names_the_command_that_writes_a_presets_missing_data(tmp_path):
    import data_pipeline

    cfg = DataConfig(url=str(tmp_path / "missing"), prepare="python -m data_pipeline.convert kdd --out data/kdd99")
    with pytest.raises(DataError, match="this preset's data is written by: python -m data_pipeline.convert kdd"):
        data_pipeline.open_dataset(cfg)
