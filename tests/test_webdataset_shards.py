"""WebDataset shards as other tools write them: read through the stream, indexed, converted, damaged.

Shards here are written by webdataset's own ShardWriter: PNG + cls, JPEG, npy, unlabelled, .tar.gz;
read through a brace pattern, a ``pipe:cat`` URL and ``memory://``.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import fsspec
import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data_pipeline import convert
from data_pipeline.cli import run_tool
from data_pipeline.config import DataConfig
from data_pipeline.decode import DecodeSpec
from data_pipeline.shards import ALLOW_COMMANDS_ENV, DataError, read_manifest
from data_pipeline.stream import ShardStream, StreamPosition, open_data
from tests.conftest import REPO_ROOT, run_trainer, subprocess_env, tiny_overrides

N, PER_SHARD = 96, 16  # 6 shards


def _png(a: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format=fmt)
    return buf.getvalue()


def write_shards(folder, kind: str = "png", n: int = N, gz: bool = False) -> np.ndarray:
    """``n`` samples by webdataset.ShardWriter; returns the images (n, 8, 8, 3) uint8."""
    os.makedirs(folder, exist_ok=True)
    images = np.random.default_rng(0).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    pattern = os.path.join(folder, "part-%06d.tar" + (".gz" if gz else ""))
    with contextlib.redirect_stdout(io.StringIO()), wds.ShardWriter(pattern, maxcount=PER_SHARD) as sink:
        for i, image in enumerate(images):
            sample = {"__key__": f"s{i:05d}"}
            if kind == "png":
                sample.update(png=_png(image), cls=i % 10)
            elif kind == "jpg":
                sample.update(jpg=_png(image, "JPEG"), cls=i % 10)
            elif kind == "jpeg_json":  # the label in a JSON member, as many exporters write it
                sample.update(jpeg=_png(image, "JPEG"), json={"label": i % 10, "meta": {"class": str(i % 10)}})
            elif kind == "npy":
                sample.update(npy=image.transpose(2, 0, 1).astype(np.float32), cls=i % 10)
            elif kind == "unlabelled":
                sample.update(png=_png(image))
            elif kind == "png_gif":  # a member the default decode settings do not read, in every other sample
                sample.update(**({"png": _png(image)} if i % 2 else {"gif": _png(image, "GIF")}), cls=i % 10)
            elif kind == "txt":  # not an image data set at all
                sample.update(txt="hello")
            sink.write(sample)
    return images


def _pattern(folder, gz: bool = False) -> str:
    return os.path.join(folder, "part-{000000..000005}.tar" + (".gz" if gz else ""))


def _epoch(manifest, world: int = 2, workers: int = 2, batch: int = 8) -> list[dict]:
    batches = []
    for rank in range(world):
        stream = ShardStream(manifest, rank, world, batch, workers, shuffle_buffer=32, seed=0)
        batches += list(stream.epoch_batches(StreamPosition()))
    return batches


@pytest.mark.parametrize("kind, gz", [("png", False), ("jpg", False), ("npy", False), ("unlabelled", False),
                                      ("png", True)])  # fmt: skip
def test_shards_written_by_webdataset_train_exactly_once(tmp_path, kind, gz):
    images = write_shards(tmp_path, kind, gz=gz)
    spec = DecodeSpec(label_key="" if kind == "unlabelled" else "cls")
    manifest = open_data(_pattern(tmp_path, gz), spec)
    expected_shape = [3, 8, 8]
    assert manifest.layout == "webdataset" and manifest.num_samples == N and manifest.sample_shape == expected_shape
    assert manifest.dtype == ("float32" if kind == "npy" else "uint8")
    batches = _epoch(manifest)
    keys = [k for b in batches for k in b["key"].tolist()]
    assert sorted(keys) == [f"s{i:05d}" for i in range(N)]  # every sample once across 2 ranks x 2 workers
    labels = {k: int(label) for b in batches for k, label in zip(b["key"].tolist(), b["label"])}
    assert all(labels[f"s{i:05d}"] == (-1 if kind == "unlabelled" else i % 10) for i in range(N))
    first = batches[0]
    index = int(first["key"][0][1:])
    x = first["x"][0].numpy()
    if kind in ("png", "unlabelled"):
        assert np.array_equal(x, images[index].transpose(2, 0, 1))  # lossless: the very pixels
    elif kind == "npy":
        assert np.array_equal(x, images[index].transpose(2, 0, 1).astype(np.float32))


def test_grayscale_resized_images_and_a_single_tar(tmp_path):
    write_shards(tmp_path, "png")
    manifest = open_data(str(tmp_path / "part-000000.tar"), DecodeSpec(image_mode="l", image_size=4))
    assert manifest.sample_shape == [1, 4, 4] and manifest.num_samples == PER_SHARD


def test_pipe_and_memory_urls(tmp_path, monkeypatch):
    write_shards(tmp_path, "png")
    monkeypatch.setenv(ALLOW_COMMANDS_ENV, "1")  # what --allow-pipe does
    pipe = "::".join(f"pipe:cat {tmp_path}/part-{i:06d}.tar" for i in range(6))
    assert open_data(pipe, DecodeSpec()).num_samples == N
    fs = fsspec.filesystem("memory")
    for i in range(6):
        fs.pipe(f"/wds-test/part-{i:06d}.tar", (tmp_path / f"part-{i:06d}.tar").read_bytes())
    manifest = open_data("memory://wds-test/part-{000000..000005}.tar", DecodeSpec())
    assert sorted(k for b in _epoch(manifest) for k in b["key"].tolist()) == [f"s{i:05d}" for i in range(N)]


def test_index_then_exactly_once_and_resume(tmp_path):
    write_shards(tmp_path / "shards", "png")
    code = convert.main(["index", "--shards", _pattern(tmp_path / "shards"), "--out", str(tmp_path / "index")])
    assert code == 0
    manifest = read_manifest(str(tmp_path / "index"))  # absolute shard paths: the manifest may live anywhere
    stream = ShardStream(manifest, 1, 2, 8, 2, shuffle_buffer=32, seed=3, chunk_batches=1)
    full = [b["key"].tolist() for b in stream.epoch_batches(StreamPosition())]
    rest = [b["key"].tolist() for b in stream.epoch_batches(StreamPosition(0, 2))]
    assert len(full) == 6 and full[:2] + rest == full


def test_samples_without_the_image_member_are_left_out_with_a_warning_naming_the_fix(tmp_path):
    write_shards(tmp_path / "shards", "png_gif")
    argv = ["index", "--shards", _pattern(tmp_path / "shards")]
    result = subprocess.run(
        [sys.executable, "-m", "data_pipeline.convert", *argv, "--out", str(tmp_path / "half")],
        cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr == (
        f"warning: {N // 2} samples of the shards are left out, as they have no .png / .jpg / .jpeg / .webp / .npy "
        f"member ({N // 2} with .cls .gif): set data.image_key (meg-convert: --image-key) to the member that holds "
        "their image, e.g. data.image_key='png;gif'\n"
    )
    assert read_manifest(str(tmp_path / "half")).num_samples == N // 2
    with contextlib.redirect_stdout(io.StringIO()):
        assert convert.main([*argv, "--image-key", "png;gif", "--out", str(tmp_path / "all")]) == 0
    assert read_manifest(str(tmp_path / "all")).num_samples == N


def test_a_tool_takes_a_quoted_leading_tilde_as_the_home_folder_as_data_url_does(tmp_path, monkeypatch):
    # index --shards '~/wds/part-{...}.tar' looked for ./~/wds (while --out '~/idx' went to $HOME/idx).
    monkeypatch.setenv("HOME", str(tmp_path))
    write_shards(tmp_path / "wds")
    argv = ["index", "--shards", "~/wds/part-{000000..000005}.tar", "--out", "~/idx"]
    assert convert.main(argv) == 0
    assert read_manifest(str(tmp_path / "idx")).num_samples == N


@pytest.mark.parametrize("source", ["index", "webdataset"])
def test_the_sample_bound_a_converter_names_is_one_of_its_flags(tmp_path, capsys, source):
    # It said "raise --max-sample-bytes" (data.max_sample_bytes, renamed to a flag), which neither took.
    write_shards(tmp_path / "wds")
    argv = [source, "--shards", _pattern(tmp_path / "wds"), "--max-sample-bytes", "100"]
    assert run_tool(lambda: convert.main([*argv, "--out", str(tmp_path / "small")]), debug=False) == 2
    err = capsys.readouterr().err
    assert "more than --max-sample-bytes=100 allows; raise --max-sample-bytes" in err, err
    argv[-1] = "1000000"
    assert convert.main([*argv, "--out", str(tmp_path / "large")]) == 0
    assert read_manifest(str(tmp_path / "large")).num_samples == N


def test_a_run_that_decodes_indexed_shards_otherwise_than_their_manifest_is_refused(tmp_path):
    # data.image_mode=l on an index made in RGB trained on 3-channel images, without a word.
    write_shards(tmp_path / "wds")
    assert convert.main(["index", "--shards", _pattern(tmp_path / "wds"), "--out", str(tmp_path / "idx")]) == 0
    assert open_data(str(tmp_path / "idx"), DecodeSpec()).sample_shape == [3, 8, 8]  # the run asks nothing else
    with pytest.raises(DataError) as refused:
        open_data(str(tmp_path / "idx"), DecodeSpec(image_mode="l", image_size=4))
    assert str(refused.value) == (
        f"data.image_mode='l', data.image_size=4, but the manifest at {tmp_path / 'idx'} decodes its shards with "
        "image_mode='rgb', image_size=0, as they were indexed: index them again with those settings (python -m "
        "data_pipeline.convert index ... --image-mode l --image-size 4), or drop the override"
    )
    argv = ["index", "--shards", _pattern(tmp_path / "wds"), "--image-mode", "l", "--image-size", "4"]
    assert convert.main([*argv, "--out", str(tmp_path / "idx_l")]) == 0
    assert open_data(str(tmp_path / "idx_l"), DecodeSpec(image_mode="l", image_size=4)).sample_shape == [1, 4, 4]


def test_a_percent_encoded_file_url_names_the_same_shards_to_every_reader(tmp_path):
    # pathlib's as_uri() writes a space as %20: the index succeeded (webdataset decoded it), then the run
    # found its 6 shards "missing", and given as data.url they had "disappeared since start-up".
    write_shards(tmp_path / "with space")
    pattern = (tmp_path / "with space").as_uri() + "/part-{000000..000005}.tar"
    assert "%20" in pattern
    assert convert.main(["index", "--shards", pattern, "--out", str(tmp_path / "idx")]) == 0
    for url in (str(tmp_path / "idx"), pattern):
        assert len({k for b in _epoch(open_data(url, DecodeSpec())) for k in b["key"]}) == N


def test_converter_writes_the_same_samples_into_the_fast_layout(tmp_path):
    images = write_shards(tmp_path / "shards", "png")
    out = tmp_path / "fast"
    with contextlib.redirect_stdout(io.StringIO()):
        code = convert.main(["webdataset", "--shards", _pattern(tmp_path / "shards"), "--out", str(out),
                             "--num-shards", "4"])  # fmt: skip
    assert code == 0
    manifest = read_manifest(str(out))
    assert manifest.layout == "meg" and manifest.num_samples == N
    batches = _epoch(manifest)
    for b in batches:
        for key, x in zip(b["key"].tolist(), b["x"].numpy()):
            assert np.array_equal(x, images[int(key[1:])].transpose(2, 0, 1))


def test_a_wrong_layout_is_a_clear_error_naming_what_was_expected(tmp_path):
    write_shards(tmp_path, "txt")
    with pytest.raises(DataError, match=r"no sample has the expected member: expected samples with a \.png") as e:
        open_data(_pattern(tmp_path), DecodeSpec())
    assert "the shard holds .txt" in str(e.value) and "data.image_key" in str(e.value)


@pytest.mark.parametrize("label_key", ["json:label", "json:meta.class"])
def test_labels_in_a_json_member(tmp_path, label_key):
    write_shards(tmp_path, "jpeg_json")
    manifest = open_data(_pattern(tmp_path), DecodeSpec(label_key=label_key))
    labels = {k: int(label) for b in _epoch(manifest) for k, label in zip(b["key"].tolist(), b["label"])}
    assert labels == {f"s{i:05d}": i % 10 for i in range(N)}


@pytest.mark.parametrize(
    "label_key, message",
    [
        ("cls", r"has no \.cls member for its label \(it holds \.jpeg, \.json\); set data\.label_key"),
        ("json:class", r"\.json has no 'class' \(at the top level: \['label', 'meta'\]\); set data\.label_key"),
        ("json:meta.label", r"no 'meta\.label' \(at meta: \['class'\]\)"),
    ],
)
def test_a_label_that_is_not_where_the_key_says_names_what_the_sample_holds(tmp_path, label_key, message):
    write_shards(tmp_path, "jpeg_json", n=PER_SHARD)
    with pytest.raises(DataError, match=message):
        open_data(str(tmp_path / "part-000000.tar"), DecodeSpec(label_key=label_key))


def test_a_label_that_is_not_an_integer_is_a_clear_error(tmp_path):
    shard = tmp_path / "labels.tar"
    shard.write_bytes(_tar({"s0.png": _png(np.zeros((4, 4, 3), np.uint8)), "s0.cls": b"cat"}))
    with pytest.raises(DataError, match=r"s0'?'s \.cls label is 'cat', not an integer; set data\.label_key"):
        open_data(str(shard), DecodeSpec())


@pytest.mark.parametrize(
    "pixels", [np.arange(16, dtype=np.uint16).reshape(4, 4) * 4000, np.full((4, 4), 0.5, np.float32)]
)
def test_an_image_of_more_than_8_bits_a_channel_is_refused_not_clipped(tmp_path, pixels):
    # A 16-bit scan decoded to 0 and 255 only, a float image in 0..1 to all 0, without a word.
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="TIFF")
    (tmp_path / "wide.tar").write_bytes(_tar({"s0.tiff": buf.getvalue(), "s0.cls": b"1"}))
    mode = Image.open(io.BytesIO(buf.getvalue())).mode
    with pytest.raises(DataError, match=rf"sample 's0' is a {re.escape(mode)} image \(more than 8 bits a channel\)"):
        open_data(str(tmp_path / "wide.tar"), DecodeSpec(image_key="tiff", image_mode="l"))
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    Image.fromarray(pixels).save(tmp_path / "imgs" / "a" / "0.tif")
    with pytest.raises(DataError, match=rf"0\.tif is a {re.escape(mode)} image \(more than 8 bits a channel\)"):
        convert.convert_images(str(tmp_path / "o"), str(tmp_path / "imgs"), mode="L")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("label_key", ["txt:label", "json:", "json:a..b"])
def test_a_malformed_label_key_is_refused_with_the_config(label_key):
    with pytest.raises(ValueError, match=r"data\.label_key="):
        DataConfig(label_key=label_key)


# -- damage in place: skipped and counted, or a clear error; never a crash -------------------------


def _mutate_in_place(data: bytes, rng: np.random.Generator) -> bytes:
    """Same length: flipped bytes, a changed header field or member name, a zeroed run."""
    b = bytearray(data)
    op = int(rng.integers(0, 4))
    if op == 0:
        for _ in range(int(rng.integers(1, 16))):
            b[int(rng.integers(0, len(b)))] ^= 1 << int(rng.integers(0, 8))
    elif op == 1:  # a header's size or checksum field (tar headers sit at multiples of 512)
        header = 512 * int(rng.integers(0, len(b) // 512))
        field = header + (124 if rng.random() < 0.5 else 148)
        b[field : field + 8] = bytes(rng.integers(48, 56, 8, dtype=np.uint8))
    elif op == 2:  # a member renamed
        header = 512 * int(rng.integers(0, len(b) // 512))
        b[header : header + 8] = b"renamed_"
    else:  # a zeroed run
        at = int(rng.integers(0, len(b)))
        end = min(len(b), at + int(rng.integers(1, 2048)))
        b[at:end] = bytes(end - at)
    return bytes(b)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["meg", "webdataset"])
def test_a_shard_damaged_in_place_is_skipped_and_counted_and_the_rest_read_once(tmp_path, layout):
    if layout == "webdataset":  # indexed in place: the manifest names its shards relative to it
        write_shards(tmp_path / "clean", "png")
        code = convert.main(["index", "--shards", _pattern(tmp_path / "clean"), "--out", str(tmp_path / "clean")])
    else:
        write_shards(tmp_path / "wds", "png")
        with contextlib.redirect_stdout(io.StringIO()):
            code = convert.main(["webdataset", "--shards", _pattern(tmp_path / "wds"), "--out", str(tmp_path / "clean"),
                                 "--num-shards", "6"])  # fmt: skip
    assert code == 0
    rng = np.random.default_rng(0)
    skipped_cases = 0
    for case in range(120):
        folder = tmp_path / f"case{case}"
        shutil.copytree(tmp_path / "clean", folder)
        manifest = read_manifest(str(folder))
        victim = manifest.shard_urls()[int(rng.integers(0, 6))]
        assert victim.startswith(str(folder))
        with open(victim, "rb") as f:
            data = f.read()
        with open(victim, "wb") as f:
            f.write(_mutate_in_place(data, rng))
        batches = _epoch(read_manifest(str(folder)), world=1, workers=2, batch=8)  # never raises for one shard
        skipped = sum(int(b["corrupt_shards"]) for b in batches)
        keys = [k for b in batches for k in b["key"].tolist()]
        assert skipped in (0, 1) and len(set(keys)) == len(keys)
        assert len(keys) >= N - skipped * PER_SHARD - 8  # the other shards' samples, less a partial batch
        skipped_cases += skipped
        shutil.rmtree(folder)
    assert skipped_cases > 20  # the damage was real: most kinds of it make the shard unreadable


# -- the trainer on data it cannot read, and waiting for data --------------------------------------


@pytest.mark.slow
def test_a_data_set_of_unparseable_shards_stops_quickly_with_one_clear_error(tmp_path):
    write_shards(tmp_path / "good", "png")
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(6):
        (bad / f"part-{i:06d}.tar").write_bytes(os.urandom(4096))
    args = [o for o in tiny_overrides(tmp_path) if not o.startswith("data.")] + [
        "data.toy=",
        "data.batch_size=8",
        "eval.kind=samples",
    ]
    result = run_trainer([*args, f"data.url={_pattern(bad)}"], check=False)
    assert result.returncode == 2
    assert result.stderr.count("error:") == 1 and "unreadable" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_an_indexed_data_set_whose_shards_all_broke_stops_at_its_first_epoch(tmp_path):
    write_shards(tmp_path / "shards", "png")
    assert convert.main(["index", "--shards", _pattern(tmp_path / "shards"), "--out", str(tmp_path / "index")]) == 0
    for i in range(6):  # damaged in place after indexing: same sizes, garbage inside
        path = tmp_path / "shards" / f"part-{i:06d}.tar"
        path.write_bytes(bytes(len(path.read_bytes())))
    args = [o for o in tiny_overrides(tmp_path) if not o.startswith("data.")] + [
        "data.toy=",
        "data.batch_size=8",
        "eval.kind=samples",
    ]
    result = run_trainer([*args, f"data.url={tmp_path / 'index'}"], check=False)
    assert result.returncode == 2
    assert "gave rank 0 0 batch(es); 6 of its 6 shard(s) were unreadable" in result.stderr, result.stderr
    assert "The reader expects samples with a .png" in result.stderr
    assert result.stderr.count("skipping corrupt shard") <= 3 * 1 + 1  # named a few times, then counted


@pytest.mark.slow
@pytest.mark.parametrize("to_the_group", [False, True])  # Slurm signals every process of the step
def test_a_stop_request_while_waiting_for_data_checkpoints_and_exits_75(tmp_path, to_the_group):
    write_shards(tmp_path / "shards", "png")
    slow = "::".join(f"pipe:sleep 0 && cat {tmp_path}/shards/part-{i:06d}.tar" for i in range(6))
    assert convert.main(["index", "--allow-pipe", "--shards", slow, "--out", str(tmp_path / "index")]) == 0
    manifest = tmp_path / "index" / "manifest.json"
    manifest.write_text(manifest.read_text().replace("sleep 0", "sleep 60"))  # storage that hangs
    args = [o for o in tiny_overrides(tmp_path) if not o.startswith(("data.", "train.guard"))]
    cmd = [sys.executable, "trainer/main.py", "--config", "toy_25gaussians", "--allow-pipe", *args, "data.toy=",
           "data.batch_size=8", "eval.kind=samples", f"data.url={tmp_path / 'index'}"]  # fmt: skip
    # Output to a file: the shard commands inherit the trainer's descriptors and would hold a pipe open.
    log = open(tmp_path / "stderr.txt", "wb")  # noqa: SIM115 (closed below, after the process)
    proc = subprocess.Popen(
        cmd, cwd=REPO_ROOT, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=log, start_new_session=True
    )
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not (tmp_path / "run" / "checkpoints" / "step_00000000").exists():
            time.sleep(0.2)  # the step-0 checkpoint is written just before the loop starts to wait
        time.sleep(1)
        if to_the_group:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        err = (tmp_path / "stderr.txt").read_text()
        assert proc.returncode == 75, err[-2000:]
        assert "while waiting for data" in err  # within proc.wait's 30 s
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the sleeping shard commands
        log.close()


@pytest.mark.slow
def test_with_two_ranks_a_stop_while_one_waits_for_data_ends_every_rank(tmp_path):
    """Rank 1 has data and waits in the step's gradient reduction for rank 0, whose storage hangs: a
    stop must end both (no collective checkpoint can be met), promptly, not at a timeout."""
    from tests.conftest import accelerate_launcher

    write_shards(tmp_path / "shards", "png")
    urls = [f"pipe:cat {tmp_path}/shards/part-{i:06d}.tar" for i in range(6)]
    assert convert.main(["index", "--allow-pipe", "--shards", "::".join(urls), "--out", str(tmp_path / "index")]) == 0
    manifest = read_manifest(str(tmp_path / "index"))
    rank0 = ShardStream(manifest, 0, 2, 4, 1, seed=0)._assignment(0, 0)[0]  # train.seed=0, 1 worker per rank
    text = (tmp_path / "index" / "manifest.json").read_text()
    for i in rank0:
        text = text.replace(urls[i], urls[i].replace("pipe:", "pipe:sleep 120 && "))
    (tmp_path / "index" / "manifest.json").write_text(text)
    launcher, env = accelerate_launcher(2)
    args = [o for o in tiny_overrides(tmp_path) if not o.startswith("data.")]
    cmd = [*launcher, "trainer/main.py", "--config", "toy_25gaussians", "--allow-pipe", *args, "data.toy=",
           "data.batch_size=8", "data.num_workers=1", "train.seed=0", "eval.kind=samples",
           f"data.url={tmp_path / 'index'}"]  # fmt: skip
    log = open(tmp_path / "stderr.txt", "wb")  # noqa: SIM115 (closed below, after the processes)
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (tmp_path / "run" / "checkpoints" / "step_00000000").exists():
            time.sleep(0.2)
        time.sleep(3)  # rank 1 takes its batch and enters the step; rank 0 waits for its shard
        os.killpg(proc.pid, signal.SIGTERM)  # Slurm signals every process of the job step
        proc.wait(timeout=60)
        err = (tmp_path / "stderr.txt").read_text()
        assert proc.returncode != 0, err[-3000:]  # within proc.wait's 60 s
        assert "while waiting for data; the newest checkpoint stands" in err, err[-3000:]
        assert "another rank stopped while waiting for data" in err and "Traceback" not in err, err[-3000:]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def test_gzip_shards_are_recognised_by_content(tmp_path):
    write_shards(tmp_path, "png")
    raw = (tmp_path / "part-000000.tar").read_bytes()
    (tmp_path / "one.tar.gz").write_bytes(gzip.compress(raw))
    assert open_data(str(tmp_path / "one.tar.gz"), DecodeSpec()).num_samples == PER_SHARD


def _tar(members: dict[str, bytes]) -> bytes:
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("layout", ["webdataset", "meg"])
def test_a_gzip_member_above_the_bound_is_refused_before_it_is_decompressed(tmp_path, layout):
    big = bytes(8 << 20)  # 8 MiB of zeros: 8 KB of gzip
    name = "s00000.png" if layout == "webdataset" else "000000000.x.npy"
    shard = tmp_path / "bomb.tar.gz"
    shard.write_bytes(gzip.compress(_tar({name: big, name.split(".")[0] + ".cls": b"1"}), compresslevel=1))
    assert shard.stat().st_size < 100_000
    with pytest.raises(DataError) as err:
        open_data(str(shard), DecodeSpec(), max_sample_bytes=1 << 20)
    message = str(err.value)
    assert str(shard) in message and "data.max_sample_bytes=1048576" in message and "8388608 bytes" in message


def test_a_decoded_image_above_the_bound_is_refused_naming_the_shard(tmp_path):
    shard = tmp_path / "wide.tar"
    shard.write_bytes(_tar({"s0.png": _png(np.zeros((600, 600, 3), np.uint8)), "s0.cls": b"1"}))  # ~1 MB decoded
    with pytest.raises(DataError, match=r"wide.tar: sample 's0''s image \(600x600, decoded\) has 1080000 bytes"):
        open_data(str(shard), DecodeSpec(), max_sample_bytes=1 << 20)
    assert open_data(str(shard), DecodeSpec(), max_sample_bytes=2 << 20).num_samples == 1


def test_the_bound_follows_the_configuration():
    from trainer.config import load_config

    assert load_config("toy_25gaussians").data.sample_bytes_bound() == 256 << 20
    assert load_config("toy_25gaussians", ["data.image_size=8192"]).data.sample_bytes_bound() == 16 * 3 * 8192**2
    assert load_config("toy_25gaussians", ["data.max_sample_bytes=1000"]).data.sample_bytes_bound() == 1000


@pytest.mark.parametrize("fast", [True, False])
def test_a_label_too_long_for_64_bits_is_a_clear_error_naming_the_shard(tmp_path, fast):
    if fast:  # this project's layout: the uniform parser
        x = io.BytesIO()
        np.save(x, np.zeros(2, np.float32))
        members = {"000000000.x.npy": x.getvalue(), "000000000.cls": b"12345678901234567890123"}
    else:
        members = {"s0.png": _png(np.zeros((4, 4, 3), np.uint8)), "s0.cls": b"12345678901234567890123"}
    shard = tmp_path / "labels.tar"
    shard.write_bytes(_tar(members))
    with pytest.raises(DataError) as err:
        open_data(str(shard), DecodeSpec())
    assert str(shard) in str(err.value) and ("64 bits" in str(err.value) or "label" in str(err.value))


@pytest.mark.slow
def test_the_readmes_webdataset_row_trains_and_samples_as_written_with_json_labels(tmp_path):
    # The README's "train on WebDataset shards you have" command, run from a folder holding such
    # shards (JPEG images, labels in a JSON member), with a few steps; then the sample tool on the run.
    row = next(line for line in (REPO_ROOT / "README.md").read_text().splitlines() if "shards you have" in line)
    command = shlex.split(row.split("`")[1])
    assert command[:2] == ["python", "trainer/main.py"], command
    data = tmp_path / "data"
    data.mkdir()
    images = np.random.default_rng(0).integers(0, 256, (10 * 8, 28, 28, 3), dtype=np.uint8)
    with contextlib.redirect_stdout(io.StringIO()), wds.ShardWriter(str(data / "digits-%06d.tar"), maxcount=8) as sink:
        for i, image in enumerate(images):
            sink.write({"__key__": f"d{i:05d}", "jpeg": _png(image, "JPEG"), "json": {"label": i % 10}})
    run = tmp_path / "run"
    tiny = ["data.label_key=json:label", "data.batch_size=16", "data.num_workers=1", "train.steps=4",
            "log.every=2", "log.prometheus_port=-1", "checkpoint.every=4", "eval.num_samples=64",
            f"output_dir={run}"]  # fmt: skip
    argv = [sys.executable, str(REPO_ROOT / "trainer" / "main.py"), *command[2:], *tiny]
    env = subprocess_env()
    trained = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-3000:]
    assert "80 samples" in trained.stdout and (run / "checkpoints" / "step_00000004").is_dir(), trained.stdout
    sampled = subprocess.run(
        [sys.executable, "-m", "trainer.sample", "--run", str(run), "--num", "16", "--npy", str(tmp_path / "s.npy")],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    assert np.load(tmp_path / "s.npy").shape == (16, 1, 28, 28)


def test_the_converters_hints_name_its_own_flags(tmp_path):
    # "set data.image_key to ...": a trainer key, where meg-convert takes --image-key.
    write_shards(tmp_path, "txt")
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        assert convert.main(["webdataset", "--shards", _pattern(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "--image-key" in err.getvalue() and "data.image_key" not in err.getvalue(), err.getvalue()
