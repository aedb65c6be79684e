"""The `lolcats` attention student (sliding-window softmax + Hedgehog linear attention): its chunked form against the
sum written out token by token (outputs and gradients), the window and state carried across calls, the feature map's
start, the teacher exactly when the window covers the sequence (every family), training, calibration, its arguments.
Its decoding is in test_generate.py, the KV-cache refusal and checkpoints in test_attention.py, distill.py's rotation
in test_distill.py."""

import functools

import pytest
import torch
import torch.nn.functional as F

from common.students import make_student
from common.students.lolcats import feature_map, hybrid_chunked, with_sinks
from common.swap import LayerCalls, get_block
from families import FAMILIES, family_model
from test_attention import latent, tokens, trained_on_block_mse


def hybrid_token_by_token(q, k, v, fq, fk, factor, scale, window, softcap=None, log_decay=None, sink=0):
    """The reference, LoLCATs' sum per query over whole sequences: softmax terms exp(s_j - m) weighted by factor over
    the last `window` keys and the first `sink` keys, linear terms fq.fk over the other older ones (a running state,
    decayed by exp(log_decay) per head each token when given), one normalisation."""
    B, H, T, D = q.shape
    state = q.new_zeros(B, H, fq.shape[-1], D + 1)
    out = []
    for t in range(T):
        if log_decay is not None:
            state = state * log_decay.exp()[:, None, None]
        if t - window >= sink:  # key t - window leaves the window; a sink's stays out of the state
            u = torch.cat([v[:, :, t - window], torch.ones_like(v[:, :, t - window, :1])], -1)
            state = state + fk[:, :, t - window, :, None] * u[:, :, None, :]
        first = max(0, t - window + 1)
        exact = list(range(min(sink, first))) + list(range(first, t + 1))
        s = torch.einsum("bhd,bhjd->bhj", q[:, :, t], k[:, :, exact]) * scale
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        p = factor[:, None] * (s - s.max(-1, keepdim=True).values).exp()
        linear = torch.einsum("bhf,bhfv->bhv", fq[:, :, t], state)
        num = torch.einsum("bhj,bhjd->bhd", p, v[:, :, exact]) + linear[..., :D]
        out.append(num / (p.sum(-1, keepdim=True) + linear[..., D:]))
    return torch.stack(out, 2)


def hybrid_inputs(B=2, H=3, T=37, D=8, features=6, seed=0):
    """q, k, v; features as the feature map gives them (positive, each half summing to 1); the window factor."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, D, generator=gen) for _ in range(3))
    fq, fk = (torch.randn(B, H, T, features, generator=gen).softmax(-1) for _ in range(2))
    return q, k, v, fq, fk, torch.rand(H, generator=gen)


def whole(q, k, v, fq, fk, factor, scale, window, chunk_size, softcap=None, log_decay=None, sink=0):
    """hybrid_chunked over whole sequences: no token before the first (window - 1 absent keys, a zero state)."""
    B, T = q.shape[0], q.shape[2]
    q_pos = torch.arange(T).expand(B, T)
    sinks = with_sinks(None, k, v, q_pos, sink) if sink else None
    k, v, fk = (F.pad(t, (0, 0, window - 1, 0)) for t in (k, v, fk))
    real = torch.arange(window - 1 + T).expand(B, -1) >= window - 1
    args = (real, factor, scale, window, chunk_size, None, softcap, log_decay, sinks, q_pos)
    return hybrid_chunked(q, k, v, fq, fk[:, :, :T], *args)[0]


# log lambda per head: a long memory, a short one, almost none (lambda^21 underflows and 1 / lambda^21 overflows fp32)
DECAYS = [None, torch.tensor([-0.01, -0.3, -5.0])]


@pytest.mark.parametrize("window", [1, 4, 40])  # 40: longer than the sequence, no linear terms
@pytest.mark.parametrize("chunk_size", [1, 5, 16, 64])
@pytest.mark.parametrize("log_decay", DECAYS, ids=["no decay", "decay"])
@pytest.mark.parametrize("sink", [0, 3, 40], ids=["no sinks", "3 sinks", "more sinks than tokens"])
def test_chunked_equals_token_by_token(window, chunk_size, log_decay, sink):
    inputs = hybrid_inputs()  # T=37: never a multiple of the chunk (except 1)
    for softcap in (None, 2.0):
        ref = hybrid_token_by_token(*inputs, 0.4, window, softcap, log_decay, sink)
        out = whole(*inputs, 0.4, window, chunk_size, softcap, log_decay, sink)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window,chunk_size", [(4, 8), (8, 4), (4, 64)])  # 64: one chunk of all 21 tokens
@pytest.mark.parametrize("decay", [False, True])
@pytest.mark.parametrize("sink", [0, 2])
def test_chunked_gradients_equal_token_by_token(window, chunk_size, decay, sink):
    """Gradients of q, k, v (the sinks' included), both features, the window factor and the decay, to fp32 rounding
    of each (the factor's sums the most terms: 1e-6 of its largest when written; in fp64 all agree to 1e-13)."""
    grads = []
    for fn in (hybrid_token_by_token, functools.partial(whole, chunk_size=chunk_size)):
        xs = [t.clone().requires_grad_() for t in hybrid_inputs(T=21)]
        if decay:
            xs.append(DECAYS[1].clone().requires_grad_())
        log_decay = xs[6] if decay else None
        fn(*xs[:6], scale=0.4, window=window, softcap=3.0, log_decay=log_decay, sink=sink).square().sum().backward()
        grads.append([x.grad for x in xs])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * a.abs().max().item())


@pytest.mark.parametrize("log_decay", DECAYS, ids=["no decay", "decay"])
@pytest.mark.parametrize("sink", [0, 2, 16], ids=["no sinks", "2 sinks", "16 sinks: filled over pieces"])
def test_window_and_state_carry_across_calls(log_decay, sink):
    """Pieces of 13, 1, 1 and 25 queries, each with the window - 1 keys before it, the state and the sinks the
    previous piece left, give the whole sequence's outputs; the first 3 are padding (keys not real, positions -1),
    which changes nothing."""
    q, k, v, fq, fk, factor = hybrid_inputs()
    window, B, T, pad = 6, 2, 37, 3
    ref = whole(q, k, v, fq, fk, factor, 0.4, window, 16, log_decay=log_decay, sink=sink)
    q, fq = (F.pad(t, (0, 0, pad, 0)) for t in (q, fq))
    k, v, fk = (F.pad(t, (0, 0, window - 1 + pad, 0)) for t in (k, v, fk))  # key i + window - 1 is query i's
    real = torch.arange(window - 1 + pad + T).expand(B, -1) >= window - 1 + pad
    q_pos = (torch.arange(pad + T) - pad).clamp(min=-1).expand(B, -1)
    out, state, slots, start = [], None, None, 0
    for n in (13, 1, 1, 25):
        q_n, fq_n, fk_n, pos_n = (t[..., start : start + n, :] for t in (q, fq, fk, q_pos[..., None]))
        keys = slice(start, start + window - 1 + n)
        k_n, v_n, pos_n = k[:, :, keys], v[:, :, keys], pos_n[..., 0]  # fk: keys that leave the window
        slots = with_sinks(slots, k_n[:, :, window - 1 :], v_n[:, :, window - 1 :], pos_n, sink) if sink else None
        o, state = hybrid_chunked(
            q_n, k_n, v_n, fq_n, fk_n, real[:, keys], factor, 0.4, window, 4, state, None, log_decay, slots, pos_n
        )
        out.append(o)
        start += n
    out = torch.cat(out, 2)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, :, pad:], ref, rtol=1e-5, atol=1e-5)


def test_feature_map_starts_as_softmax_kernel_features():
    """With standard normal weights, phi(q).phi(k) approaches 2 exp(q.k * scale) / F as F grows (random features)."""
    gen = torch.Generator().manual_seed(0)
    q, k = (0.5 * torch.randn(1, 2, 8, 16, generator=gen) for _ in range(2))
    weight, scale = torch.randn(2, 16, 20000, generator=gen), 0.25
    approx = feature_map(q, weight, scale) @ feature_map(k, weight, scale).transpose(-1, -2) * 20000 / 2
    exact = (q @ k.transpose(-1, -2) * scale).exp()  # 0.43 to 1.94
    torch.testing.assert_close(approx, exact, rtol=0.06, atol=0)  # 0.035 when written


