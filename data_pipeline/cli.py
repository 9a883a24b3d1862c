"""What every command-line tool does with a mistake of its user (a malformed file, a missing path,
a full disk, a wrong key): one line naming the file or key and the cause, exit status 2, and no
traceback unless ``--debug`` (or ``MEG_DEBUG=1``) asks for one. Any other exception is a bug of
ours and keeps its traceback."""

from __future__ import annotations

import argparse
import errno
import os
import pickle
import subprocess
import sys
import tempfile
from collections.abc import Callable

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a job Ctrl-C ended
MAX_SHOWN = 80  # characters of a user's value quoted in a message


def short_message(error: BaseException, limit: int = 300) -> str:
    """An exception's message for one line of output (its type's name when it has none)."""
    text = str(error).strip() or type(error).__name__
    return text if len(text) <= limit else text[:limit] + "..."


class UserError(Exception):
    """A mistake in what the user gave (a configuration, a data file, a checkpoint): the message names
    the key or the file and what is valid. The project's own error types derive from it."""


class ConfigError(UserError, ValueError):
    """A malformed preset or override, or a setting that cannot work: the message names the key and
    what is valid (re-exported by trainer.config)."""

    key: str | None = None  # the setting it is about, where known (trainer.config names the preset that set it)


class DataError(UserError, RuntimeError):
    """Missing, malformed or inconsistent data: raised before any training starts (re-exported by
    data_pipeline.shards)."""


class CheckpointError(UserError, ValueError):
    """A checkpoint or run folder that cannot be read: the message names the file and what is wrong
    (re-exported by trainer.checkpoint)."""


