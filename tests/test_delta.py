"""The `delta` attention student (Gated DeltaNet): the recurrence against the delta rule written out, its chunked
form against the recurrence (outputs, gradients of every input, final state), the student training on every family,
calibration, its arguments, and fla's kernel where there is a GPU. Its q/k/v are checked against the teacher's with
`linear`'s in test_attention.py, its decoding in test_generate.py, distill.py's rotation in test_distill.py."""

import pytest
import torch
import torch.nn.functional as F

from common.students import make_student
from common.students.attention import MAX_LOG_DECAY
from common.students.delta import delta_chunked, delta_recurrent, fla_chunk_gated_delta_rule
from common.swap import get_block
from families import FAMILIES, family_model
from test_attention import block_run, tokens, trained_on_block_mse


def delta_inputs(B=2, H=3, T=37, K=8, V=6, seed=0):
    """q, k (unit length, as the student gives them), v, g over the student's whole decay range, beta, a state."""
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, H, T, K, generator=gen), F.normalize(torch.randn(B, H, T, K, generator=gen), dim=-1)
    v = torch.randn(B, H, T, V, generator=gen)
    g, beta = -MAX_LOG_DECAY * torch.rand(B, H, T, generator=gen), torch.rand(B, H, T, generator=gen)
    return q, k, v, g, beta, torch.randn(B, H, K, V, generator=gen)


def test_recurrence_is_the_delta_rule():
    """S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T and o_t = scale S_t^T q_t, as matrices."""
    q, k, v, g, beta, S = delta_inputs(T=9)
    o, state = delta_recurrent(q, k, v, g, beta, 0.3, S)
    for t in range(9):
        kt, b = k[:, :, t, :, None], beta[:, :, t, None, None]
        S = g[:, :, t, None, None].exp() * (torch.eye(8) - b * kt @ kt.mT) @ S + b * kt @ v[:, :, t, None]
        torch.testing.assert_close(o[:, :, t], 0.3 * (S.mT @ q[:, :, t, :, None])[..., 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, S, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 64])
def test_chunked_equals_recurrence(chunk_size):
    q, k, v, g, beta, s0 = delta_inputs()  # T=37: never a multiple of the chunk (except 1)
    for state in (None, s0):
        o_ref, s_ref = delta_recurrent(q, k, v, g, beta, 0.3, state)
        o, s = delta_chunked(q, k, v, g, beta, 0.3, chunk_size, state)
        torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [4, 16])
def test_chunked_gradients_equal_recurrence(chunk_size):
    """Gradients of q, k, v, g, beta and the initial state, through the outputs and the final state."""
    inputs = delta_inputs(T=21)
    grads = []
    for fn in (
        lambda *x: delta_recurrent(*x[:5], 0.3, x[5]),
        lambda *x: delta_chunked(*x[:5], 0.3, chunk_size, x[5]),
    ):
        xs = [t.clone().requires_grad_() for t in inputs]
        o, s = fn(*xs)
        (o.square().sum() + s.square().sum()).backward()
        grads.append([x.grad for x in xs])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_chunked_exact_at_fastest_decay_and_long_chunks():
    """The cumulative log decay reaches -78 inside a 128-chunk: only decays between positions in order are formed."""
    q, k, v, _, beta, _ = delta_inputs(B=1, H=2, T=300, K=16, V=16)
    g = torch.full_like(beta, -MAX_LOG_DECAY)
    o_ref, s_ref = delta_recurrent(q, k, v, g, beta, 0.25)
    o, s = delta_chunked(q, k, v, g, beta, 0.25, 128)
    assert torch.isfinite(o).all()
    torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_delta_trains_on_every_family(family):
    """Adam on layer 1's block output MSE (smollm3's layer 1 has no rotary, gpt2 none at all): the loss falls."""
    student, x, losses = trained_on_block_mse(family_model(family), "delta", tokens(), 12, chunk_size=8)
    assert losses[-1] < 0.7 * losses[0], losses[::3]  # 0.23-0.51x on the 17 families when written
    g, beta = student.log_decay(x), student.write_strength(x)
    assert ((g < 0) & (g >= -MAX_LOG_DECAY)).all() and ((beta > 0) & (beta < 1)).all()


def test_bad_delta_kwargs():
    model = family_model("llama")
    teacher = get_block(model, 0, "attn")
    for name, value in (("chunk_size", 0), ("gate_rank", 0), ("gate_rank", 16.5)):
        with pytest.raises(ValueError, match=f"delta student: {name} must be a whole number >= 1, got {value!r}"):
            make_student("attn", "delta", teacher, model.config, **{name: value})
    with pytest.raises(ValueError, match="do not fit student 'delta'"):
        make_student("attn", "delta", teacher, model.config, decay_rank=8)  # linear's, not delta's


@pytest.mark.skipif(
    not torch.cuda.is_available() or fla_chunk_gated_delta_rule() is None,
    reason="needs a GPU and flash-linear-attention",
)
def test_fla_kernel_matches_chunked():
    model, ids = family_model("llama"), tokens(n=200)
    student = make_student("attn", "delta", get_block(model, 0, "attn"), model.config)
    x, call = block_run(model, 0, ids)
    with torch.no_grad():
        cpu = call(student, x)  # the pure-PyTorch chunked path
        x, call = block_run(model.cuda(), 0, ids.cuda())
        gpu = call(student.cuda(), x)  # fla's chunk_gated_delta_rule
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-3, atol=1e-3 * cpu.abs().max().item())
