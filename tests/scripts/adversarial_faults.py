"""Attacks on run folders and checkpoints, against the real command line (not collected by pytest).

    python tests/scripts/adversarial_faults.py [--repo PATH] [--timeout 120]

Each attack copies a finished toy run (steps 0, 10, 20), tampers with it, runs trainer/main.py on it
as a subprocess (PYTHONPATH=--repo), and counts: security holes (a file outside the run folder
changed), lost data (a real checkpoint deleted or changed, with no copy kept), hangs (timeout),
raw tracebacks, and refusals where the run should have gone on. Prints a table and a JSON line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.conftest import tiny_overrides  # noqa: E402

# The suite's tiny toy run; each attack names its own folders and step count.
TINY = [o for o in tiny_overrides(Path(".")) if not o.startswith(("output_dir=", "data.url=", "train.steps="))]


def tree_digest(folder: Path) -> dict[str, str]:
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def folder_digest(folder: Path) -> str:
    return hashlib.sha256(json.dumps(tree_digest(folder), sort_keys=True).encode()).hexdigest()


class Case:
    def __init__(self, repo: Path, base: Path, root: Path, timeout: float):
        self.repo, self.timeout = repo, timeout
        self.tmp = Path(tempfile.mkdtemp(dir=root))
        shutil.copytree(base, self.tmp / "w", symlinks=True)
        self.run_dir = self.tmp / "w" / "run"
        self.ckpts = self.run_dir / "checkpoints"
        self.outside = self.tmp / "outside"
        self.outside.mkdir()
        self.victim = self.outside / "precious.txt"
        self.victim.write_text("someone else's file\n")
        (self.outside / "dir").mkdir()
        (self.outside / "dir" / "keep.txt").write_text("keep\n")
        self.preserve: dict[str, str] = {}  # checkpoint name: digest that must survive somewhere

    def keep_checkpoint(self, name: str) -> None:
        self.preserve[name] = folder_digest(self.ckpts / name)

    def run(self, steps: int = 30, extra: list[str] = (), preexec=None, env_extra=None) -> dict:
        env = dict(os.environ, PYTHONPATH=str(self.repo), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        env.update(env_extra or {})
        before = folder_digest(self.outside)
        cmd = [sys.executable, "trainer/main.py", "--config", "toy_25gaussians",
               f"output_dir={self.run_dir}", f"data.url={self.tmp / 'w' / 'data'}", f"train.steps={steps}",
               *TINY, *extra]  # fmt: skip
        start = time.time()
        try:
            r = subprocess.run(cmd, cwd=self.repo, env=env, capture_output=True, text=True,
                               timeout=self.timeout, preexec_fn=preexec)  # fmt: skip
            rc, out, err, hang = r.returncode, r.stdout, r.stderr, False
        except subprocess.TimeoutExpired as e:
            rc, out, err, hang = None, str(e.stdout or ""), str(e.stderr or ""), True
        hole = folder_digest(self.outside) != before
        survivors = set()
        # checkpoint.resume=false moves an earlier run's checkpoints to previous-<time>/: kept, not lost.
        for folder in [self.ckpts, *self.run_dir.glob("previous-*/checkpoints")]:
            if folder.is_dir() and not folder.is_symlink():
                survivors |= {folder_digest(p) for p in folder.iterdir() if p.is_dir() and not p.is_symlink()}
        lost = [n for n, d in self.preserve.items() if d not in survivors]
        return {"rc": rc, "hang": hang, "hole": hole, "lost": lost, "traceback": "Traceback" in err,
                "seconds": round(time.time() - start, 1), "err": err.strip().splitlines()[-1:] if err.strip() else [],
                "out": out}  # fmt: skip


def regenerate_file_list(folder: Path) -> None:
    files = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_file() and rel != "files.json":
            files[rel] = {"size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
    (folder / "files.json").write_text(json.dumps({"version": "x", "files": files}))


def change_weights(folder: Path, change) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = str(folder / "weights.safetensors")
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    save_file({k: change(v) for k, v in load_file(path).items()}, path, metadata=meta)
    regenerate_file_list(folder)


# -- the attacks: each tampers, runs, and returns the result (expect: "go on" or "refuse") -------------


def link_top(name, to_dir=False):
    def attack(c: Case):
        target = c.outside / "dir" if to_dir else c.victim
        p = c.run_dir / name
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else (p.unlink() if os.path.lexists(p) else None)
        p.symlink_to(target)
        return c.run(), "refuse"

    attack.__name__ = f"symlink {name}"
    return attack


def hardlink(name):
    def attack(c: Case):
        p = c.run_dir / name
        c.victim.write_text(p.read_text())
        before = c.victim.read_text()
        p.unlink()
        os.link(c.victim, p)
        result = c.run()
        result["hole"] = result["hole"] or c.victim.read_text() != before
        return result, "go on"

    attack.__name__ = f"hardlink {name}"
    return attack


def link_eval_file(c: Case):
    (c.run_dir / "eval").mkdir(exist_ok=True)
    (c.run_dir / "eval" / "latest.json").unlink(missing_ok=True)
    (c.run_dir / "eval" / "latest.json").symlink_to(c.victim)
    return c.run(), "refuse"


def link_partial(c: Case):
    (c.ckpts / "step_00000030.partial").symlink_to(c.outside / "dir")
    return c.run(), "refuse"


def link_inside_checkpoint(c: Case):
    f = c.ckpts / "step_00000020" / "files.json"
    c.victim.write_text(f.read_text())
    f.unlink()
    f.symlink_to(c.victim)
    return c.run(), "refuse"


def no_file_lists(c: Case):
    for p in c.ckpts.iterdir():
        (p / "files.json").unlink()
        c.keep_checkpoint(p.name)
    result = c.run(steps=30)
    result["ok"] = "resumed from step 20" in result["out"]
    return result, "go on"


def no_file_list_restart_scratch(c: Case):
    for p in c.ckpts.iterdir():
        (p / "files.json").unlink()
        c.keep_checkpoint(p.name)
    return c.run(steps=30, extra=["checkpoint.resume=false"]), "go on"


def stray_higher(c: Case):
    c.keep_checkpoint("step_00000020")
    (c.ckpts / "step_00000090").mkdir()
    (c.ckpts / "step_00000099").mkdir()
    (c.ckpts / "step_00000099" / "files.json").write_text("{")
    c.preserve["stray"] = folder_digest(c.ckpts / "step_00000099")
    result = c.run(steps=30, extra=["checkpoint.keep=1"])
    result["lost"] += [] if (c.ckpts / "step_00000030" / "files.json").exists() else ["step_00000030 (just written)"]
    result["lost"] = [n for n in result["lost"] if n != "step_00000020"]  # pruning an old intact one is keep=1
    return result, "go on"


def damaged_newest_keep1(c: Case):
    (c.ckpts / "step_00000020" / "weights.safetensors").write_bytes(b"garbage")
    c.keep_checkpoint("step_00000020")  # damaged: never deleted
    return c.run(steps=30, extra=["checkpoint.keep=1"]), "go on"


def weights_times(factor):
    def attack(c: Case):
        change_weights(c.ckpts / "step_00000020", lambda t: t * factor)
        c.keep_checkpoint("step_00000020")  # as tampered: a damaged checkpoint is kept, not deleted
        result = c.run(steps=30)
        result["ok"] = "resumed from step 10" in result["out"]
        return result, "go on"

    attack.__name__ = f"weights x{factor} (files.json rewritten)"
    return attack


def weights_nan(c: Case):
    change_weights(c.ckpts / "step_00000020", lambda t: t * float("nan"))
    c.keep_checkpoint("step_00000020")
    result = c.run(steps=30)
    result["ok"] = "resumed from step 10" in result["out"]
    return result, "go on"


def rng_payload(c: Case):
    import torch

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {c.outside / 'ran'}",)

    torch.save({"x": Payload()}, c.ckpts / "step_00000020" / "rng_rank0.pt")
    regenerate_file_list(c.ckpts / "step_00000020")
    c.keep_checkpoint("step_00000020")
    result = c.run(steps=30)
    result["ok"] = "weights_only=False" not in result["out"] + "".join(result["err"])
    return result, "go on"


def bad_header(c: Case):
    p = c.ckpts / "step_00000020" / "weights.safetensors"
    data = bytearray(p.read_bytes())
    data[0:8] = (10**9).to_bytes(8, "little")
    p.write_bytes(bytes(data))
    regenerate_file_list(c.ckpts / "step_00000020")
    c.keep_checkpoint("step_00000020")
    return c.run(steps=30), "go on"


def negative_step(c: Case):
    p = c.ckpts / "step_00000020" / "trainer_state.json"
    state = json.loads(p.read_text())
    state["step"] = -5
    p.write_text(json.dumps(state))
    regenerate_file_list(c.ckpts / "step_00000020")
    c.keep_checkpoint("step_00000020")
    return c.run(steps=30), "go on"


def garbage_config(c: Case):
    (c.ckpts / "step_00000020" / "config.yaml").write_text("model: [unclosed\n")
    regenerate_file_list(c.ckpts / "step_00000020")
    c.keep_checkpoint("step_00000020")
    return c.run(steps=30), "go on"


def dead_pid_lock(c: Case):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    text = f"host {socket.gethostname()}, pid {dead.pid}, since then\n"
    code = (
        f"import fcntl, os, time\nfd = os.open({str(c.run_dir / '.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
        f"fcntl.flock(fd, fcntl.LOCK_EX)\nos.ftruncate(fd, 0)\nos.write(fd, {text.encode()!r})\n"
        "print('ready', flush=True)\ntime.sleep(300)\n"
    )
    orphan = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        orphan.stdout.readline()
        result = c.run(steps=30)
        result["ok"] = result["rc"] == 0
    finally:
        orphan.kill()
        orphan.wait()
    return result, "go on"


def killed_with_process_workers(c: Case):
    env = dict(os.environ, PYTHONPATH=str(c.repo), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "trainer/main.py", "--config", "toy_25gaussians", f"output_dir={c.run_dir}",
           f"data.url={c.tmp / 'w' / 'data'}", "train.steps=100000", *TINY, "data.worker_type=process",
           "data.num_workers=2"]  # fmt: skip
    first = subprocess.Popen(cmd, cwd=c.repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Killed once the process workers deliver batches: a step's line (the start line comes before them).
    metrics, deadline = c.run_dir / "metrics.jsonl", time.time() + 60
    lines = metrics.read_text().count('"samples_per_s"')
    while time.time() < deadline and metrics.read_text().count('"samples_per_s"') == lines:
        time.sleep(0.2)
    first.kill()
    first.wait()
    time.sleep(0.5)
    result = c.run(steps=30, extra=["data.worker_type=process", "data.num_workers=2"])
    result["ok"] = result["rc"] == 0
    return result, "go on"


def full_disk(c: Case):
    for name in ("step_00000010", "step_00000020"):
        c.keep_checkpoint(name)
    limit = 10_000  # metrics.jsonl grows under it; a checkpoint's weights file does not fit (EFBIG)

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = c.run(steps=30, preexec=small_files)
    result["ok"] = result["rc"] == 2 and not list(c.ckpts.glob("*.partial"))
    return result, "refuse"


def checkpoints_is_a_file(c: Case):
    shutil.rmtree(c.ckpts)
    c.ckpts.write_text("not a folder\n")
    return c.run(steps=30), "refuse"


ATTACKS = [
    link_top(".lock"),
    link_top("config.yaml"),
    link_top("metrics.jsonl"),
    link_top("eval", to_dir=True),
    link_top("checkpoints", to_dir=True),
    link_eval_file,
    link_partial,
    link_inside_checkpoint,
    hardlink("config.yaml"),
    hardlink("metrics.jsonl"),
    no_file_lists,
    no_file_list_restart_scratch,
    stray_higher,
    damaged_newest_keep1,
    weights_times(1000),
    weights_nan,
    rng_payload,
    bad_header,
    negative_step,
    garbage_config,
    dead_pid_lock,
    killed_with_process_workers,
    full_disk,
    checkpoints_is_a_file,
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", default=str(Path(__file__).resolve().parents[2]))
    parser.add_argument("--timeout", type=float, default=120)
    args = parser.parse_args()
    repo = Path(args.repo).resolve()
    root = Path(tempfile.mkdtemp(prefix="adversarial-faults-"))
    base = root / "base"
    env = dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "trainer/main.py", "--config", "toy_25gaussians", f"output_dir={base / 'run'}",
                    f"data.url={base / 'data'}", "train.steps=20", *TINY],
                   cwd=repo, env=env, check=True, capture_output=True, timeout=args.timeout)  # fmt: skip
    totals = {"attacks": 0, "holes": 0, "lost": 0, "hangs": 0, "tracebacks": 0, "not_ok": 0}
    print(f"{'attack':42} {'rc':>4} {'s':>6}  outcome")
    for attack in ATTACKS:
        case = Case(repo, base, root, args.timeout)
        result, expect = attack(case)
        flags = [k for k in ("hole", "hang", "traceback") if result[k]] + (["lost"] if result["lost"] else [])
        if not result.get("ok", True):
            flags.append("not ok")
        totals["attacks"] += 1
        totals["holes"] += result["hole"]
        totals["lost"] += bool(result["lost"])
        totals["hangs"] += result["hang"]
        totals["tracebacks"] += result["traceback"]
        totals["not_ok"] += not result.get("ok", True)
        last = (result["err"] or [""])[0][:110]
        print(f"{attack.__name__:42} {result['rc']!s:>4} {result['seconds']:>6}  {' '.join(flags) or 'ok'}  {last}")
        shutil.rmtree(case.tmp, ignore_errors=True)
    shutil.rmtree(root, ignore_errors=True)
    print(json.dumps({"repo": str(repo), **totals}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