def shown(value: object, limit: int = MAX_SHOWN) -> str:
    """``repr(value)`` cut to ``limit`` characters: a message never renders a huge value."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}... ({len(text)} characters)"


# A full disk or quota, whatever the file: the machine's state, never a bug (a write through a file
# object names no file).
STORAGE_FULL = (errno.ENOSPC, errno.EDQUOT)


def _is_user_os_error(error: BaseException) -> bool:
    """An OSError about a file the user named (a missing path, permissions): it has an errno and a file
    name; or a full disk. Other OSErrors (a socket's, a library's bare ``OSError("...")``) are not."""
    return isinstance(error, OSError) and bool(error.errno) and (bool(error.filename) or error.errno in STORAGE_FULL)


def user_error_types() -> tuple[type[BaseException], ...]:
    """The exception types that may be a user's mistake (imported here: the formats' are heavy); an
    OSError counts only with an errno and a file name (``is_user_error``)."""
    from safetensors import SafetensorError

    return (UserError, OSError, pickle.UnpicklingError, SafetensorError)


def is_user_error(error: BaseException, extra: tuple[type[BaseException], ...] = ()) -> bool:
    if isinstance(error, OSError):
        return _is_user_os_error(error)
    return isinstance(error, (*user_error_types(), *extra))


class ChildFailed(UserError):
    """A process a tool ran failed: the message is its last stderr line, then the lines before it."""


CHILD_STDERR_TAIL = 20  # lines of a failed child's stderr shown


def run_quietly(cmd: list[str], what: str, **kwargs) -> subprocess.CompletedProcess:
    """Runs ``cmd`` with its output captured (``kwargs``: subprocess.run's); a failure is a ChildFailed that
    names ``what`` and shows the end of its stderr, where the user's mistake is said."""
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or ["(nothing on stderr)"]
        tail = "\n".join("    " + line for line in lines[-CHILD_STDERR_TAIL:-1])
        message = f"{what} failed (exit {result.returncode}): {lines[-1].removeprefix('error: ')}"
        raise ChildFailed(message + (f"\nthe end of its stderr:\n{tail}" if tail else ""))
    return result


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error (or MEG_DEBUG=1)")


# What to do about the OSErrors a user's paths cause, said after the error and its file.
OS_ERROR_FIXES = {
    errno.EISDIR: "a folder is where a file belongs: give a file's path, or move the folder away",
    errno.ENOTDIR: "a file is where a folder belongs: choose another path",
    errno.EACCES: "check its permissions, or choose another path",
    errno.EROFS: "a read-only file system: choose another path",
    errno.ENOSPC: "free some space and run again",
    errno.EDQUOT: "the disk quota is used up: free some space, or choose another path",
}


def describe(error: BaseException) -> str:
    """One line: an OSError's cause, its file and what to do, else the error's own message (a format's
    error, which names no file, with its type)."""
    if isinstance(error, OSError) and error.strerror:
        # A rename's target is the user's file (config.yaml), its source a temporary one (config.yaml.tmp-18555).
        fix, where = OS_ERROR_FIXES.get(error.errno), error.filename2 or error.filename
        return error.strerror + (f": {where}" if where else "") + (f" ({fix})" if fix else "")
    text = str(error).strip() or type(error).__name__
    return text if isinstance(error, UserError) else f"{type(error).__name__}: {text}"


def run_tool(
    body: Callable[[], int],
    debug: bool,
    extra: tuple[type[BaseException], ...] = (),
    memory_advice: str | None = None,
) -> int:
    """``body()``'s exit status; a user's mistake (or one of ``extra``) becomes ``error: ...``, status 2, and
    so does running out of memory where the tool says what size the user asked for to lower (``memory_advice``);
    Ctrl-C is ``interrupted``, status 130. Anything else propagates with its traceback: it is a bug, not the
    user's fault."""
    debug = debug or os.environ.get("MEG_DEBUG") == "1"
    try:
        return body()
    except KeyboardInterrupt:  # Ctrl-C: what the tool was writing it removes on the way out (write_replacing)
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except MemoryError as e:  # numpy's names the size: "Unable to allocate 745. GiB for an array with shape ..."
        if debug or memory_advice is None:
            raise
        print(f"error: out of memory ({short_message(e, 160)}): {memory_advice}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as e:
        if not is_user_error(e, extra) or debug:
            raise
        print(f"error: {describe(e)}", file=sys.stderr)
        return EXIT_USER_ERROR


def _int_at_least(low: int, high: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{shown(text)} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high}, got {value}")
        return value

    parse.__name__ = "positive_int" if low == 1 else "nonnegative_int"  # argparse names it in its errors
    return parse


def int_between(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: a whole number in [low, high]."""
    return _int_at_least(low, high)


# argparse types: a bad value exits 2 with the usage line and e.g. "argument --num: must be at least 1, got -5"
positive_int = _int_at_least(1)
nonnegative_int = _int_at_least(0)


def nonnegative_float(text: str) -> float:
    """An argparse type: a finite number >= 0 (a std, where 0 keeps the default)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{shown(text)} is not a number") from None
    if not 0 <= value < float("inf"):  # NaN too
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def url(text: str) -> str:
    """An argparse type: a path or an fsspec URL whose scheme fsspec knows and can open here (a typo such as
    htp:// or a missing backend package, named at parse time rather than as fsspec's traceback later); a
    leading ~ (quoted past the shell, as a brace pattern is) is the home folder, as in data.url."""
    from data_pipeline.config import check_url, expand_home

    problem = check_url(text)
    if problem:
        raise argparse.ArgumentTypeError(f"{shown(text)}: {problem}")
    return expand_home(text)


def data_folder(text: str) -> str:
    """An argparse type: meg-convert's --out, a url() without what data.url reads as shards: ``::`` (a list,
    or fsspec's chained file systems: the manifest was written as a file named before it) or braces (a pattern)."""
    if "::" in text or "{" in text or "}" in text:
        raise argparse.ArgumentTypeError(
            f"{text}: '::' and braces name shards in data.url (a list, a pattern), so the trainer could not "
            "read a data set here: choose a folder without them"
        )
    return url(text)


def name_part(text: str) -> str:
    """An argparse type: a data set's name or split, part of its shard file names ({name}-{split}-000000.tar):
    letters, digits and - _ . + only (a / or .. wrote the shards outside --out, over what was there)."""
    if not text or text.startswith(".") or not all(c.isalnum() or c in "-_.+" for c in text):
        raise argparse.ArgumentTypeError(
            f"{shown(text)} cannot be part of a file name: use letters, digits, '-', '_', '.' (not first) or '+'"
        )
    return text


def fraction(text: str) -> float:
    """An argparse type: a share strictly between 0 and 1 (a split's, an anomaly rate's)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{shown(text)} is not a number") from None
    if not 0 < value < 1:  # NaN too
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (both excluded), got {text}")
    return value


# The figure formats a user may ask for by a path's suffix (meg-sample --out); no suffix is PNG.
FIGURE_FORMATS = {".png": "png", ".pdf": "pdf", ".svg": "svg"}


def nearest_existing(path: str) -> str:
    """The absolute path of ``path`` or of its nearest ancestor that exists (a dangling link counts: it is
    there, and no folder can be made through it): what decides whether a file or folder can be made there."""
    existing = os.path.abspath(path)
    while not os.path.lexists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    return existing


def cannot_write_in(folder: str) -> str | None:
    """Why no file can be made in the existing ``folder`` (a read-only mount, /proc, no permission), or
    None: found by making one, as permissions do not tell (root passes os.access everywhere)."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return None
    except OSError as e:
        return f"refuses new files: {e.strerror or type(e).__name__}"


def unwritable(path: str) -> str | None:
    """Why nothing can be made at ``path`` (a file or folder still to be made), naming the nearest existing
    folder that refuses it ("FOLDER refuses new files: ..."), or None. A file in the way is left to
    the caller's own check."""
    folder = nearest_existing(path)
    problem = cannot_write_in(folder) if os.path.isdir(folder) else None
    return f"{folder} {problem}" if problem else None


def check_output_file(path: str, flag: str, formats: dict[str, str] | None = None) -> None:
    """Refuses, before any work, an output file path that cannot be written: an existing folder, or
    one under an existing file or in a folder no file can be made in, a device or pipe (it was replaced
    by a regular file), or a suffix not in ``formats`` (when given; no suffix passes). A missing parent
    folder is fine (the tool creates it)."""
    if os.path.isdir(path) or path.endswith(("/", os.sep)):
        raise UserError(f"{flag} {path} is a folder: give the path of a file in it")
    if os.path.exists(path) and not os.path.isfile(path):
        raise UserError(f"{flag} {path} is not a regular file (a device, pipe or socket): give the path of a file")
    parent = nearest_existing(os.path.dirname(os.path.abspath(path)))
    if not os.path.isdir(parent):
        raise UserError(f"{flag} {path}: {parent} is a file, not a folder: choose another path")
    problem = cannot_write_in(parent)
    if problem:
        raise UserError(f"{flag} {path}: cannot write there ({parent} {problem}): choose another path")
    suffix = os.path.splitext(path)[1].lower()
    if formats is not None and suffix and suffix not in formats:
        raise UserError(f"{flag} {path}: {suffix} is not a format it writes; end the name in {', '.join(formats)}")
