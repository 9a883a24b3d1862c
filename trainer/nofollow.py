"""Writing in a run folder without following links: a shared or downloaded run folder whose
``config.yaml`` is a link to someone's file must not make the next trainer overwrite that file.

Files are opened with ``O_NOFOLLOW`` (a link is refused, not followed) and, where a file is written
whole, written to a fresh name and renamed over the old entry (a rename replaces a link or a hard
link itself, never its target). Folders are created with ``mkdir`` and checked with ``lstat``.
``check_run_folder`` refuses, before any work, a run folder whose managed entries are links, or files
where the trainer keeps folders (or the reverse).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from collections.abc import Iterator
from typing import IO

from data_pipeline.cli import STORAGE_FULL, UserError

# What the trainer writes at the top of a run folder (trainer/job.py, trainer/run_folder.py).
MANAGED = (".lock", "config.yaml", "metrics.jsonl", "checkpoints", "eval")
MANAGED_FOLDERS = ("checkpoints", "eval")
_CREATE = os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC


class LinkedRunFolder(UserError, ValueError):
    """A run folder's managed files or folders are links: the trainer would write through them."""


class WrongKindOfEntry(UserError, ValueError):
    """A run folder's managed entry is a file where the trainer keeps a folder, or the reverse."""


def _is_link(path: str) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def linked_entries(folder: str) -> list[str]:
    """The managed entries of ``folder`` that are symbolic links: the top-level files and folders,
    and everything one level inside ``checkpoints/`` (and inside each checkpoint) and ``eval/``."""
    found = [name for name in MANAGED if _is_link(os.path.join(folder, name))]
    for sub in ("checkpoints", "eval"):
        top = os.path.join(folder, sub)
        if sub in found or not os.path.isdir(top):
            continue
        for name in sorted(os.listdir(top)):
            path = os.path.join(top, name)
            if _is_link(path):
                found.append(f"{sub}/{name}")
            elif sub == "checkpoints" and os.path.isdir(path):
                found += [f"{sub}/{name}/{n}" for n in sorted(os.listdir(path)) if _is_link(os.path.join(path, n))]
    return found


def check_run_folder(folder: str) -> None:
    """Raises LinkedRunFolder naming every managed entry of ``folder`` that is a link, and
    WrongKindOfEntry naming one that is a file where the trainer keeps a folder, or the reverse:
    found only when the trainer first writes there, after hours of training for eval/."""
    links = linked_entries(folder)
    if links:
        shown = ", ".join(f"{name} -> {os.readlink(os.path.join(folder, name))}" for name in links)
        raise LinkedRunFolder(
            f"{folder}: refusing a run folder whose files are links (the trainer would write through them): "
            f"{shown}. Remove the links, or train into another output_dir."
        )
    for name in MANAGED:
        path = os.path.join(folder, name)
        if os.path.exists(path) and os.path.isdir(path) != (name in MANAGED_FOLDERS):
            found, wanted = ("a folder", "file") if os.path.isdir(path) else ("not a folder", "folder")
            raise WrongKindOfEntry(
                f"{path} is {found}, where the trainer keeps its {name} {wanted}: move it out of the run folder "
                "(it is not the trainer's), or train into another output_dir."
            )


def make_dir(path: str) -> str:
    """``path`` as a folder (created when missing, with its parents); a link or a file there is refused."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        os.mkdir(path, 0o777)
    except FileExistsError:
        mode = os.lstat(path).st_mode
        if not stat.S_ISDIR(mode):
            what = "a link" if stat.S_ISLNK(mode) else "not a folder"
            raise LinkedRunFolder(f"{path} is {what}: refusing to write into it") from None
    return path


def open_fd(path: str, flags: int, mode: int = 0o644) -> int:
    """``os.open`` that refuses a link (naming the file) and that no child program inherits."""
    try:
        return os.open(path, flags | _CREATE, mode)
    except OSError as e:
        if _is_link(path):
            raise LinkedRunFolder(f"{path} is a link: refusing to write through it") from None
        raise e


@contextlib.contextmanager
def write_replacing(path: str, binary: bool = False, sync: bool = False) -> Iterator[IO]:
    """A file written whole: into a fresh name next to ``path``, renamed over it when the block ends
    (a link at ``path`` is replaced, not followed; a reader never sees half a file). An error leaves
    ``path`` as it was and removes the fresh file. ``sync``: the contents reach the disk before the
    rename (the caller syncs the folder), so a crash leaves the old file or the whole new one."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)  # a leftover of a killed writer with this PID (unlink removes a link, not its target)
    fd = open_fd(tmp, os.O_WRONLY | os.O_EXCL)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            yield f
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno in STORAGE_FULL and not e.filename:
            e.filename = path  # a write through the file object names no file: the message names the user's
        raise


def open_append(path: str) -> IO[str]:
    """``path`` opened to append lines (created when missing). A hard-linked file is first copied to
    a file of its own, so that the other names keep their contents."""
    fd = open_fd(path, os.O_WRONLY | os.O_APPEND)
    if os.fstat(fd).st_nlink > 1:
        os.close(fd)
        with write_replacing(path, binary=True) as out, open(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), "rb") as old:
            shutil.copyfileobj(old, out)
        fd = open_fd(path, os.O_WRONLY | os.O_APPEND)
    return os.fdopen(fd, "a", buffering=1)
