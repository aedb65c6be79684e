"""Files and folders written whole or not at all: a temp file (or folder) beside the target, then a rename (a
reader never sees half of one; a killed writer leaves at most a temp file or folder, which clear_torn_writes
clears), JSON read back with a one-line error, and a check that a folder can be written before the work that ends
in writing there."""

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
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


@contextlib.contextmanager
def folder_written_whole(folder: str) -> Iterator[str]:
    """The block writes a folder's files into the temp folder this yields (.tmp_NAME_PID beside it), which then takes
    the folder's name; a folder of that name is moved aside first (.old_NAME_PID) and deleted once replaced. An
    exception deletes the temp folder and leaves the folder as it was."""
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".tmp_{os.path.basename(folder)}_{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        old = None
        if os.path.exists(folder):
            old = os.path.join(parent, f".old_{os.path.basename(folder)}_{os.getpid()}")
            os.replace(folder, old)
        os.replace(tmp, folder)
        if old:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def clear_torn_writes(folder: str) -> None:
    """Clear what writers killed mid-write left in `folder`: temp folders of folder_written_whole (.tmp_NAME_PID) and
    temp files of atomic_write_bytes (NAME.tmpPID). A folder moved aside to be replaced (.old_NAME_PID) goes back to
    its name when the kill came before its replacement took that name, and is deleted when it came after."""
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        old = re.fullmatch(r"\.old_(.+)_\d+", name)
        if old and not os.path.exists(os.path.join(folder, old.group(1))):
            os.replace(path, os.path.join(folder, old.group(1)))
        elif old or name.startswith(".tmp_"):
            shutil.rmtree(path)
        elif re.search(r"\.tmp\d+$", name):
            os.remove(path)


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
