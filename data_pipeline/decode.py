"""WebDataset shards as other tools write them (webdataset's ShardWriter, tarp, img2dataset, exported
data sets): per sample an image (``.png``, ``.jpg``, ...) or an ``.npy`` array, and optionally a
label (``.cls``, or a field of a ``.json`` member: ``data.label_key=json:label``). Read with
webdataset's own tar iterator and grouping, decoded with its image and npy decoders (never its
pickle or torch decoders: a data file must not run code), into the arrays the stream shuffles:
images as uint8 (C, H, W), arrays as stored, labels as int64 (-1 unlabelled).

Which fields are read, and how images are shaped, is a ``DecodeSpec``: from ``data.image_key``,
``data.label_key``, ``data.image_mode`` and ``data.image_size``, and stored in the manifest of an
indexed data set (``python -m data_pipeline.convert index``).
"""

from __future__ import annotations

import io
import json
import tarfile
import warnings
import zlib
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np

from data_pipeline.cli import DataError
from data_pipeline.config import DEFAULT_MAX_SAMPLE_BYTES
from data_pipeline.shard_reader import BLOCK, NUMPY_AST_LOCK, CorruptShard, SampleTooLarge, ShardArrays, check_label

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

    @classmethod
    def of(cls, data_cfg) -> DecodeSpec:
        """The spec a ``DataConfig`` asks for."""
        return cls(data_cfg.image_key, data_cfg.label_key, data_cfg.image_mode, data_cfg.image_size)

    def to_json(self) -> dict:
        return asdict(self)

    @property
    def label_member(self) -> str:
        """The member that holds the label: ``cls`` for ``cls``, ``json`` for ``json:label``."""
        return self.label_key.partition(":")[0].strip().lower()

    @property
    def label_field(self) -> list[str]:
        """The label's path inside a JSON member (``json:meta.class`` -> [meta, class]); [] for a member
        that is the label itself."""
        path = self.label_key.partition(":")[2].strip()
        return path.split(".") if path else []

    def describe(self) -> str:
        if not self.label_key:
            label = ""
        elif self.label_field:
            label = f" and a .{self.label_member} member with a {'.'.join(self.label_field)!r} label"
        else:
            label = f" and a .{self.label_member} label"
        return f"samples with a {' / '.join('.' + k for k in self.keys)} member{label}"


class _Gunzip:
    """Reads a gzip stream's decompressed bytes on demand, never more than asked for (plus 1 MiB)."""

    def __init__(self, data: bytes | memoryview):
        self.z, self.rest, self.buf = zlib.decompressobj(wbits=31), bytes(data), bytearray()

    def read(self, n: int) -> bytes:
        while len(self.buf) < n and not self.z.eof:
            tail = self.z.unconsumed_tail or self.rest
            if not tail:
                break
            self.rest = b""
            self.buf += self.z.decompress(tail, 1 << 20)
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out


def too_large(what: str, size: int, bound: int) -> SampleTooLarge:
    return SampleTooLarge(
        f"{what} has {size} bytes, more than data.max_sample_bytes={bound} allows; raise data.max_sample_bytes "
        "if this data is right"
    )


