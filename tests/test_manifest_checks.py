"""read_manifest refuses a manifest whose fields the reader cannot use, naming the file and the key,
and checks its shards on a store that refuses listing (data_pipeline/shards.py)."""

from __future__ import annotations

import json
import re
import shlex

import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from data_pipeline.shards import DataError, read_manifest, shard_sizes, write_array_shards


@pytest.fixture
def manifest_file(tmp_path):
    """A valid manifest of 2 shards (its path), to spoil one field of."""
    write_array_shards(str(tmp_path), "img", "train", np.zeros((8, 2), np.float32), np.zeros(8), 2)
    return tmp_path / "manifest.json"


def shard(key, value):
    return lambda m: m["shards"][1].__setitem__(key, value)


def top(key, value):
    return lambda m: m.__setitem__(key, value)


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        (shard("num_samples", "4"), "shards[1].num_samples is '4', it should be a non-negative integer"),
        (shard("num_samples", 4.0), "shards[1].num_samples is 4.0"),
        (shard("num_samples", -4), "shards[1].num_samples is -4"),
        (shard("num_samples", True), "shards[1].num_samples is True"),
        (shard("num_bytes", "10240"), "shards[1].num_bytes is '10240', it should be a non-negative integer"),
        (shard("url", 5), "shards[1].url is 5, it should be the shard's path or URL"),
        (top("num_samples", "8"), "num_samples is '8'"),
        (top("format_version", 99), "format_version is 99, it should be 1 to 2, the formats this version reads"),
        (top("format_version", "2"), "format_version is '2'"),
        (top("sample_shape", "ab"), "sample_shape is 'ab', it should be a list of positive integers"),
        (top("sample_shape", [2, -1]), "sample_shape is [2, -1]"),
        (top("dtype", "complex999"), "dtype is 'complex999', it should be a numpy dtype's name"),
        (top("dtype", 5), "dtype is 5"),
        (top("layout", "tfrecord"), "layout is 'tfrecord', it should be meg or webdataset"),
        (top("decode", {"image_kye": "png"}), "decode has the unknown key 'image_kye'; the keys are image_key"),
        (top("decode", ["png"]), "decode is ['png']"),
        (top("decode", {"image_mode": "cmyk"}), "decode.image_mode is 'cmyk', it should be rgb or l"),
        (top("decode", {"image_size": "64"}), "decode.image_size is '64', it should be an integer in"),
        (top("decode", {"label_key": 3}), "decode.label_key is 3, it should be a string"),
        (top("decode", {"label_key": "cls:x"}), "decode.label_key='cls:x': only a .json member has fields"),
    ],
)
def test_a_field_the_reader_cannot_use_is_named(manifest_file, spoil, message):
    manifest = json.loads(manifest_file.read_text())
    spoil(manifest)
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(DataError) as error:
        read_manifest(str(manifest_file.parent))
    assert str(error.value).startswith(f"manifest {manifest_file}: ")
    assert message in str(error.value)


def test_a_folder_in_a_shards_place_is_named_before_any_reading(manifest_file):
    # It was warned of as a shard of the wrong size that training skips, then its read ended the run.
    listed = json.loads(manifest_file.read_text())["shards"][1]["url"]
    shard_path = manifest_file.parent / listed
    shard_path.unlink()
    shard_path.mkdir()
    with pytest.raises(DataError) as error:
        read_manifest(str(manifest_file.parent))
    assert str(error.value) == (
        f"manifest {manifest_file} lists 1 folder(s) where shard files belong, first: {shard_path}: move them "
        "away, or convert the data set again"
    )


def test_a_manifest_that_is_not_a_json_object_is_named(manifest_file):
    manifest_file.write_text("[]")
    with pytest.raises(DataError, match="is malformed: it holds a JSON list, not an object"):
        read_manifest(str(manifest_file.parent))


