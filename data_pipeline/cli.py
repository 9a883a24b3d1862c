"""What every command-line tool does with a mistake of its user (a malformed file, a missing path,
a full disk, a wrong key): one line naming the file or key and the cause, exit status 2, and no
traceback unless ``--debug`` (or ``MEG_DEBUG=1``) asks for one."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import tarfile
import zlib
from collections.abc import Callable

EXIT_USER_ERROR = 2

# Raised by the project for bad input (DataError, ConfigError, ...) or by the standard library and
# the file formats on a damaged or unreadable file. A RuntimeError of another kind is a bug: it keeps
# its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,  # ConfigError, JSON and Unicode errors, malformed numbers
    OSError,  # missing files, permissions, a full disk, read-only folders, unreadable images
    EOFError,  # truncated gzip
    zlib.error,
    tarfile.TarError,
    pickle.UnpicklingError,
    KeyError,  # a field missing from a data file
)


def user_error_types() -> tuple[type[BaseException], ...]:
    """USER_ERRORS plus the project's own errors and the formats' (imported here: they are heavy)."""
    from safetensors import SafetensorError

    from data_pipeline.shards import DataError

    return (*USER_ERRORS, DataError, SafetensorError)


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error (or MEG_DEBUG=1)")


def describe(error: BaseException) -> str:
    """One line: an OSError's cause and file, a KeyError's key, else the error's own message."""
    if isinstance(error, OSError) and error.strerror:
        where = f": {error.filename}" if error.filename else ""
        return f"{error.strerror}{where}"
    if isinstance(error, KeyError):
        return f"missing field {error}"
    if isinstance(error, json.JSONDecodeError):
        return f"not valid JSON: {error}"
    text = str(error).strip() or type(error).__name__
    return text if isinstance(error, ValueError | RuntimeError) else f"{type(error).__name__}: {text}"


def run_tool(body: Callable[[], int], debug: bool, extra: tuple[type[BaseException], ...] = ()) -> int:
    """``body()``'s exit status; a user's mistake (or one of ``extra``) becomes ``error: ...``, status 2."""
    try:
        return body()
    except (*user_error_types(), *extra) as e:
        if debug or os.environ.get("MEG_DEBUG") == "1":
            raise
        print(f"error: {describe(e)}", file=sys.stderr)
        return EXIT_USER_ERROR