def gunzip_shard(data: bytes | memoryview, max_member: int = DEFAULT_MAX_SAMPLE_BYTES) -> bytes | memoryview:
    """A ``.tar.gz`` shard's tar bytes (recognised by content); other shards unchanged. Decompressed
    member by member: a member above ``max_member`` bytes is refused (SampleTooLarge) before it is
    decompressed, so a few MB of gzip cannot take gigabytes of memory."""
    if bytes(data[:2]) != GZIP_MAGIC:
        return data
    stream, out = _Gunzip(data), bytearray()
    try:
        while True:
            header = stream.read(BLOCK)
            out += header
            if len(header) < BLOCK:
                raise CorruptShard("a truncated gzip stream (it ends inside the tar archive)")
            if header == bytes(BLOCK):  # the end of the archive: keep what tar pads it with
                out += stream.read(tarfile.RECORDSIZE)
                return bytes(out)
            try:
                size = tarfile.nti(header[124:136])
            except tarfile.HeaderError as e:
                raise CorruptShard(f"a damaged tar header inside the gzip stream ({e})") from None
            if size > max_member:
                name = header[:100].rstrip(b"\0").decode(errors="replace")
                raise too_large(f"member {name!r} (decompressed)", size, max_member)
            out += stream.read(-(-size // BLOCK) * BLOCK)
    except zlib.error as e:
        raise CorruptShard(f"a damaged gzip stream ({e})") from None


def check_eight_bit(mode: str, what: str) -> None:
    """Raises DataError for a PIL image ``mode`` of more than 8 bits a channel (16-bit, 32-bit integer,
    float): converted to 8 bits as every image here is, its values would be clipped (a 16-bit scan went
    to 0 and 255) or zeroed (floats in 0..1), without a word."""
    if mode in ("I", "F") or mode.startswith("I;16"):
        raise DataError(
            f"{what} is a {mode} image (more than 8 bits a channel), which 8-bit conversion would clip: save "
            "it as 8-bit PNG or JPEG, or its values as a .npy (python -m data_pipeline.convert arrays)"
        )


def _image(data: bytes, spec: DecodeSpec, max_bytes: int, key: str) -> np.ndarray:
    from PIL import Image
    from webdataset.autodecode import imagehandler

    # The header's size first: decoding allocates width x height x channels.
    with warnings.catch_warnings():  # PIL's bomb warning: the bound below is the one that applies
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        probe = Image.open(io.BytesIO(data))
    with probe:
        check_eight_bit(probe.mode, f"sample {key!r}")
        decoded = probe.width * probe.height * max(len(probe.getbands()), 3 if spec.image_mode == "rgb" else 1)
    if decoded > max_bytes:
        raise too_large(f"sample {key!r}'s image ({probe.width}x{probe.height}, decoded)", decoded, max_bytes)
    img = imagehandler("pil")("sample.png", data)  # webdataset's decoder (PIL underneath)
    img = img.convert("RGB" if spec.image_mode == "rgb" else "L")
    if spec.image_size:
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side)).resize((spec.image_size,) * 2, Image.BICUBIC)
    a = np.asarray(img, dtype=np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def _label(fields: dict, spec: DecodeSpec, key: str) -> int:
    """The sample's label: a member that is an integer (``.cls``), or a field of a JSON member."""
    member, path = spec.label_member, spec.label_field
    fix = "set data.label_key to where the label is (cls, or json:FIELD for a field of a .json member; '' for none)"
    if member not in fields:
        held = ", ".join(f".{k}" for k in sorted(fields))
        raise CorruptShard(f"sample {key!r} has no .{member} member for its label (it holds {held}); {fix}")
    raw = bytes(fields[member])
    if not path:
        text = raw.decode(errors="replace").strip()
        try:
            return check_label(int(text), key)
        except ValueError:
            raise CorruptShard(f"sample {key!r}'s .{member} label is {text[:40]!r}, not an integer; {fix}") from None
    value = json.loads(raw)
    for depth, name in enumerate(path):
        if not isinstance(value, dict) or name not in value:
            where = ".".join(path[:depth]) or "the top level"
            keys = sorted(value)[:10] if isinstance(value, dict) else type(value).__name__
            raise CorruptShard(f"sample {key!r}'s .{member} has no {'.'.join(path)!r} (at {where}: {keys}); {fix}")
        value = value[name]
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise CorruptShard(f"sample {key!r}'s label {'.'.join(path)!r} is {value!r:.40}, not an integer; {fix}")
    return check_label(value, key)


def parse_webdataset_shard(
    data: bytes | memoryview, spec: DecodeSpec, max_sample_bytes: int = DEFAULT_MAX_SAMPLE_BYTES
) -> ShardArrays:
    """The samples of one shard that have one of ``spec``'s fields, decoded. Raises CorruptShard when
    the shard cannot be read or decoded, or holds no such sample (the message names what it holds),
    SampleTooLarge for a member or decoded image above ``max_sample_bytes``."""
    from webdataset.autodecode import npy_loads
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    keys, xs, labels, seen, left_out = [], [], [], set(), Counter()
    try:
        files = tar_file_iterator(io.BytesIO(bytes(gunzip_shard(data, max_sample_bytes))))
        for sample in group_by_keys({**f, "__url__": ""} for f in files):
            fields = {k.lower(): v for k, v in sample.items() if not k.startswith("__")}
            seen.update(fields)
            field = next((k for k in [*spec.keys, "npy"] if k in fields), None)
            if field is None:
                held = " ".join(f".{k}" for k in sorted(fields)) or "no members"
                left_out[held] += 1
                continue
            if len(fields[field]) > max_sample_bytes:
                raise too_large(f"sample {sample['__key__']!r}'s .{field}", len(fields[field]), max_sample_bytes)
            if field == "npy":
                with NUMPY_AST_LOCK:
                    x = npy_loads(fields[field])
            else:
                x = _image(fields[field], spec, max_sample_bytes, sample["__key__"])
            label = _label(fields, spec, sample["__key__"]) if spec.label_key else -1
            keys.append(sample["__key__"])
            xs.append(x)
            labels.append(label)
    except CorruptShard:
        raise
    except Exception as e:  # noqa: BLE001 (see shard_reader.DAMAGE_NOTE)
        raise CorruptShard(f"{type(e).__name__}: {e}") from None
    if not xs:
        held = ", ".join(f".{k}" for k in sorted(seen)) or "no members"
        raise CorruptShard(
            f"no sample has the expected member: expected {spec.describe()}, the shard holds {held}; "
            "set data.image_key to the member that holds the image (e.g. data.image_key=ppm)"
        )
    shapes = {x.shape for x in xs}
    if len(shapes) > 1 or len({x.dtype for x in xs}) > 1:
        raise CorruptShard(f"samples of different shapes {sorted(shapes)[:3]}; set data.image_size to resize them")
    return ShardArrays(np.array(keys), np.stack(xs), np.asarray(labels, dtype=np.int64), left_out)


def is_meg_layout(data: bytes | memoryview, max_sample_bytes: int = DEFAULT_MAX_SAMPLE_BYTES) -> bool:
    """Whether a shard is this project's own layout (``{key}.x.npy`` + ``{key}.cls``): its first
    sample's members say. Those take the fast parser; anything else the general one."""
    try:
        with tarfile.open(fileobj=io.BytesIO(bytes(gunzip_shard(data, max_sample_bytes))), mode="r|*") as tar:
            first = [m.name for _, m in zip(range(4), tar)]
    except Exception:  # noqa: BLE001 (a damaged shard: the general parser reports it)
        return False
    return any(name.endswith(".x.npy") for name in first)
