"""Bad input through the real command-line tools, each as a subprocess; counts what happens.

    python tests/scripts/adversarial_input.py [--only config|shards|convert] [--timeout 60]

Every case is a user's mistake: the wanted outcome is a clear one-line error (exit 2, "error: ..."
on one line, no traceback). Counted: clear / traceback / hang (past --timeout) / silent (exit 0:
an invalid value accepted) / other. Not collected by pytest: its cases are not in the suite.
"""

from __future__ import annotations

import argparse
import gzip
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = [sys.executable, "trainer/main.py", "--config"]
CONVERT = [sys.executable, "-m", "data_pipeline.convert"]

# One invalid value for each kind of field: sizes, probabilities, betas, seeds, rates, names.
BAD_OVERRIDES = [
    "model.hidden=[]", "model.hidden=[0]", "model.hidden=[-5]", "model.generator_hidden=[8, -1]", "model.z_dim=0",
    "model.z_dim=10000000", "model.conv_width=0", "model.energy_negative_slope=nan", "model.init_std=-1",
    "data.batch_size=0", "data.num_workers=-1", "data.shuffle_buffer=-1", "data.toy_num_samples=0",
    "data.toy_num_shards=0", "data.toy_std=-1", "data.image_size=100000", "data.image_size=-1",
    "data.max_corrupt_share=0", "data.max_corrupt_share=nan", "data.max_sample_bytes=-5",
    "train.steps=0", "train.steps=-1", "train.energy_steps=0", "train.penalty_weight=nan", "train.penalty_weight=-1",
    "train.penalty_every=0", "train.entropy_weight=0", "train.lr_final_factor=-1", "train.lr_decay_fraction=2",
    "train.seed=-1", "train.seed=4294967296", "train.energy_optim.lr=nan", "train.energy_optim.lr=-1e-4",
    "train.generator_optim.lr=0", "train.energy_optim.betas=[0.5]", "train.energy_optim.betas=[0.5, 1.5]",
    "train.generator_optim.betas=[-0.1, 0.9]", "train.energy_optim.weight_decay=-1",
    "train.negatives_mala.steps=-1", "train.negatives_mala.step_size=0", "train.negatives_mala.temperature=nan",
    "train.guard.max_rollbacks=-1", "train.guard.lr_factor=nan", "train.guard.lr_factor=-0.5",
    "train.guard.max_abs_energy_gap=-1", "train.guard.max_penalty=nan", "train.guard.max_param_norm=-1",
    "eval.every=-1", "eval.num_samples=0", "eval.seed=-1", "eval.mala.steps=-3", "eval.kdd.percentile=150",
    "eval.mnist_anomaly.digit=12", "eval.toy.std=-2", "checkpoint.every=0", "checkpoint.keep=0", "log.every=0",
    "log.prometheus_port=99999", "deepspeed.zero_stage=7", "name=../escape", "name=a/b", "name=..", "name=",
    "train.steps=1e400", "train.energy_optim.lr=1e400", "model.arch=" + "x" * 100_000,
]  # fmt: skip