@pytest.mark.parametrize(
    "shards, message",
    [
        (None, "'shards' must be a list of shard entries; it has none"),
        ("abc", "'shards' must be a list of shard entries; got 'abc'"),
        (["a.tar"], "shards[0] must be an object (url, num_samples, num_bytes), got 'a.tar'"),
        ([{"url": "a.tar", "samples": 3}], "shards[0] has keys ['samples', 'url']; a shard entry has url, num_samples"),
    ],
)
def test_a_shard_list_the_reader_cannot_use_is_named(manifest_file, shards, message):
    """Were "is malformed: 'shards'" (a KeyError's repr) and "ShardInfo() argument after ** must be a mapping"."""
    manifest = json.loads(manifest_file.read_text())
    manifest.pop("shards")
    if shards is not None:
        manifest["shards"] = shards
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(DataError) as error:
        read_manifest(str(manifest_file.parent))
    assert str(error.value).startswith(f"manifest {manifest_file} is malformed: ") and message in str(error.value)


def test_the_fields_a_webdataset_index_writes_are_accepted(manifest_file):
    manifest = json.loads(manifest_file.read_text())
    manifest.update(layout="webdataset", decode={"image_key": "png", "label_key": "json:meta.class",
                                                 "image_mode": "l", "image_size": 32})  # fmt: skip
    manifest_file.write_text(json.dumps(manifest))
    assert read_manifest(str(manifest_file.parent)).decode["label_key"] == "json:meta.class"


@pytest.fixture
def unlistable_store(tmp_path, monkeypatch):
    """A data set on a store that refuses listing and answers for each object (S3 without
    s3:ListBucket), as ``memory://`` URLs: its URL."""
    url = f"memory://{tmp_path.name}/img"
    write_array_shards(url, "img", "train", np.zeros((8, 2), np.float32), np.zeros(8), 2)

    def refuse(self, path, detail=True, **kwargs):
        raise PermissionError(13, "Access Denied (ListObjectsV2)")

    monkeypatch.setattr(MemoryFileSystem, "ls", refuse)
    yield url
    monkeypatch.undo()  # rm lists
    MemoryFileSystem().rm(f"/{tmp_path.name}", recursive=True)


def test_shards_are_looked_up_one_by_one_where_the_store_refuses_listing(unlistable_store):
    manifest = read_manifest(unlistable_store)
    assert manifest.num_samples == 8


@pytest.mark.parametrize("listable", [True, False])
def test_a_folder_in_a_shards_place_on_a_store_is_named(tmp_path, monkeypatch, listable):
    # Found in the store's listing, or in its answer for the one object where it refuses to list.
    url = f"memory://{tmp_path.name}/img"
    write_array_shards(url, "img", "train", np.zeros((8, 2), np.float32), np.zeros(8), 2)
    store, shard = MemoryFileSystem(), f"{url}/img-train-000001.tar"
    store.rm(shard)
    store.pipe(f"{shard}/inside", b"x")
    if not listable:

        def refuse(self, path, detail=True, **kwargs):
            raise PermissionError(13, "Access Denied (ListObjectsV2)")

        monkeypatch.setattr(MemoryFileSystem, "ls", refuse)
    try:
        with pytest.raises(DataError, match=f"lists 1 folder\\(s\\) where shard files belong, first: {shard}: move"):
            read_manifest(url)
    finally:
        monkeypatch.undo()
        store.rm(f"/{tmp_path.name}", recursive=True)


def test_a_shard_the_store_refuses_to_look_up_is_named(unlistable_store, monkeypatch):
    def refuse(self, path, **kwargs):
        raise PermissionError(13, "Access Denied (HeadObject)")  # S3's answer for a missing key, too

    monkeypatch.setattr(MemoryFileSystem, "info", refuse)
    shard = f"{unlistable_store}/img-train-000000.tar"
    with pytest.raises(DataError, match=f"shard {shard}: the store refused to look it up .*: it is missing, or"):
        shard_sizes([shard])


