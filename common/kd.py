"""Logits distillation without the full logits: KL(teacher || student) and cross-entropy computed
from final hidden states and the LM head, a chunk of tokens at a time.

The full B*T*V logits of a 49,152-word vocabulary are 200 KB per token in fp32; the naive loss
keeps several such copies (both models' logits, their log-softmaxes, the gradient). Here each
chunk of `chunk_tokens` tokens is projected, reduced to its loss and turned into its gradients
inside the forward pass (as Liger's fused linear cross-entropy does), so the extra memory is
O(chunk_tokens * V) whatever B*T is. Matmuls run in the autocast dtype when autocast is on;
softmaxes, sums and the head gradient are fp32.

    loss, parts = kd_loss(student_hidden, teacher_hidden, head_weight(model), targets,
                          temperature=2.0, ce_weight=0.1)
    loss.backward()   # gradients for student_hidden (so the student body) and the head weight

Hidden states are what the LM head sees: `final_hidden(model, ids)` (after the final norm).
"""

import torch
import torch.nn as nn

CHUNK_TOKENS = 512  # tokens per chunk: ~5 fp32 chunk-by-vocab buffers live at once (~0.5 GB at V=49,152)


def head_weight(model: nn.Module) -> torch.Tensor:
    """The LM head's weight (V, d); tied to the input embeddings in many small models."""
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise ValueError(f"{type(model).__name__}: the LM head has a bias, which common/kd.py does not handle")
    return head.weight


def final_hidden(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The hidden states the LM head sees (B, T, d): in transformers 5.x the base model's
    last_hidden_state is already through the final norm."""
    return model.model(input_ids=ids, use_cache=False).last_hidden_state


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
    def forward(ctx, hs, ht, w, wt, targets, temperature, ce_weight, chunk_tokens, need_h, need_w):
        n_tok, T = hs.shape[0], temperature
        mm, fp = _dtypes(hs, w)
        with torch.autocast(hs.device.type, enabled=False):
            W, Wt = w.to(mm), wt.to(mm)
            kl_sum = torch.zeros((), dtype=fp, device=hs.device)
            ce_sum = torch.zeros((), dtype=fp, device=hs.device)
            grad_h = torch.empty_like(hs) if need_h else None
            grad_w = torch.zeros(w.shape, dtype=fp, device=w.device) if need_w else None
            for s in range(0, n_tok, chunk_tokens):
                h = hs[s : s + chunk_tokens].to(mm)
                zs = (h @ W.T).to(fp)
                log_p = (ht[s : s + chunk_tokens].to(mm) @ Wt.T).to(fp)
                if T != 1:
                    log_p.div_(T)
                log_p -= log_p.logsumexp(-1, keepdim=True)
                grad_ce = None
                if targets is not None:
                    y = targets[s : s + chunk_tokens, None]
                    lse = zs.logsumexp(-1, keepdim=True)
                    ce_sum += (lse - zs.gather(-1, y)).sum()
                    if ce_weight and (need_h or need_w):  # d CE / d z = softmax(z) - onehot(y)
                        grad_ce = (zs - lse).exp_().mul_(ce_weight)
                        grad_ce.scatter_add_(-1, y, torch.full(y.shape, -ce_weight, dtype=fp, device=y.device))
                log_q = zs.div_(T) if T != 1 else zs
                log_q -= log_q.logsumexp(-1, keepdim=True)
                p = log_p.exp()
                kl_sum += torch.dot(p.view(-1), log_p.sub_(log_q).view(-1))
                if need_h or need_w:  # d (T^2 KL_T) / d z = T (q - p)
                    g = log_q.exp_().sub_(p).mul_((1 - ce_weight) * T)
                    if grad_ce is not None:
                        g += grad_ce
                    g = g.div_(n_tok).to(mm)
                    if need_h:
                        grad_h[s : s + chunk_tokens] = g @ W
                    if need_w and mm == fp:
                        grad_w.addmm_(g.T, h)
                    elif need_w:
                        grad_w += (g.T @ h).to(fp)
        ctx.save_for_backward(grad_h, None if grad_w is None else grad_w.to(w.dtype))
        kl, ce = kl_sum / n_tok, ce_sum / n_tok
        loss = (1 - ce_weight) * T * T * kl + ce_weight * ce
        ctx.mark_non_differentiable(kl, ce)
        return loss, kl, ce

    @staticmethod
    def backward(ctx, grad_loss, _grad_kl, _grad_ce):
        grad_h, grad_w = ctx.saved_tensors  # gradients of a unit loss (not scaled in place: retain_graph)
        return (
            None if grad_h is None else grad_h * grad_loss.to(grad_h.dtype),
            None,
            None if grad_w is None else grad_w * grad_loss.to(grad_w.dtype),
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


def kd_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor | None = None,
    temperature: float = 1.0,
    ce_weight: float = 0.0,
    teacher_weight: torch.Tensor | None = None,
    chunk_tokens: int = CHUNK_TOKENS,
) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    """Distillation loss, a mean per token (it does not grow with batch size or sequence length):

        loss = (1 - ce_weight) * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + ce_weight * CE(z_s, targets)

    with z = hidden @ weight.T computed a chunk at a time (Hinton's T^2 keeps the gradient scale
    independent of T). student_hidden (..., d) carries the student's graph; teacher_hidden
    (..., d) is treated as a constant; weight (V, d) is the student's head (it gets a gradient
    when it requires one); teacher_weight is the teacher's head (default: `weight`, as when
    teacher and student share the backbone). targets (...) are next-token ids, needed when
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
    wt = (weight if teacher_weight is None else teacher_weight).detach()
    y = None if targets is None else targets.reshape(-1, 1)[:, 0]
    grad = torch.is_grad_enabled()
    loss, kl, ce = _ChunkedKD.apply(
        hs,
        ht,
        weight,
        wt,
        y,
        float(temperature),
        float(ce_weight),
        int(chunk_tokens),
        grad and hs.requires_grad,
        grad and weight.requires_grad,
    )
    return loss, {"kl": kl, "ce": None if targets is None else ce}


