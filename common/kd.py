"""Logits distillation without the full logits: KL(teacher || student) and cross-entropy computed
from final hidden states and the LM head, a chunk of tokens at a time.

The full B*T*V logits of a 49,152-word vocabulary are 200 KB per token in fp32; the naive loss
keeps several such copies (both models' logits, their log-softmaxes, the gradient). Here each
chunk of `chunk_tokens` tokens is projected, reduced to its loss and turned into its gradients
inside the forward pass (as Liger's fused linear cross-entropy does), so the extra memory is
O(chunk_tokens * V) whatever B*T is. Matmuls run in the autocast dtype when autocast is on;
softmaxes, sums and the head gradient are fp32.

    loss, parts = kd_loss(student_hidden, teacher_hidden, lm_head(model), targets,
                          temperature=2.0, ce_weight=0.1)
    loss.backward()   # gradients for student_hidden (so the student body) and the head weight

Hidden states are what the LM head sees: `final_hidden(model, ids)` (after the final norm). `lm_head(model)`
is the head with the model's own logit transform (Granite's scaling, Cohere's scale, Gemma's softcapping,
a bias), so the loss sees the distribution the model itself predicts.
"""

from typing import NamedTuple

import torch
import torch.nn as nn

CHUNK_TOKENS = 512  # tokens per chunk: ~5 fp32 chunk-by-vocab buffers live at once (~0.5 GB at V=49,152)


class Head(NamedTuple):
    """An LM head as the model applies it: logits = softcap(scale * (h @ weight.T + bias)), where
    softcap(z) = c * tanh(z / c) (Gemma 2/3's final_logit_softcapping), scale = 1 / logits_scaling (Granite) or
    logit_scale (Cohere), and bias is the head's own (None for most models)."""

    weight: torch.Tensor  # (V, d)
    bias: torch.Tensor | None = None
    scale: float = 1.0
    softcap: float | None = None

    def logits(self, h: torch.Tensor, mm: torch.dtype, fp: torch.dtype) -> torch.Tensor:
        """Logits (n, V) in dtype fp for hidden states h (n, d), the matmul in dtype mm."""
        z = h.to(mm) @ self.weight.to(mm).T
        if self.bias is not None:
            z = z + self.bias.to(mm)
        z = z.to(fp)
        if self.scale != 1:
            z.mul_(self.scale)
        if self.softcap:
            z.div_(self.softcap).tanh_().mul_(self.softcap)
        return z


# The logit transforms of the families that have one, read from their configs: (attribute, how it scales).
# Any other transform is caught by check_head, which compares with the model's own logits.
_LOGIT_SCALES = {"logits_scaling": lambda v: 1 / v, "logit_scale": lambda v: v}


def lm_head(model: nn.Module) -> Head:
    """The model's LM head with its final logit transform (scaling, softcapping, bias)."""
    head, config = model.get_output_embeddings(), model.config
    scale = 1.0
    for name, factor in _LOGIT_SCALES.items():
        if getattr(config, name, None) is not None:
            scale *= factor(getattr(config, name))
    return Head(head.weight, getattr(head, "bias", None), scale, getattr(config, "final_logit_softcapping", None))


@torch.no_grad()
def check_head(model: nn.Module, tokens: int = 8) -> None:
    """Raise ValueError unless lm_head(model) applied to final_hidden gives the model's own logits (a family whose
    logit transform this module does not know would otherwise be scored and distilled wrongly). A model held in
    bf16 rounds its own logits to bf16: the tolerance is then a few of its rounding steps."""
    weight = model.get_output_embeddings().weight
    ids = torch.arange(1, tokens + 1, device=weight.device)[None] % model.config.vocab_size
    training = model.training
    model.eval()  # no dropout (GPT-2 has some)
    theirs = model(input_ids=ids, use_cache=False).logits[0].float()
    ours = lm_head(model).logits(final_hidden(model, ids)[0], torch.float32, torch.float32)
    model.train(training)
    tol = 1e-4 if weight.dtype == torch.float32 else 4 * torch.finfo(weight.dtype).eps
    if not torch.allclose(ours, theirs, rtol=tol, atol=tol * max(1.0, theirs.abs().max().item())):
        raise ValueError(
            f"{type(model).__name__}: its logits are not softcap(scale * (hidden @ head.T + bias)) "
            f"(max difference {(ours - theirs).abs().max().item():.3g}); add its logit transform to common/kd.py"
        )


