"""NanoGPT-style token shards: the file format, the manifest, and the distributed loader.

A shard is 256 int32 header values ([0]=20240520 magic, [1]=1 version, [2]=ntok, rest 0)
followed by ntok uint16 token ids. `python -m common.shards verify DIR` re-hashes every
shard against DIR/manifest.json.
"""

import glob
import hashlib
import os
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np

from common.config import fail
from common.files import atomic_write_bytes, read_json

if TYPE_CHECKING:  # torch is imported where it is used, so that prepare.py starts without it
    import torch

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
MANIFEST = "manifest.json"


class ShardError(ValueError):
    """A shard or manifest that cannot be used; the message names the file and the fix."""


def write_shard(path: str, tokens: np.ndarray | list[int]) -> dict:
    """Write uint16 tokens as a shard, atomically. Returns {"ntok", "bytes", "sha256"}."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() > 65535):
        raise ShardError(f"{path}: token ids must fit in uint16 (0..65535), got max {int(tokens.max())}")
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[0], header[1], header[2] = MAGIC, VERSION, tokens.size
    body = tokens.astype(np.uint16, copy=False)
    sha = atomic_write_bytes(path, [header.tobytes(), body.tobytes()])
    return {"ntok": int(tokens.size), "bytes": HEADER_BYTES + 2 * int(tokens.size), "sha256": sha}


def read_shard(path: str) -> np.ndarray:
    """Validate a shard's header and size and return its tokens as a read-only uint16 memory map."""
    hint = "re-run the prepare.py command that wrote it (it redoes damaged shards)"
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            header = np.frombuffer(f.read(HEADER_BYTES), dtype=np.int32)
    except OSError as e:
        raise ShardError(f"{path}: cannot read shard ({e.strerror}); {hint}") from None
    if header.size < HEADER_INTS:
        raise ShardError(f"{path}: truncated header ({size} bytes, need {HEADER_BYTES}); {hint}")
    if header[0] != MAGIC:
        raise ShardError(f"{path}: wrong magic {header[0]} (want {MAGIC}): not a token shard; {hint}")
    if header[1] != VERSION:
        raise ShardError(f"{path}: unsupported shard version {header[1]} (want {VERSION}); {hint}")
    ntok = int(header[2])
    if size != HEADER_BYTES + 2 * ntok:
        what = "truncated" if size < HEADER_BYTES + 2 * ntok else "has trailing bytes"
        raise ShardError(
            f"{path}: {what}: {size} bytes but header says {ntok} tokens ({HEADER_BYTES + 2 * ntok} bytes); {hint}"
        )
    if ntok == 0:
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype=np.uint16, mode="r", offset=HEADER_BYTES, shape=(ntok,))


