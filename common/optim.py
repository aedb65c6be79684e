"""The optimizer step of train.py and distill.py: AdamW, the learning-rate schedule, the gradient all-reduce
distill.py does by hand, and gradient clipping (sharded parameters included)."""

import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from common.runtime import Runtime


def adamw(
    params: list[torch.Tensor],
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.95),
    matrices_only: bool = False,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW with decoupled weight decay on every parameter (one param group), or with `matrices_only` on the
    matrices alone, not on norms and biases (two param groups: matrices, then the rest). `fused`: AdamW's fused
    kernels (GPUs)."""
    groups = [{"params": params, "weight_decay": weight_decay}]
    if matrices_only:
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)


def lr_at(
    step: int,
    total: int,
    peak: float,
    warmup: int,
    schedule: str = "cosine",
    min_lr_ratio: float = 0.1,
    decay_frac: float = 0.2,
) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total`: linear warmup, then
    cosine decay to min_lr_ratio*peak ('cosine') or hold then linear decay over the last
    decay_frac of the steps ('wsd', warmup-stable-decay). A pure function of the step, so
    resume needs nothing but the step and a new phase starts its own schedule."""
    if step < warmup:
        return peak * (step + 1) / warmup
    min_lr = peak * min_lr_ratio
    if schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return min_lr + 0.5 * (peak - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))
    if schedule == "wsd":
        decay_steps = max(1, int(total * decay_frac))
        decay_start = total - decay_steps
        if step < decay_start:
            return peak
        return peak - (peak - min_lr) * min(1.0, (step - decay_start + 1) / decay_steps)
    if schedule == "constant":
        return peak
    raise ValueError(f"unknown LR schedule {schedule!r}: use cosine, wsd or constant")


def step_optimizer(
    rt: Runtime,
    optimizer: torch.optim.Optimizer,
    groups: list[list[torch.Tensor]],
    lr: float,
    grad_clip: float,
    reduced: bool = False,
) -> list[torch.Tensor]:
    """One optimizer step: average the gradients over the ranks (sync_grads; not when `reduced`: DDP and FSDP
    reduce them in backward), clip each group's gradient norm to grad_clip on its own (0: no clipping), set the LR,
    step and zero the gradients. Returns each group's gradient norm before clipping (a tensor: no host sync)."""
    if not reduced:
        sync_grads(rt, [p for g in groups for p in g])
    norms = [clip_grad_norm(g, grad_clip if grad_clip > 0 else math.inf) for g in groups]
    for g in optimizer.param_groups:
        g["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norms


def sync_grads(rt: Runtime, params: list[torch.Tensor], bucket_numel: int = 2**24) -> None:
    """Average gradients over ranks once per optimizer step, in flat buckets of ~64 MB (fp32). distill.py's students
    are swapped into the teacher's modules (and its logits phase trains them there), which DistributedDataParallel
    cannot wrap, so their gradients are averaged here, where train.py leaves it to DDP."""
    if not rt.ddp:
        return
    grads = [p.grad for p in params]
    while grads:
        n, size = 0, 0
        while n < len(grads) and (n == 0 or size + grads[n].numel() <= bucket_numel):
            size += grads[n].numel()
            n += 1
        bucket, grads = grads[:n], grads[n:]
        flat = torch.cat([g.flatten() for g in bucket])
        dist.all_reduce(flat)
        flat /= rt.world_size
        for g, f in zip(bucket, flat.split([g.numel() for g in bucket])):
            g.copy_(f.view_as(g))


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_, sharded parameters included (the norm of DTensor gradients is reduced over
    the ranks); returns the total norm before clipping as a plain tensor."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm
