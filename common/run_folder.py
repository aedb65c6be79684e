"""The run folder of train.py and distill.py: its name, its lock, its start and resume, and its checkpoints.

A run folder holds run.json (run id, script, resolved config), the run's metrics and its checkpoints (folders with
a meta.json, common/checkpoint.py). The run that uses it holds an flock on its run.lock for the whole of its life,
so a second run on the same folder is refused; a killed holder releases it. A resumed run first clears what a
killed one left half-written, and refuses constants that changed since it started.
"""

import fcntl
import fnmatch
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Iterable

import torch.distributed as dist

from common.files import clear_torn_writes, read_json, write_json_atomic
from common.runtime import Runtime

LOCK = "run.lock"  # flock'ed by the process running the folder, holds that process's pid


def folder_name(rt: Runtime, out_dir: str, script: str) -> str:
    """out_dir, or when empty a new runs/<script>_<date>_<time>, named by rank 0 for every rank (ranks that named it
    each would differ where their clocks cross a second)."""
    name = out_dir or os.path.join("runs", time.strftime(f"{script}_%Y%m%d_%H%M%S"))
    if rt.ddp:
        box = [name]
        dist.broadcast_object_list(box)
        name = box[0]
    return name


_held = {}  # real path of each run folder this process holds -> its lock file descriptor


def lock_run(out_dir: str) -> None:
    """Hold an exclusive lock on a run folder for the rest of this process's life (flock on OUT/run.lock: a
    killed holder releases it at once). Raises ValueError naming the holder's pid when another process holds it."""
    path = os.path.join(out_dir, LOCK)
    held = _held.get(os.path.realpath(out_dir))
    if held is not None and os.path.exists(path) and os.path.samestat(os.fstat(held), os.stat(path)):
        return  # this process holds it already (a folder deleted and made anew needs a new lock)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise ValueError(
            f"{out_dir}: in use by another run (pid {holder}); wait for it to end or stop it, "
            f"or choose another --out-dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[os.path.realpath(out_dir)] = fd  # never closed: closing would release the lock


def start_run(out_dir: str, resume: bool, script: str, config: dict, scratch: Iterable[str] = ()) -> dict:
    """Create or reopen a run folder and lock it (lock_run). A new run creates the folder atomically, refusing
    one that holds files, and writes run.json (run id, script, config); a resumed run needs a run.json written
    by the same script and has what a killed run left half-written cleared (clear_torn; `scratch`: the script's own
    scratch files, as glob patterns). Returns run.json's contents; raises ValueError with a one-line message."""
    run_file = os.path.join(out_dir, "run.json")
    if resume:
        if not os.path.exists(run_file):
            raise ValueError(
                f"{out_dir}: no run.json, so there is no run to resume here; drop --resume to start a new run"
            )
        lock_run(out_dir)
        run = read_json(run_file, "the run folder is damaged; start a new run in another --out-dir")
        if run.get("script") != script:
            raise ValueError(
                f"{out_dir}: this run was written by {run.get('script')}, not {script}; "
                f"resume it with that script or choose another --out-dir"
            )
        clear_torn(out_dir, scratch)
        return run
    if os.path.exists(os.path.join(out_dir, LOCK)):
        lock_run(out_dir)  # a run going on in it is refused with its pid
    if holds_files(out_dir):  # checked before the lock too, so that a folder of other files is left untouched
        raise ValueError(
            f"{out_dir}: already holds files of another run; pass --resume to continue it, or choose a new --out-dir"
        )
    os.makedirs(os.path.dirname(os.path.abspath(out_dir)), exist_ok=True)
    try:
        os.mkdir(out_dir)  # atomic: of two runs starting at once, at most one creates it
    except FileExistsError:
        pass
    lock_run(out_dir)
    if holds_files(out_dir):  # another run took it between the check above and the lock
        raise ValueError(f"{out_dir}: another run started in it just now; choose a new --out-dir")
    run = {"run_id": uuid.uuid4().hex[:12], "script": script, "config": config}
    write_json_atomic(run_file, run)
    return run


def holds_files(out_dir: str) -> bool:
    return os.path.isdir(out_dir) and any(name != LOCK for name in os.listdir(out_dir))


def clear_torn(out_dir: str, scratch: Iterable[str] = ()) -> None:
    """Clear what a run killed mid-write leaves in its folder: temp checkpoint folders and temp files of atomic
    writes (common.files.clear_torn_writes, which also puts back a checkpoint moved aside to be replaced), and the
    script's scratch files, those whose names match a glob pattern of `scratch` (distill.py's disk latent caches)."""
    clear_torn_writes(out_dir)
    for name in os.listdir(out_dir):
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in scratch):
            os.remove(os.path.join(out_dir, name))


def check_unchanged(saved: dict, config: dict, may_change: set[str], source: str) -> list[str]:
    """Refuse (ValueError) to resume a run with constants that differ from those it was started with (`saved`,
    read from `source`), except those named in `may_change`: one line naming each changed constant with its old
    and new value. Constants the run did not record (added to the script later) are not compared.
    Returns the changes it allows, as 'NAME old -> new'."""
    config = json.loads(json.dumps(config, default=str))  # compare as stored: tuples as lists, and so on
    changed = [(k, saved[k], v) for k, v in config.items() if k in saved and saved[k] != v]
    refused = [f"{k} {old!r} -> {new!r}" for k, old, new in changed if k not in may_change]
    if refused:
        raise ValueError(
            f"{source}: this run's result depends on constants changed since it started "
            f"({'; '.join(refused)}); resume with the run's values, or start a new run in another "
            f"--out-dir"
        )
    return [f"{k} {old!r} -> {new!r}" for k, old, new in changed]


def list_checkpoints(out_dir: str, phase: str | None = None, damaged: list[str] | None = None) -> list[str]:
    """Complete checkpoint folders of a run, oldest first by their recorded step. A folder whose meta.json cannot
    be read is left out (and appended to the list `damaged`, when given)."""
    found = []
    for name in os.listdir(out_dir) if os.path.isdir(out_dir) else []:
        path = os.path.join(out_dir, name)
        if name.startswith(".") or not os.path.isfile(os.path.join(path, "meta.json")):
            continue
        try:
            meta = read_json(os.path.join(path, "meta.json"), "")
            step = int(meta["step"])
        except (ValueError, TypeError, KeyError):
            if damaged is not None:
                damaged.append(path)
            continue
        if phase is None or meta.get("phase") == phase:
            found.append((step, path))
    return [p for _, p in sorted(found)]


def latest_checkpoint(out_dir: str, phase: str | None = None) -> str | None:
    """The newest complete checkpoint of the phase, passing over (and naming on stderr) damaged ones."""
    damaged = []
    found = list_checkpoints(out_dir, phase, damaged)
    for path in damaged:
        print(
            f"{path}: unreadable meta.json, so this checkpoint is passed over (delete it); using the newest good one",
            file=sys.stderr,
        )
    return found[-1] if found else None


def prune_checkpoints(out_dir: str, phase: str, keep_last: int, spare: Iterable[str] = ()) -> None:
    """Delete all but the newest `keep_last` checkpoints of the phase (0 keeps every one), never those whose folder
    names are in `spare`."""
    if keep_last > 0:
        for old in list_checkpoints(out_dir, phase)[:-keep_last]:
            if os.path.basename(old) not in spare:
                shutil.rmtree(old)