def test_a_file_or_nothing_as_data_url_is_named_as_such(tmp_path):
    """Were "holds files but no manifest.json" (the toy presets), "Not a directory: .../manifest.json"
    (the others) and, for an empty url, the working directory's files."""
    from data_pipeline.config import DataConfig
    from data_pipeline.dataset import write_toy_data

    (tmp_path / "afile").write_text("")
    with pytest.raises(DataError, match=f"data.url={tmp_path / 'afile'} is a file: point it at the data set's folder"):
        write_toy_data(DataConfig(url=str(tmp_path / "afile"), toy="25gaussians"), seed=0)
    with pytest.raises(DataError, match=f"{tmp_path / 'afile'} is a file: a data set is a folder holding manifest"):
        read_manifest(str(tmp_path / "afile"))
    # Shards given to a tool that reads data sets (meg-fid, meg-classifier): was "no manifest at
    # d-{0..1}.tar/manifest.json: write the data set there", a folder no converter writes.
    for shards in (f"{tmp_path}/d-{{0..1}}.tar", str(tmp_path / "d.tar")):
        with pytest.raises(DataError) as caught:
            read_manifest(shards)
        assert str(caught.value) == (
            f"{shards} names shards, not a data set: index them into a data set with `python -m data_pipeline.convert "
            f"index --shards {shlex.quote(shards)} --out FOLDER` (it writes only a manifest) and give FOLDER"
        )
    with pytest.raises(ValueError, match="data.url is empty"):
        DataConfig(url=" ")


@pytest.mark.parametrize("key, value, held", [("sample_shape", [3], "[2] float32"), ("dtype", "uint8", "[2] float32")])
def test_a_manifest_whose_sample_shape_is_not_its_shards_is_named_when_the_data_set_opens(
    manifest_file, key, value, held
):
    # Found at the first batch, after a run had written its step-0 checkpoint for the wrong shape.
    from data_pipeline.config import DataConfig
    from data_pipeline.dataset import open_dataset

    data = DataConfig(url=str(manifest_file.parent))
    assert open_dataset(data).manifest.sample_shape == [2]
    manifest = json.loads(manifest_file.read_text())
    manifest[key] = value
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=re.escape(f"-000000.tar holds samples of shape {held}, its manifest says")):
        open_dataset(data)


def test_a_folder_of_shards_without_a_manifest_is_told_how_to_read_them(tmp_path):
    # It was told to convert data there (--out an unquoted folder), which convert refuses: it is not empty.
    folder = tmp_path / "with space"
    write_array_shards(str(folder), "p", "train", np.zeros((8, 2), np.float32), np.zeros(8), 4)
    (folder / "manifest.json").unlink()
    with pytest.raises(DataError) as error:
        read_manifest(str(folder))
    pattern = shlex.quote(f"{folder}/p-train-{{000000..000003}}.tar")
    assert str(error.value) == (
        f"no manifest at {folder / 'manifest.json'}: {folder} holds 4 .tar file(s), WebDataset shards?: give them as "
        f"data.url ({pattern}), or index them into a data set with `python -m data_pipeline.convert index --shards "
        f"{pattern} --out FOLDER` (it writes only a manifest) and give FOLDER"
    )
    (folder / "p-train-000002.tar").unlink()  # numbered with a gap: no one pattern names them
    with pytest.raises(DataError, match=re.escape("holds 3 .tar file(s), WebDataset shards?: give them as data.url")):
        read_manifest(str(folder))


def test_a_folder_of_data_sets_given_as_one_names_them(tmp_path):
    # meg-convert mnist writes train/ and test/: given their folder, the advice was to convert the data there.
    for split in ("train", "test"):
        write_array_shards(str(tmp_path / split), "img", split, np.zeros((8, 2), np.float32), np.zeros(8), 2)
    with pytest.raises(DataError) as error:
        read_manifest(str(tmp_path))
    assert str(error.value) == (
        f"no manifest at {tmp_path / 'manifest.json'}: {tmp_path} holds the data sets {tmp_path / 'test'}, "
        f"{tmp_path / 'train'}: give one of them"
    )
