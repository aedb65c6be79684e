"""The teacher's residual stream for a fixed set of sequences, advanced one layer at a time: what makes
distill.py's rotation cost O(L) teacher layer-forwards per token (it never reruns earlier layers, and never
runs later layers or the head). The cache lives on the device, in host memory or in a disk memory map;
batches move to the device as they are used."""

import os
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn as nn

from common.kd import final_hidden
from common.runtime import Runtime
from common.swap import LayerCalls, block_input, embed, run_layer, swapped

PLACES = ("device", "host", "disk")


def free_bytes(where: str, rt: Runtime, disk_dir: str) -> int:
    """Bytes free on the device, in host memory (MemAvailable), or on the disk holding disk_dir."""
    if where == "device" and rt.device.type == "cuda":
        return torch.cuda.mem_get_info(rt.device)[0]
    if where in ("device", "host"):
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    st = os.statvfs(disk_dir)
    return st.f_bavail * st.f_frsize


def cache_bytes(n_tokens: int, hidden_size: int, corrected: bool = False, final_tokens: int = 0) -> int:
    """Bytes of a cache of n_tokens, fp32: h and x, with corrected=True the teacher's stream and the correction, and
    the teacher's final hidden states for final_tokens of them."""
    return ((4 if corrected else 2) * n_tokens + final_tokens) * 4 * hidden_size


def place_cache(
    rt: Runtime,
    n_tokens: int,
    hidden_size: int,
    choice: str,
    disk_dir: str,
    corrected: bool = False,
    final_tokens: int = 0,
) -> str:
    """Where a cache of n_tokens (per rank) lives: `choice` (device, host or disk), or with choice 'auto' the
    device when it fits, else host memory, else a disk memory map in disk_dir. Raises ValueError when it fits
    nowhere, saying its size and where it was tried (the caller adds what makes its cache smaller)."""
    nbytes = cache_bytes(n_tokens, hidden_size, corrected, final_tokens)
    size = f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"
    options = PLACES if choice == "auto" else (choice,)
    for where in options:
        if nbytes < 0.7 * free_bytes(where, rt, disk_dir):
            rt.print(f"latent cache: {size} per rank on {where}" + (f" ({rt.device})" if where == "device" else ""))
            return where
    raise ValueError(f"the latent cache needs {size} per rank and fits in none of: {', '.join(options)}")


def _buffer(rt: Runtime, where: str, shape: tuple, path: str) -> torch.Tensor:
    if where == "device":
        return torch.empty(shape, device=rt.device)
    if where == "host":
        return torch.empty(shape, pin_memory=rt.device.type == "cuda")
    return torch.from_numpy(np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape))


