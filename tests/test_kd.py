"""common/kd.py: the chunked KL/CE loss equals the naive full-logits loss, value and gradients."""

import copy

import pytest
import torch
import torch.nn.functional as F

from common.kd import Head, final_hidden, kd_loss, kd_metrics, lm_head
from conftest import tiny_config


def naive_loss(hs, ht, w, wt, y, temperature, ce_weight):
    zs, zt = hs @ w.T, ht @ wt.T
    kl = F.kl_div(
        (zs / temperature).log_softmax(-1).flatten(0, -2),
        (zt / temperature).log_softmax(-1).flatten(0, -2),
        log_target=True,
        reduction="batchmean",
    )
    ce = F.cross_entropy(zs.flatten(0, -2), y.flatten()) if ce_weight else 0.0
    return (1 - ce_weight) * temperature**2 * kl + ce_weight * ce


def inputs(n=13, d=6, v=11, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, d, dtype=dtype, generator=g).requires_grad_()
    ht = torch.randn(n, d, dtype=dtype, generator=g)
    w = torch.randn(v, d, dtype=dtype, generator=g).requires_grad_()
    wt = torch.randn(v, d, dtype=dtype, generator=g)
    y = torch.randint(0, v, (n,), generator=g)
    return hs, ht, w, wt, y


def test_kl_is_zero_when_student_equals_teacher():
    hs, _, w, _, _ = inputs(dtype=torch.float32)
    loss, parts = kd_loss(hs, hs.detach(), w, temperature=2.0, chunk_tokens=4)
    loss.backward()
    assert loss.item() == 0.0 and parts["kl"].item() == 0.0 and parts["ce"] is None
    assert hs.grad.abs().max() < 1e-7 and w.grad.abs().max() < 1e-7


@pytest.mark.parametrize("chunk", [1, 4, 5, 13, 64])
@pytest.mark.parametrize("temperature,ce_weight", [(1.0, 0.0), (2.0, 0.3), (0.5, 1.0)])
def test_chunked_equals_naive_loss_and_gradients(chunk, temperature, ce_weight):
    hs, ht, w, wt, y = inputs()
    loss, parts = kd_loss(hs, ht, w, y, temperature, ce_weight, teacher_head=wt, chunk_tokens=chunk)
    gh, gw = torch.autograd.grad(loss, (hs, w))
    ref = naive_loss(hs, ht, w, wt, y, temperature, ce_weight)
    rh, rw = torch.autograd.grad(ref, (hs, w))
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gh, rh, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gw, rw, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(parts["ce"], F.cross_entropy(hs @ w.T, y).detach(), rtol=1e-12, atol=1e-12)


def test_gradcheck_batched_input_and_frozen_head():
    hs, ht, w, wt, y = inputs(n=8, d=4, v=7)
    hs = hs.detach().view(2, 4, 4).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda h, wq: kd_loss(h, ht.view(2, 4, 4), wq, y.view(2, 4), 1.5, 0.2, teacher_head=wt, chunk_tokens=3)[0],
        (hs, w),
    )
    # a frozen head (KD_TRAINABLE=decoders) gets no gradient, none is even computed, and the body's gradient is the
    # one it gets when the head trains too
    head = torch.nn.Parameter(w.detach().clone(), requires_grad=False)
    loss, _ = kd_loss(hs, ht.view(2, 4, 4), head, chunk_tokens=3)
    assert loss.grad_fn.saved_tensors[1] is None  # the head's gradient buffer (V x d, fp32) was never made
    loss.backward()
    assert head.grad is None and hs.grad.abs().max() > 0
    gh, gw = torch.autograd.grad(kd_loss(hs, ht.view(2, 4, 4), w, chunk_tokens=3)[0], (hs, w))
    torch.testing.assert_close(hs.grad, gh, rtol=1e-12, atol=1e-12)
    assert gw.abs().max() > 0


def test_loss_is_a_mean_per_token():
    """Repeating the same rows (longer sequences, bigger batches) leaves the loss unchanged."""
    hs, ht, w, wt, y = inputs(n=6)
    one, _ = kd_loss(hs, ht, w, y, 2.0, 0.5, teacher_head=wt, chunk_tokens=4)
    longer, _ = kd_loss(hs.repeat(3, 1), ht.repeat(3, 1), w, y.repeat(3), 2.0, 0.5, teacher_head=wt, chunk_tokens=4)
    batched, _ = kd_loss(
        hs.expand(5, 6, 6), ht.expand(5, 6, 6), w, y.expand(5, 6), 2.0, 0.5, teacher_head=wt, chunk_tokens=4
    )
    torch.testing.assert_close(longer, one, rtol=1e-12, atol=0)
    torch.testing.assert_close(batched, one, rtol=1e-12, atol=0)