def laughs(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def png(shape) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros(shape, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def idx(array: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, ">u4").tobytes() + array.astype(np.uint8).tobytes()


def kdd_rows(n: int, normal_every: int = 3) -> list[str]:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        cells = [str(rng.integers(0, 100)) for _ in range(41)]
        cells[1], cells[2], cells[3] = "tcp", "http", "SF"
        rows.append(",".join(cells) + "," + ("normal." if normal_every and i % normal_every == 0 else "smurf."))
    return rows


def cases(tmp: str, only: str | None):
    """(group, name, argv) of every case; files are written under ``tmp``."""

    def path(name: str, data: bytes | str) -> str:
        p = os.path.join(tmp, name)
        with open(p, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        return p

    out = []
    if only in (None, "config"):
        presets = {
            "billion_laughs.yaml": laughs(),
            "one_alias.yaml": "train: &t {steps: 5}\nmodel: *t\n",
            "deep_20000.yaml": "name: " + "[" * 20000 + "]" * 20000 + "\n",
            "deep_mapping.yaml": "".join(f"{'  ' * i}k{i}:\n" for i in range(200)) + "  " * 200 + "x: 1\n",
            "huge.yaml": "name: meg\n#" + "x" * (2 << 20) + "\n",
            "binary.yaml": bytes(range(256)) * 10,
            "python_tag.yaml": "name: !!python/object/apply:os.system ['true']\n",
            "list.yaml": "- 1\n- 2\n",
            "bad_base.yaml": "base: [1, 2]\n",
            "unknown_key.yaml": "trian: {steps: 3}\n",
            "set_tag.yaml": "model: {hidden: !!set {1, 2}}\n",
            "timestamp.yaml": "train: {seed: 2001-12-14}\n",
        }
        for name, text in presets.items():
            out.append(("config", f"preset {name}", [*TRAIN, path(name, text), "--print-config"]))
        for override in BAD_OVERRIDES:
            out.append(("config", f"override {override[:50]}", [*TRAIN, "toy_25gaussians", "--print-config", override]))
        for url in ("PIPE:cat /etc/hostname", " pipe:cat x", "Pipe:true"):
            argv = [*TRAIN, "toy_25gaussians", f"data.url={url}", f"output_dir={tmp}/run", "train.steps=1"]
            out.append(("config", f"command url {url!r}", argv))
    if only in (None, "shards"):
        npy = io.BytesIO()
        np.save(npy, np.zeros(2, np.float32))
        shards = {
            "bomb.tar.gz": gzip.compress(tar({"s0.png": bytes(300 << 20), "s0.cls": b"1"}), compresslevel=1),
            "bomb_meg.tar.gz": gzip.compress(tar({"000000000.x.npy": bytes(300 << 20), "000000000.cls": b"1"}), 1),
            "label23_meg.tar": tar({"000000000.x.npy": npy.getvalue(), "000000000.cls": b"12345678901234567890123"}),
            "label23_wds.tar": tar({"s0.png": png((4, 4, 3)), "s0.cls": b"12345678901234567890123"}),
            "label_text.tar": tar({"s0.png": png((4, 4, 3)), "s0.cls": b"seven"}),
            "wide_png.tar": tar({"s0.png": png((12000, 12000)), "s0.cls": b"1"}),
            "random.tar": np.random.default_rng(1).bytes(20000),
            "empty.tar": b"",
            "truncated.tar.gz": gzip.compress(tar({"s0.png": png((8, 8, 3)), "s0.cls": b"1"}))[:60],
        }
        for name, data in shards.items():
            out.append(("shards", f"index {name}", [*CONVERT, "index", "--shards", path(name, data),
                                                    "--out", os.path.join(tmp, "idx-" + name)]))  # fmt: skip
        good = path("good.tar", tar({"s0.png": png((8, 8, 3)), "s0.cls": b"1"}))
        argv = [*CONVERT, "index", "--shards", good, "--image-size", "100000", "--out", f"{tmp}/idx-size"]
        out.append(("shards", "index --image-size 100000", argv))
        argv = [*TRAIN, "toy_25gaussians", f"data.url={tmp}/bomb.tar.gz", "data.toy=", f"output_dir={tmp}/r2"]
        out.append(("shards", "train on a 300 MB gzip member", argv))
    if only in (None, "convert"):
        x = np.random.default_rng(0).integers(0, 256, (50, 28, 28))
        y = np.arange(50) % 10
        images, labels = path("img.idx", idx(x)), path("lab.idx", idx(y))
        bad_labels = y.copy()
        bad_labels[3] = 11
        inputs = {
            "mnist labels 11": ["mnist", "--images", images, "--labels", path("lab11.idx", idx(bad_labels))],
            "mnist images 14x56": ["mnist", "--images", path("i1456.idx", idx(x.reshape(50, 14, 56))), "--labels",
                                   labels],
            "stackedmnist images 7x112": ["stackedmnist", "--images", path("i7112.idx", idx(x.reshape(50, 7, 112))),
                                          "--labels", labels, "--num-samples", "20"],
            "mnist-anomaly labels 11": ["mnist-anomaly", "--digit", "1", "--images", images, "--labels",
                                        path("lab11b.idx", idx(bad_labels))],
            "kdd 1e400": ["kdd", "--csv", path("kdd_inf.csv", "\n".join(
                [r if i != 5 else r.replace(r.split(",")[4], "1e400", 1) for i, r in enumerate(kdd_rows(40))]) + "\n")],
            "kdd no normal.": ["kdd", "--csv", path("kdd_attacks.csv", "\n".join(kdd_rows(40, 0)) + "\n")],
            "kdd only normal.": ["kdd", "--csv", path("kdd_normal.csv", "\n".join(kdd_rows(40, 1)) + "\n")],
            "kdd nan": ["kdd", "--csv", path("kdd_nan.csv", "\n".join(
                [r if i != 7 else r.replace(r.split(",")[5], "nan", 1) for i, r in enumerate(kdd_rows(40))]) + "\n")],
            "mnist random bytes": ["mnist", "--images", path("rnd", np.random.default_rng(2).bytes(999)), "--labels",
                                   labels],
            "mnist csv labels -1": ["mnist", "--csv", path("m.csv", "\n".join(
                ",".join(["0"] * 784 + ["-1"]) for _ in range(5)) + "\n")],
            "arrays no file": ["arrays", "--x", f"{tmp}/none.npy"],
            "cifar10 random": ["cifar10", "--archive", path("c.tar.gz", gzip.compress(b"x" * 100))],
            "toy to /proc": ["toy", "--num-samples", "64", "--out", "/proc/meg-adv"],
        }  # fmt: skip
        for name, argv in inputs.items():
            if "--out" not in argv:
                argv = [*argv, "--out", os.path.join(tmp, "conv-" + name.replace(" ", "_"))]
            out.append(("convert", name, [*CONVERT, *argv]))
    return out


def classify(code: int | None, err: str) -> str:
    if code is None:
        return "hang"
    if "Traceback" in err:
        return "traceback"
    if code == 0:
        return "silent"
    lines = [line for line in err.strip().splitlines() if not line.startswith(("INFO", "WARNING"))]
    if code == 2 and len(lines) == 1 and lines[0].startswith("error: "):
        return "clear"
    return "other"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["config", "shards", "convert"])
    parser.add_argument("--timeout", type=float, default=60)
    parser.add_argument("--show", action="store_true", help="print every case's first line of stderr")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", "MEG_DEBUG": ""}
    counts: Counter[str] = Counter()
    with tempfile.TemporaryDirectory() as tmp:
        for group, name, argv in cases(tmp, args.only):
            start = time.time()
            try:
                r = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.timeout)
                code, err = r.returncode, r.stderr
            except subprocess.TimeoutExpired:
                code, err = None, ""
            outcome = classify(code, err)
            counts[outcome] += 1
            counts[f"{group}:{outcome}"] += 1
            if outcome != "clear" or args.show:
                first = (err.strip().splitlines() or [""])[-1][:160]
                print(f"{outcome:9} {group:8} {name[:50]:50} {time.time() - start:5.1f}s rc={code} {first}", flush=True)
    total = sum(v for k, v in counts.items() if ":" not in k)
    summary = ", ".join(f"{k} {counts[k]}" for k in ("clear", "traceback", "hang", "silent", "other"))
    print(f"\n{total} cases: {summary}")
    for group in ("config", "shards", "convert"):
        print(f"  {group}: " + ", ".join(f"{k.split(':')[1]} {v}" for k, v in counts.items() if k.startswith(group)))
    return 0 if counts["clear"] == total else 1


if __name__ == "__main__":
    sys.exit(main())