@pytest.mark.parametrize("family", FAMILIES)
def test_window_covering_the_sequence_is_the_teacher(family):
    """12 tokens, within every family's sliding window: with a window of 12 there are no linear terms (and its sinks
    are in the window), and the student is the teacher's attention on both layers (its q, k, v and scale; Gemma 2's
    softcap; smollm3's layer 1 without rotary; Falcon's direct sdpa call). A window of 4 is the teacher on the first
    4 tokens only."""
    model, ids = family_model(family), tokens(n=12)
    calls = LayerCalls(model, "attn")
    for i in range(2):
        x, call = latent(model, calls, i, ids), calls.block(i, ids.shape)
        teacher = get_block(model, i, "attn")
        with torch.no_grad():
            y = call(teacher, x)
            wide = call(make_student("attn", "lolcats", teacher, model.config, window=12, chunk_size=5, sink=4), x)
            narrow = call(make_student("attn", "lolcats", teacher, model.config, window=4), x)
        torch.testing.assert_close(wide, y, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(narrow[:, :4], y[:, :4], rtol=1e-5, atol=1e-5)
        assert (narrow - y)[:, 4:].abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_lolcats_trains_on_every_family(family):
    """Adam on layer 1's block output MSE with a window of 4 on 32 tokens (mostly linear terms): the loss falls."""
    student, _, losses = trained_on_block_mse(family_model(family), "lolcats", tokens(), 12, window=4, chunk_size=8)
    assert losses[-1] < 0.8 * losses[0], losses[::3]  # 0.30-0.53x on the 17 families when written
    assert all(p.grad is not None for p in (student.feature_q, student.feature_k, student.window_factor))


def test_lolcats_decay_starts_at_its_memory_and_trains():
    """decay=n starts every head's lambda at 1 - 1/n; the decay takes gradients and the loss falls as without it."""
    model = family_model("llama")
    student = make_student("attn", "lolcats", get_block(model, 1, "attn"), model.config, decay=16)
    torch.testing.assert_close(torch.sigmoid(student.decay_logit), torch.full((4,), 1 - 1 / 16))
    student, _, losses = trained_on_block_mse(model, "lolcats", tokens(), 12, window=4, chunk_size=8, decay=16)
    assert losses[-1] < 0.8 * losses[0], losses[::3]
    assert student.decay_logit.grad is not None and student.decay_logit.grad.abs().max() > 0


def test_bad_lolcats_kwargs():
    model = family_model("llama")
    teacher = get_block(model, 0, "attn")
    for name, value in (("window", 0), ("feature_dim", 0), ("chunk_size", 0), ("window", 64.5), ("chunk_size", True)):
        with pytest.raises(ValueError, match=f"lolcats student: {name} must be a whole number >= 1, got {value!r}"):
            make_student("attn", "lolcats", teacher, model.config, **{name: value})
    with pytest.raises(ValueError, match="do not fit student 'lolcats'"):
        make_student("attn", "lolcats", teacher, model.config, sinks=4)  # a misspelt sink
    for sink in (-1, 2.5, True, "4"):
        with pytest.raises(ValueError, match=f"lolcats student: sink must be a whole number >= 0, got {sink!r}"):
            make_student("attn", "lolcats", teacher, model.config, sink=sink)
    for decay in (1, 0.5, -3, float("nan")):
        with pytest.raises(ValueError, match=f"lolcats student: decay must be > 1 .* got {decay}"):
            make_student("attn", "lolcats", teacher, model.config, decay=decay)
    student = make_student("attn", "lolcats", teacher, model.config)
    assert student.kwargs == {"window": 256, "feature_dim": None, "chunk_size": 64, "decay": 4, "sink": 4}
    lolcats = make_student("attn", "lolcats", teacher, model.config, decay=None)
    assert lolcats.decay_logit is None and "decay_logit" not in lolcats.state_dict()  # LoLCATs' parameters alone
    assert student.feature_q.shape == student.feature_k.shape == (4, 16, 8)  # feature_dim None: head_dim / 2
