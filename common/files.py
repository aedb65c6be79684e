"""Files written whole or not at all: a temp file in the same folder, fsync, then rename (a reader never
sees half a file, a killed writer leaves at most a temp file), JSON read back with a one-line error, and a check
that a folder can be written before the work that ends in writing there."""

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from typing import Any


def atomic_write_bytes(path: str, chunks: Iterable[bytes]) -> str:
    """Write an iterable of byte chunks to path through a temp file and rename; return sha256 hex."""
    tmp = f"{path}.tmp{os.getpid()}"
    h = hashlib.sha256()
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                h.update(chunk)
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return h.hexdigest()


def write_json_atomic(path: str, obj: object) -> None:
    """Write obj as indented JSON through a temp file and rename."""
    atomic_write_bytes(path, [(json.dumps(obj, indent=2, default=str) + "\n").encode()])


def read_json(path: str, remedy: str, error: type[Exception] = ValueError) -> Any:
    """The JSON in path; a file that cannot be read or parsed raises `error`, one line naming it and the remedy."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        reason = e.strerror
    except ValueError as e:  # not UTF-8, or not JSON
        reason = f"not JSON: {e}"
    raise error(f"{path}: unreadable ({reason}); {remedy}")


def check_writable(folder: str) -> None:
    """Raise ValueError, saying why, unless files can be written in `folder`, or where it would be created (its
    nearest existing parent): a temp file is created there and removed at once."""
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"{existing} is a file, not a folder")
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as e:
        raise ValueError(f"cannot write in {existing} ({e.strerror})") from None