def final_hidden(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The hidden states the LM head sees (B, T, d): the base model's last_hidden_state, which in transformers 5.x
    is already through the final norm, taken from the model's own forward asked for the logits of no position.
    The model's forward and not its base model's, because under FSDP2 (common/parallel.py) the root module's
    forward is what gathers the root's weights (embeddings, final norm, head): the root keeps them whole after its
    forward, so lm_head(model) then gives the whole head to the loss, and reduce-scatters their gradients after
    backward. On a model that is not sharded it is the same computation."""
    seen = []
    hook = model.base_model.register_forward_hook(lambda module, args, out: seen.append(out.last_hidden_state))
    try:
        model(input_ids=ids, use_cache=False, logits_to_keep=torch.empty(0, dtype=torch.long, device=ids.device))
    finally:
        hook.remove()
    return seen[0]


def _dtypes(hidden, weight):
    """(matmul dtype, reduction dtype): the autocast dtype when autocast is on, and at least fp32."""
    dev = hidden.device.type
    mm = (
        torch.get_autocast_dtype(dev)
        if torch.is_autocast_enabled(dev)
        else torch.promote_types(hidden.dtype, weight.dtype)
    )
    return mm, torch.promote_types(mm, torch.float32)


class _ChunkedKD(torch.autograd.Function):
    """Loss and gradients in one chunked pass; backward only scales the stored gradients."""

    @staticmethod
    def forward(ctx, hs, ht, w, b, head, teacher_head, targets, temperature, ce_weight, chunk_tokens, need):
        need_h, need_w, need_b = need
        n_tok, T = hs.shape[0], temperature
        mm, fp = _dtypes(hs, w)
        with torch.autocast(hs.device.type, enabled=False):
            kl_sum = torch.zeros((), dtype=fp, device=hs.device)
            ce_sum = torch.zeros((), dtype=fp, device=hs.device)
            grad_h = torch.empty_like(hs) if need_h else None
            grad_w = torch.zeros(w.shape, dtype=fp, device=w.device) if need_w else None
            grad_b = torch.zeros(b.shape, dtype=fp, device=b.device) if need_b else None
            W = w.to(mm)
            head = head._replace(weight=W, bias=None if b is None else b.to(mm))
            for s in range(0, n_tok, chunk_tokens):
                h = hs[s : s + chunk_tokens].to(mm)
                zs = head.logits(h, mm, fp)
                log_p = teacher_head.logits(ht[s : s + chunk_tokens], mm, fp)
                if T != 1:
                    log_p.div_(T)
                log_p -= log_p.logsumexp(-1, keepdim=True)
                # d logits / d (h W^T + b): the softcap's derivative times the scale
                chain = (
                    None if not any(need) else head.scale * (1 - (zs / head.softcap).square() if head.softcap else 1)
                )
                grad_ce = None
                if targets is not None:
                    y = targets[s : s + chunk_tokens, None]
                    lse = zs.logsumexp(-1, keepdim=True)
                    ce_sum += (lse - zs.gather(-1, y)).sum()
                    if ce_weight and any(need):  # d CE / d z = softmax(z) - onehot(y)
                        grad_ce = (zs - lse).exp_().mul_(ce_weight)
                        grad_ce.scatter_add_(-1, y, torch.full(y.shape, -ce_weight, dtype=fp, device=y.device))
                log_q = zs.div_(T) if T != 1 else zs
                log_q -= log_q.logsumexp(-1, keepdim=True)
                p = log_p.exp()
                kl_sum += torch.dot(p.view(-1), log_p.sub_(log_q).view(-1))
                if any(need):  # d (T^2 KL_T) / d z = T (q - p)
                    g = log_q.exp_().sub_(p).mul_((1 - ce_weight) * T)
                    if grad_ce is not None:
                        g += grad_ce
                    g = g.mul_(chain).div_(n_tok)
                    if need_b:
                        grad_b += g.sum(0)
                    g = g.to(mm)
                    if need_h:
                        grad_h[s : s + chunk_tokens] = g @ W
                    if need_w and mm == fp:
                        grad_w.addmm_(g.T, h)
                    elif need_w:
                        grad_w += (g.T @ h).to(fp)
        ctx.save_for_backward(
            grad_h,
            None if grad_w is None else grad_w.to(w.dtype),
            None if grad_b is None else grad_b.to(b.dtype),
        )
        kl, ce = kl_sum / n_tok, ce_sum / n_tok
        loss = (1 - ce_weight) * T * T * kl + ce_weight * ce
        ctx.mark_non_differentiable(kl, ce)
        return loss, kl, ce

    @staticmethod
    def backward(ctx, grad_loss, _grad_kl, _grad_ce):
        # gradients of a unit loss (not scaled in place: retain_graph)
        grads = [None if g is None else g * grad_loss.to(g.dtype) for g in ctx.saved_tensors]
        return grads[0], None, grads[1], grads[2], *[None] * 7


def _as_head(head: Head | torch.Tensor) -> Head:
    return head if isinstance(head, Head) else Head(head)


def kd_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    head: Head | torch.Tensor,
    targets: torch.Tensor | None = None,
    temperature: float = 1.0,
    ce_weight: float = 0.0,
    teacher_head: Head | torch.Tensor | None = None,
    chunk_tokens: int = CHUNK_TOKENS,
) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    """Distillation loss, a mean per token (it does not grow with batch size or sequence length):

        loss = (1 - ce_weight) * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + ce_weight * CE(z_s, targets)

    with z = head(hidden) computed a chunk at a time (Hinton's T^2 keeps the gradient scale
    independent of T). student_hidden (..., d) carries the student's graph; teacher_hidden
    (..., d) is treated as a constant; head is the student's (lm_head(model), or a bare (V, d) weight; its
    weight and bias get gradients when they require them); teacher_head is the teacher's (default: `head`,
    as when teacher and student share the backbone). targets (...) are next-token ids, needed when
    ce_weight > 0 and optional otherwise (then parts['ce'] is reported too).
    Returns (loss, parts): parts = {'kl': mean KL at temperature T, 'ce': mean CE at T=1 or None},
    detached 0-dim tensors for logging."""
    if not 0.0 <= ce_weight <= 1.0:
        raise ValueError(f"ce_weight {ce_weight} must lie in [0, 1] (the cross-entropy share of the loss)")
    if temperature <= 0:
        raise ValueError(f"temperature {temperature} must be > 0")
    if ce_weight > 0 and targets is None:
        raise ValueError("ce_weight > 0 needs the next-token targets")
    d = student_hidden.shape[-1]
    hs, ht = student_hidden.reshape(-1, d), teacher_hidden.detach().reshape(-1, d)
    if ht.shape != hs.shape:
        raise ValueError(
            f"student hidden {tuple(student_hidden.shape)} and teacher hidden {tuple(teacher_hidden.shape)} differ"
        )
    head = _as_head(head)
    mm, _ = _dtypes(hs, head.weight)
    teacher = _as_head(head if teacher_head is None else teacher_head)
    teacher = teacher._replace(
        weight=teacher.weight.detach().to(mm), bias=None if teacher.bias is None else teacher.bias.detach().to(mm)
    )
    y = None if targets is None else targets.reshape(-1, 1)[:, 0]
    grad = torch.is_grad_enabled()
    need = (
        grad and hs.requires_grad,
        grad and head.weight.requires_grad,
        grad and head.bias is not None and head.bias.requires_grad,
    )
    loss, kl, ce = _ChunkedKD.apply(
        hs, ht, head.weight, head.bias, head, teacher, y, float(temperature), float(ce_weight), int(chunk_tokens), need
    )
    return loss, {"kl": kl, "ce": None if targets is None else ce}


@torch.no_grad()
def kd_metrics(
    student_hidden: torch.Tensor,
    head: Head | torch.Tensor,
    targets: torch.Tensor,
    teacher_hidden: torch.Tensor | None = None,
    teacher_head: Head | torch.Tensor | None = None,
    chunk_tokens: int = CHUNK_TOKENS,
) -> dict[str, torch.Tensor]:
    """Evaluation sums at temperature 1 over the tokens of a batch, as float64 0-dim tensors on the
    device (add them up over batches, divide by 'tokens' at the end):
    'tokens', 'ce' (student's next-token cross-entropy) and, given a teacher, 'kl'
    (KL(teacher || student)), 'agree' (tokens whose top-1 predictions match), 'teacher_ce'."""
    d = student_hidden.shape[-1]
    hs, y = student_hidden.reshape(-1, d), targets.reshape(-1, 1)
    ht = None if teacher_hidden is None else teacher_hidden.reshape(-1, d)
    head = _as_head(head)
    teacher = _as_head(head if teacher_head is None else teacher_head)
    mm, fp = _dtypes(hs, head.weight)
    zero = torch.zeros((), dtype=torch.float64, device=hs.device)
    sums = {"tokens": zero + hs.shape[0], "ce": zero.clone()}
    if ht is not None:
        sums.update(kl=zero.clone(), agree=zero.clone(), teacher_ce=zero.clone())
    with torch.autocast(hs.device.type, enabled=False):
        for s in range(0, hs.shape[0], chunk_tokens):
            yc = y[s : s + chunk_tokens]
            log_q = head.logits(hs[s : s + chunk_tokens], mm, fp).log_softmax(-1)
            sums["ce"] -= log_q.gather(-1, yc).sum()
            if ht is None:
                continue
            log_p = teacher.logits(ht[s : s + chunk_tokens], mm, fp).log_softmax(-1)
            sums["teacher_ce"] -= log_p.gather(-1, yc).sum()
            sums["agree"] += (log_q.argmax(-1) == log_p.argmax(-1)).sum()
            sums["kl"] += torch.dot(log_p.exp().view(-1), log_p.sub_(log_q).view(-1))
    return sums