def test_bf16_autocast_upcasts_and_keeps_dtypes():
    hs, ht, w, wt, y = inputs(n=16, d=32, v=64, dtype=torch.float32)
    hb = hs.detach().bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = kd_loss(hb, ht.bfloat16(), w, y, 2.0, 0.5, teacher_head=wt, chunk_tokens=5)
    loss.backward()
    ref = naive_loss(hs, ht, w, wt, y, 2.0, 0.5)
    assert loss.dtype == torch.float32 and hb.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=3e-2, atol=3e-2)


def test_bad_arguments_raise():
    hs, ht, w, _, y = inputs()
    with pytest.raises(ValueError, match="targets"):
        kd_loss(hs, ht, w, ce_weight=0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        kd_loss(hs, ht, w, y, ce_weight=1.5)


def test_metrics_match_full_logits():
    hs, ht, w, wt, y = (t.detach().float() if t.is_floating_point() else t for t in inputs(n=20, v=9))
    m = kd_metrics(hs.view(4, 5, -1), w, y.view(4, 5), ht.view(4, 5, -1), wt, chunk_tokens=3)
    zs, zt = hs @ w.T, ht @ wt.T
    assert m["tokens"].item() == 20
    torch.testing.assert_close(m["ce"].item(), F.cross_entropy(zs, y, reduction="sum").item(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        m["teacher_ce"].item(), F.cross_entropy(zt, y, reduction="sum").item(), rtol=1e-5, atol=1e-5
    )
    kl = F.kl_div(zs.log_softmax(-1), zt.log_softmax(-1), log_target=True, reduction="sum")
    torch.testing.assert_close(m["kl"].item(), kl.item(), rtol=1e-5, atol=1e-5)
    assert m["agree"].item() == (zs.argmax(-1) == zt.argmax(-1)).sum().item()
    same = kd_metrics(hs, w, y, hs, w, chunk_tokens=7)
    assert same["kl"].item() == 0.0 and same["agree"].item() == 20 and same["ce"].item() == same["teacher_ce"].item()


def test_kl_falls_when_training_a_perturbed_mlp():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(tiny_config(2), attn_implementation="sdpa")
    with torch.no_grad():
        teacher.model.embed_tokens.weight.mul_(30)  # sharper next-token distributions than the random init's
    student = copy.deepcopy(teacher)
    mlp_params = [p for n, p in student.named_parameters() if ".mlp." in n]
    with torch.no_grad():
        for p in mlp_params:
            p.normal_(std=0.2)
    for p in student.parameters():
        p.requires_grad_(p in set(mlp_params))
    opt = torch.optim.Adam(mlp_params, lr=3e-3)
    ids = torch.randint(0, 320, (4, 4, 32))
    with torch.no_grad():
        targets = [final_hidden(teacher, x) for x in ids]
    kls = []
    for step in range(40):
        x, ht = ids[step % 4], targets[step % 4]
        loss, parts = kd_loss(final_hidden(student, x), ht, lm_head(student), temperature=1.0, chunk_tokens=50)
        opt.zero_grad()
        loss.backward()
        opt.step()
        kls.append(parts["kl"].item())
    assert kls[0] > 0.05
    assert sum(kls[-4:]) / 4 < 0.1 * kls[0]


def test_head_with_bias_scale_and_softcap_equals_naive_loss_and_gradients():
    """The model's own logit transform (Gemma's softcapping, Granite/Cohere scaling, a head bias) is in the loss
    and in its gradients (head bias included)."""
    hs, ht, w, wt, y = inputs()
    g = torch.Generator().manual_seed(1)
    b = torch.randn(w.shape[0], dtype=w.dtype, generator=g).requires_grad_()
    bt = torch.randn(w.shape[0], dtype=w.dtype, generator=g)
    head, teacher = Head(w, b, 0.5, 3.0), Head(wt, bt, 0.5, 3.0)

    def logits(h, hd):
        return hd.softcap * torch.tanh(hd.scale * (h @ hd.weight.T + hd.bias) / hd.softcap)

    loss, parts = kd_loss(hs, ht, head, y, 2.0, 0.3, teacher_head=teacher, chunk_tokens=5)
    zs, zt = logits(hs, head), logits(ht, teacher)
    kl = F.kl_div((zs / 2).log_softmax(-1), (zt / 2).log_softmax(-1), log_target=True, reduction="batchmean")
    ref = 0.7 * 4 * kl + 0.3 * F.cross_entropy(zs, y)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(torch.autograd.grad(loss, (hs, w, b)), torch.autograd.grad(ref, (hs, w, b))):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    m = kd_metrics(hs, head, y, ht, teacher, chunk_tokens=4)
    torch.testing.assert_close(m["ce"].item() / 13, F.cross_entropy(zs, y).item(), rtol=1e-10, atol=0)
    torch.testing.assert_close(
        m["kl"].item() / 13,
        F.kl_div(zs.log_softmax(-1), zt.log_softmax(-1), log_target=True, reduction="batchmean").item(),
        rtol=1e-10,
        atol=0,
    )