class LatentCache:
    """h: the residual stream for `tokens` (n, T, kept as `self.tokens`) at the input of layer `self.layer`; after
    split(), x: the latent that layer's target block sees. Every layer is computed by the model's own layer forward,
    called as the model calls it (`calls`, a LayerCalls for the target). Batches of `batch_size` sequences go to the
    device as they are used. With where='disk' the buffers live in memory maps at `{file_prefix}_{part}_rank{rank}.npy`.

    h is the teacher's stream, or, where split() and finish() are given students, the stream through them. With
    corrected=True the cache also carries the teacher's own stream (ht) beside it, and split() with a student
    stores d: the teacher stream's layer output minus this stream's layer output with the teacher's block. The
    target a student is fit to, target(), is then the teacher block's output on x plus d: what the block must add
    for the layer's output to be the teacher's, so later students also undo the drift of the earlier ones (exact
    where the block's output is added to the residual last, the FFN of a pre-norm layer).

    With final_sequences, `final` holds the teacher's final hidden states (what its LM head sees) for that many
    sequences from the start: the teacher's side of DECODER_LOSS=kl, one forward per rotation."""

    def __init__(
        self,
        rt: Runtime,
        model: nn.Module,
        tokens: torch.Tensor,
        calls: LayerCalls,
        batch_size: int,
        where: str,
        file_prefix: str,
        corrected: bool = False,
        final_sequences: int = 0,
    ):
        self.rt, self.model, self.calls, self.batch_size, self.tokens = rt, model, calls, batch_size, tokens
        n, seq_len = tokens.shape
        shape = (n, seq_len, model.config.hidden_size)
        parts = "hxtd" if corrected else "hx"
        self.paths = [f"{file_prefix}_{part}_rank{rt.rank}.npy" for part in parts]
        buffers = [_buffer(rt, where, shape, path) for path in self.paths]
        self.h, self.x = buffers[:2]
        self.ht, self.d = buffers[2:] if corrected else (None, None)
        self.final = None
        if final_sequences:
            self.paths.append(f"{file_prefix}_f_rank{rt.rank}.npy")
            self.final = _buffer(rt, where, (final_sequences, *shape[1:]), self.paths[-1])
            for s in range(0, final_sequences, batch_size):
                with torch.no_grad(), rt.autocast():
                    ids = tokens[s : min(s + batch_size, final_sequences)].to(rt.device)
                    self.final[s : s + len(ids)].copy_(final_hidden(model, ids))
        self.layer = 0  # h is the input to this layer
        self.advanced = False  # split() already moved h past this layer through the teacher's block
        self.teacher_advanced = False  # split() already moved ht past this layer
        for s in range(0, n, batch_size):
            self.h[s : s + batch_size].copy_(embed(model, tokens[s : s + batch_size].to(rt.device)))
        if corrected:
            self.ht.copy_(self.h)

    def batches(self, buffer: torch.Tensor, n: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """(start, batch on the device) over the first n sequences (default all) of a cache buffer."""
        n = len(buffer) if n is None else n
        for s in range(0, n, self.batch_size):
            yield s, buffer[s : min(s + self.batch_size, n)].to(self.rt.device, non_blocking=True)

    def run_block(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """A block (the teacher's or a student) on latents x of this layer, called as the layer calls its block."""
        return self.calls.block(self.layer, x.shape[:2])(block, x)

    def target(self, block: nn.Module, start: int, x: torch.Tensor) -> torch.Tensor:
        """What a student is fit to on the batch of latents x at sequence `start`: the teacher's block on x,
        plus the correction d with corrected=True."""
        y = self.run_block(block, x)
        return y if self.d is None else y + self.d[start : start + len(x)].to(self.rt.device, non_blocking=True)

    @torch.no_grad()
    def split(self, stream_block: nn.Module | None = None) -> None:
        """x <- the latent into this layer's target block. When the stream goes on through the teacher's block
        (stream_block None), the same pass moves h past the layer, and finish() has nothing left to compute.
        With corrected=True and a student, it also moves ht past the layer and stores the correction d."""
        correct = self.d is not None and stream_block is not None
        for s, hb in self.batches(self.h):
            n = len(hb)
            with self.rt.autocast():
                if stream_block is None or correct:
                    seen = {}
                    out = run_layer(self.model, self.calls, self.layer, hb, lambda x, y: seen.update(x=x))
                    self.x[s : s + n].copy_(seen["x"])  # first: x may be hb itself, a view of h (OLMo 2)
                    if correct:
                        teacher_out = run_layer(self.model, self.calls, self.layer, self.ht[s : s + n].to(hb.device))
                        self.d[s : s + n].copy_(teacher_out - out)
                        self.ht[s : s + n].copy_(teacher_out)
                    else:
                        self.h[s : s + n].copy_(out)
                else:
                    self.x[s : s + n].copy_(block_input(self.model, self.calls, self.layer, hb))
        self.advanced = stream_block is None
        self.teacher_advanced = correct

    @torch.no_grad()
    def finish(self, block: nn.Module | None = None) -> None:
        """h <- this layer's output with `block` in its slot (default: the teacher's); move to the next layer."""
        assert block is None or not self.advanced, "split() moved h on through the teacher's block already"
        if block is not None or not self.advanced:
            with swapped(self.model, {(self.layer, self.calls.target): block} if block is not None else {}):
                for s, hb in self.batches(self.h):
                    with self.rt.autocast():
                        self.h[s : s + len(hb)].copy_(run_layer(self.model, self.calls, self.layer, hb))
        if self.ht is not None and not self.teacher_advanced:
            for s, hb in self.batches(self.ht):
                with self.rt.autocast():
                    self.ht[s : s + len(hb)].copy_(run_layer(self.model, self.calls, self.layer, hb))
        self.layer += 1
        self.advanced = self.teacher_advanced = False

    def advance_to(self, layer_index: int, blocks: dict | None = None) -> None:
        """Advance to layer_index through the teacher's blocks, or those in `blocks` ({layer: block})."""
        while self.layer < layer_index:
            block = (blocks or {}).get(self.layer)
            if block is None:
                self.split()
            self.finish(block)

    def split_at(self, layer_index: int, blocks: dict | None = None) -> None:
        """advance_to(layer_index, blocks), then split: x is that layer's latent."""
        self.advance_to(layer_index, blocks)
        self.split((blocks or {}).get(layer_index))

    def close(self) -> None:
        """Free the buffers and delete their files when the cache lives on disk."""
        del self.h, self.x, self.ht, self.d, self.final
        for path in self.paths:
            if os.path.exists(path):
                os.remove(path)
