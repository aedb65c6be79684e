"""What train.py and distill.py share about running: torchrun's environment, the device and its
precision, what the run folder records (versions, the code's commit, metrics.jsonl) and the RNG state."""

import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from common.files import atomic_write_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repo: the scripts' folder, common/..
_T = TypeVar("_T")  # master_only's result


class Runtime:
    """rank/world from torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE), the device, and
    the autocast context: bf16 autocast with fp32 master weights on GPUs, plain fp32 on CPU
    (bf16 is emulated there and far slower). `frozen_dtype` is the dtype weights that never train (a frozen
    teacher or backbone) are held in: bf16 on GPUs computing in bf16 (2 bytes a parameter instead of 4), fp32
    elsewhere; trainable weights are always fp32."""

    def __init__(self, device: str = "auto", dtype: str = "auto") -> None:
        self.rank = int(os.environ.get("RANK", 0))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.ddp = self.world_size > 1
        if device == "auto":
            device = f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.ddp:
            dist.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo")
        if dtype == "auto":
            dtype = "bfloat16" if self.device.type == "cuda" else "float32"
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"DTYPE must be float32, bfloat16 or float16, got {dtype!r}")
        self.dtype = getattr(torch, dtype)
        cuda_bf16 = self.device.type == "cuda" and self.dtype == torch.bfloat16
        self.frozen_dtype = torch.bfloat16 if cuda_bf16 else torch.float32
        self.master = self.rank == 0

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def print(self, *args: object, **kwargs: Any) -> None:
        if self.master:
            print(*args, **kwargs, flush=True)

    def all_mean(self, value: float) -> float:
        """Mean of a float across ranks (the value itself without DDP)."""
        if not self.ddp:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item() / self.world_size

    def all_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over ranks in place (nothing without DDP)."""
        if self.ddp:
            dist.all_reduce(tensor)
        return tensor

    def barrier(self) -> None:
        if self.ddp:
            dist.barrier()

    def master_only(self, fn: Callable[..., _T], *args: object) -> _T | None:
        """fn(*args) on rank 0 alone, the other ranks waiting for it. A ValueError or OSError there is raised on
        every rank as a ValueError, so that no rank is left waiting for one that has stopped. Returns fn's result
        on rank 0, None elsewhere."""
        result = error = None
        if self.master:
            try:
                result = fn(*args)
            except (ValueError, OSError) as e:
                error = str(e)
        if self.ddp:
            box = [error]
            dist.broadcast_object_list(box)
            error = box[0]
        if error is not None:
            raise ValueError(error)
        return result

    def close(self) -> None:
        if self.ddp:
            dist.destroy_process_group()

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def peak_flops(self) -> float | None:
        """Dense bf16 peak FLOP/s of the device, where known (for MFU); None otherwise."""
        if self.device.type != "cuda":
            return None
        name = torch.cuda.get_device_name(self.device)
        for key, flops in (
            ("MI300", 1307e12),
            ("MI250", 362e12),
            ("H200", 989e12),
            ("H100", 989e12),
            ("A100", 312e12),
            ("4090", 165e12),
            ("L40", 181e12),
        ):
            if key in name:
                return flops
        return None


def git_state(root: str | None = None) -> tuple[str | None, bool | None]:
    """(HEAD's commit, whether tracked files differ from it) of the repo at root (this one by default), the code a
    run ran; (None, None) without git or outside a git repo."""

    def git(*args):
        return subprocess.run(
            ["git", *args], cwd=root or ROOT, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()

    try:
        return git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):  # no git (FileNotFoundError), not a repo, a timeout
        return None, None


def environment(rt: Runtime) -> dict:
    """Versions, hardware and the code's commit, for the run folder."""
    import transformers

    commit, dirty = git_state()
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "git_commit": commit,
        "git_dirty": dirty,
        "cuda": torch.version.cuda,
        "hip": getattr(torch.version, "hip", None),
        "device": str(rt.device),
        "world_size": rt.world_size,
        "dtype": str(rt.dtype).replace("torch.", ""),
        "host": platform.node(),
        "argv": sys.argv,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if rt.device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(rt.device)
    return info


class RunLog:
    """metrics.jsonl in the run folder, appended by rank 0 only."""

    def __init__(self, rt: Runtime, out_dir: str) -> None:
        self.path = os.path.join(out_dir, "metrics.jsonl") if rt.master else None

    def log(self, **record: object) -> None:
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def trim(self, keep: Callable[[dict], bool]) -> None:
        """Keep only the records for which keep(record) is true: a resumed run drops what it logged after the
        checkpoint it resumes from (it logs them again as it redoes them), and a last line torn by a kill (it has
        no newline)."""
        if self.path and os.path.exists(self.path):
            with open(self.path) as f:
                kept = [line for line in f if line.endswith("\n") and keep(json.loads(line))]
            atomic_write_bytes(self.path, [line.encode() for line in kept])


def get_rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def due(step: int, every: int, last: int | None = None, first: bool = False) -> bool:
    """Whether a training loop logs, validates or saves after `step`, the optimizer steps done (1-based, counted
    after the optimizer step): at every multiple of `every` (0: at none), with `first` at step 1 too (the loss lines:
    the first loss is seen at once), and at step `last` (the loop's final step; None: no step especially)."""
    return (every > 0 and (step % every == 0 or (first and step == 1))) or step == last
