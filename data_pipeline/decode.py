"""WebDataset shards as other tools write them (webdataset's ShardWriter, tarp, img2dataset, exported
data sets): per sample an image (``.png``, ``.jpg``, ...) or an ``.npy`` array, and optionally a
label (``.cls``). Read with webdataset's own tar iterator and grouping, decoded with its image and
npy decoders (never its pickle or torch decoders: a data file must not run code), into the arrays
the stream shuffles: images as uint8 (C, H, W), arrays as stored, labels as int64 (-1 unlabelled).

Which fields are read, and how images are shaped, is a ``DecodeSpec``: from ``data.image_key``,
``data.label_key``, ``data.image_mode`` and ``data.image_size``, and stored in the manifest of an
indexed data set (``python -m data_pipeline.convert index``).
"""

from __future__ import annotations

import io
import tarfile
import zlib
from dataclasses import asdict, dataclass

import numpy as np

from data_pipeline.shard_reader import NUMPY_AST_LOCK, CorruptShard, ShardArrays

GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True)
class DecodeSpec:
    image_key: str = "png;jpg;jpeg;webp"  # the sample's field: the first of these it has (or npy)
    label_key: str = "cls"  # "" for unlabelled data
    image_mode: str = "rgb"  # rgb (3 channels) or l (grayscale, 1 channel)
    image_size: int = 0  # > 0: centre-cropped to a square and resized to size x size; 0: as stored

    @property
    def keys(self) -> list[str]:
        return [k.strip().lower() for k in self.image_key.split(";") if k.strip()]

    def to_json(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        label = f" and a .{self.label_key} label" if self.label_key else ""
        return f"samples with a {' / '.join('.' + k for k in self.keys)} member{label}"


def gunzip_shard(data: bytes | memoryview) -> bytes | memoryview:
    """A ``.tar.gz`` shard's tar bytes (recognised by content); other shards unchanged."""
    if bytes(data[:2]) != GZIP_MAGIC:
        return data
    try:
        return zlib.decompress(bytes(data), wbits=31)
    except zlib.error as e:
        raise CorruptShard(f"a damaged gzip stream ({e})") from None


def _image(data: bytes, spec: DecodeSpec) -> np.ndarray:
    from PIL import Image
    from webdataset.autodecode import imagehandler

    img = imagehandler("pil")("sample.png", data)  # webdataset's decoder (PIL underneath)
    img = img.convert("RGB" if spec.image_mode == "rgb" else "L")
    if spec.image_size:
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side)).resize((spec.image_size,) * 2, Image.BICUBIC)
    a = np.asarray(img, dtype=np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def parse_webdataset_shard(data: bytes | memoryview, spec: DecodeSpec) -> ShardArrays:
    """The samples of one shard that have one of ``spec``'s fields, decoded. Raises CorruptShard when
    the shard cannot be read or decoded, or holds no such sample (the message names what it holds)."""
    from webdataset.autodecode import npy_loads
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    keys, xs, labels, seen = [], [], [], set()
    try:
        files = tar_file_iterator(io.BytesIO(bytes(gunzip_shard(data))))
        for sample in group_by_keys({**f, "__url__": ""} for f in files):
            fields = {k.lower(): v for k, v in sample.items() if not k.startswith("__")}
            seen.update(fields)
            field = next((k for k in [*spec.keys, "npy"] if k in fields), None)
            if field is None:
                continue
            if field == "npy":
                with NUMPY_AST_LOCK:
                    x = npy_loads(fields[field])
            else:
                x = _image(fields[field], spec)
            label = -1
            if spec.label_key:
                if spec.label_key not in fields:
                    raise CorruptShard(f"sample {sample['__key__']!r} has no .{spec.label_key} label")
                label = int(bytes(fields[spec.label_key]).decode().strip())
            keys.append(sample["__key__"])
            xs.append(x)
            labels.append(label)
    except CorruptShard:
        raise
    except Exception as e:  # noqa: BLE001 (see shard_reader.DAMAGE_NOTE)
        raise CorruptShard(f"{type(e).__name__}: {e}") from None
    if not xs:
        held = ", ".join(f".{k}" for k in sorted(seen)) or "no members"
        raise CorruptShard(f"no sample has the expected member: expected {spec.describe()}, the shard holds {held}")
    shapes = {x.shape for x in xs}
    if len(shapes) > 1 or len({x.dtype for x in xs}) > 1:
        raise CorruptShard(f"samples of different shapes {sorted(shapes)[:3]}; set data.image_size to resize them")
    return ShardArrays(np.array(keys), np.stack(xs), np.asarray(labels, dtype=np.int64))


def is_meg_layout(data: bytes | memoryview) -> bool:
    """Whether a shard is this project's own layout (``{key}.x.npy`` + ``{key}.cls``): its first
    sample's members say. Those take the fast parser; anything else the general one."""
    try:
        with tarfile.open(fileobj=io.BytesIO(bytes(gunzip_shard(data))), mode="r|*") as tar:
            first = [m.name for _, m in zip(range(4), tar)]
    except Exception:  # noqa: BLE001 (a damaged shard: the general parser reports it)
        return False
    return any(name.endswith(".x.npy") for name in first)