def file_sha256(path: str, block: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def load_manifest(data_dir: str) -> dict | None:
    """DATA_DIR/manifest.json, checked to have the structure prepare.py writes; None when there is none."""
    path = os.path.join(data_dir, MANIFEST)
    if not os.path.exists(path):
        return None
    remedy = f"the manifest is damaged: delete {data_dir} and run prepare.py again"
    manifest = read_json(path, remedy, ShardError)
    splits = manifest.get("splits") if isinstance(manifest, dict) else None
    if not isinstance(splits, dict):
        raise ShardError(f"{path}: no 'splits' object; {remedy}")
    for name, split in splits.items():
        entries = split.get("shards") if isinstance(split, dict) else None
        if not isinstance(entries, list):
            raise ShardError(f"{path}: split {name!r} has no 'shards' list; {remedy}")
        for k, s in enumerate(entries):
            if not (
                isinstance(s, dict)
                and isinstance(s.get("file"), str)
                and isinstance(s.get("sha256"), str)
                and isinstance(s.get("ntok"), int)
                and isinstance(s.get("bytes"), int)
            ):
                raise ShardError(
                    f"{path}: shard {k} of split {name!r} is not a {{file, ntok, bytes, sha256}} entry; {remedy}"
                )
    return manifest


def shard_files(data_dir: str, split: str) -> list[str]:
    """The shard paths of a split ('train'/'val'), in order: from the manifest when there is one,
    else every *{split}_*.bin file in the folder."""
    manifest = load_manifest(data_dir)
    if manifest is not None:
        if split not in manifest.get("splits", {}):
            raise ShardError(f"{os.path.join(data_dir, MANIFEST)}: no '{split}' split; re-run prepare.py")
        files = [os.path.join(data_dir, s["file"]) for s in manifest["splits"][split]["shards"]]
    else:
        files = sorted(glob.glob(os.path.join(data_dir, f"*{split}_*.bin")))
    if not files:
        raise ShardError(f"{data_dir}: no {split} shards found; run `python prepare.py --out-dir {data_dir}` first")
    return files


def verify(data_dir: str) -> list[str]:
    """Re-hash every shard against the manifest. Returns a list of problems (empty when all match)."""
    manifest = load_manifest(data_dir)
    if manifest is None:
        return [f"{os.path.join(data_dir, MANIFEST)}: missing; run prepare.py to write it"]
    problems = []
    for split, info in manifest["splits"].items():
        for s in info["shards"]:
            path = os.path.join(data_dir, s["file"])
            try:
                tokens = read_shard(path)
            except ShardError as e:
                problems.append(str(e))
                continue
            if len(tokens) != s["ntok"]:
                problems.append(f"{path}: {len(tokens)} tokens, manifest says {s['ntok']}")
            elif file_sha256(path) != s["sha256"]:
                problems.append(f"{path}: sha256 differs from the manifest (corrupted or replaced)")
    return problems


class TokenLoader:
    """The flat token stream over a list of shards, cut into (x, y) batches of shape (B, T).

    Each step the ranks together take world_size consecutive windows of B*T+1 tokens; rank r
    takes window r, so ranks never see the same tokens. When the current shard cannot supply
    a whole step the loader moves to the next shard (wrapping around after the last).
    `state()`/`load_state()` save and restore the position exactly."""

    def __init__(
        self,
        files: Iterable[str],
        batch_size: int,
        seq_len: int,
        rank: int = 0,
        world_size: int = 1,
        vocab_size: int | None = None,
    ) -> None:
        self.files, self.B, self.T = list(files), batch_size, seq_len
        self.rank, self.world_size, self.vocab_size = rank, world_size, vocab_size
        self.step_tokens = batch_size * seq_len * world_size
        self._checked = set()
        self.reset()

    def _open(self, index):
        path = self.files[index]
        tokens = read_shard(path)
        if len(tokens) < self.step_tokens + 1:
            raise ShardError(
                f"{path}: {len(tokens)} tokens, fewer than one step needs "
                f"(batch {self.B} x seq {self.T} x {self.world_size} ranks + 1 = {self.step_tokens + 1}); "
                f"lower BATCH_SIZE/SEQ_LEN or prepare bigger shards"
            )
        if self.vocab_size is not None and index not in self._checked:
            top = int(tokens.max())
            if top >= self.vocab_size:
                raise ShardError(
                    f"{path}: token id {top} is outside the model's vocabulary ({self.vocab_size}); "
                    f"these shards were made with another tokenizer: re-run prepare.py with this model"
                )
            self._checked.add(index)
        return tokens

    def reset(self) -> None:
        self.load_state({"shard": 0, "pos": 0})

    def state(self) -> dict[str, int]:
        return {"shard": self.shard, "pos": self.pos}

    def load_state(self, state: dict[str, int]) -> None:
        self.shard, self.pos = int(state["shard"]), int(state["pos"])
        self.tokens = self._open(self.shard)

    def next_batch(self) -> "tuple[torch.Tensor, torch.Tensor]":
        """Return (x, y) int64 tensors of shape (B, T) on the CPU."""
        import torch  # here, so that prepare.py (shard writing only) starts without loading torch

        if self.pos + self.step_tokens + 1 > len(self.tokens):
            self.shard = (self.shard + 1) % len(self.files)
            self.pos = 0
            self.tokens = self._open(self.shard)
        start = self.pos + self.rank * self.B * self.T
        buf = torch.from_numpy(self.tokens[start : start + self.B * self.T + 1].astype(np.int64))
        self.pos += self.step_tokens
        return buf[:-1].view(self.B, self.T), buf[1:].view(self.B, self.T)


def val_batches(
    data_dir: str,
    val_tokens: int,
    batch_size: int,
    seq_len: int,
    rank: int = 0,
    world_size: int = 1,
    vocab_size: int | None = None,
) -> "list[tuple[torch.Tensor, torch.Tensor]]":
    """The first `val_tokens` of the val shards as this rank's (x, y) batches, on the CPU."""
    per_step = batch_size * seq_len * world_size
    if val_tokens < per_step:
        raise ValueError(
            f"VAL_TOKENS={val_tokens} is less than one batch ({batch_size} x {seq_len} x {world_size} "
            f"rank(s) = {per_step} tokens); raise --val-tokens or lower --batch-size/--seq-len"
        )
    loader = TokenLoader(shard_files(data_dir, "val"), batch_size, seq_len, rank, world_size, vocab_size)
    return [loader.next_batch() for _ in range(val_tokens // per_step)]


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[0] != "verify":
        usage = "usage: python -m common.shards verify DATA_DIR  (re-hashes every shard against DATA_DIR/manifest.json)"
        if argv in (["--help"], ["-h"]):
            print(usage)
            sys.exit(0)
        fail(usage)
    try:
        problems = verify(argv[1])
    except ShardError as e:
        fail(str(e))
    for p in problems:
        print(p, file=sys.stderr)
    if problems:
        fail(
            f"{argv[1]}: {len(problems)} problem(s) with the shards; re-run the prepare.py command that wrote "
            f"them: it re-hashes every shard and redoes the damaged ones"
        )
    manifest = load_manifest(argv[1])
    counts = ", ".join(
        f"{k}: {len(v['shards'])} shards, {sum(s['ntok'] for s in v['shards']):,} tokens"
        for k, v in manifest["splits"].items()
    )
    print(f"{argv[1]}: all shards match the manifest ({counts})")


if __name__ == "__main__":
    main(sys.argv[1:])