@torch.no_grad()
def kd_metrics(
    student_hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    chunk_tokens: int = CHUNK_TOKENS,
) -> dict[str, torch.Tensor]:
    """Evaluation sums at temperature 1 over the tokens of a batch, as float64 0-dim tensors on the
    device (add them up over batches, divide by 'tokens' at the end):
    'tokens', 'ce' (student's next-token cross-entropy) and, given a teacher, 'kl'
    (KL(teacher || student)), 'agree' (tokens whose top-1 predictions match), 'teacher_ce'."""
    d = student_hidden.shape[-1]
    hs, y = student_hidden.reshape(-1, d), targets.reshape(-1, 1)
    ht = None if teacher_hidden is None else teacher_hidden.reshape(-1, d)
    mm, fp = _dtypes(hs, weight)
    zero = torch.zeros((), dtype=torch.float64, device=hs.device)
    sums = {"tokens": zero + hs.shape[0], "ce": zero.clone()}
    if ht is not None:
        sums.update(kl=zero.clone(), agree=zero.clone(), teacher_ce=zero.clone())
    with torch.autocast(hs.device.type, enabled=False):
        W = weight.to(mm)
        Wt = None if ht is None else (weight if teacher_weight is None else teacher_weight).to(mm)
        for s in range(0, hs.shape[0], chunk_tokens):
            yc = y[s : s + chunk_tokens]
            log_q = (hs[s : s + chunk_tokens].to(mm) @ W.T).to(fp).log_softmax(-1)
            sums["ce"] -= log_q.gather(-1, yc).sum()
            if ht is None:
                continue
            log_p = (ht[s : s + chunk_tokens].to(mm) @ Wt.T).to(fp).log_softmax(-1)
            sums["teacher_ce"] -= log_p.gather(-1, yc).sum()
            sums["agree"] += (log_q.argmax(-1) == log_p.argmax(-1)).sum()
            sums["kl"] += torch.dot(log_p.exp().view(-1), log_p.sub_(log_q).view(-1))
    return sums
