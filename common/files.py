"""Files written whole or not at all: a temp file in the same folder, fsync, then rename (a reader never
sees half a file, a killed writer leaves at most a temp file), and JSON read back with a one-line error."""

import hashlib
import json
import os
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
