"""Attention students on every family: the GLA recurrence's chunked form, `window` against the teacher (exact
when it covers the sequence) and against a masked-softmax reference, `linear` and `delta` on the teacher's own q/k,
calibration, training, the swap and checkpoints."""

import contextlib
import json
import sys

import pytest
import torch
import torch.nn.functional as F

from common.checkpoint import load_model, save_checkpoint
from common.students import make_student
from common.students.attention import MAX_LOG_DECAY, fla_chunk_gla, gla_chunked, gla_recurrent
from common.swap import LayerCalls, block_input, embed, get_block, run_layer, set_block, student_specs, swapped
from families import FAMILIES, SEQ_LEN, family_model


def gla_inputs(B=2, H=3, T=37, K=8, V=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, H, T, K, generator=gen), torch.randn(B, H, T, K, generator=gen)
    v = torch.randn(B, H, T, V, generator=gen)
    g = -MAX_LOG_DECAY * torch.rand(B, H, T, K, generator=gen)  # the student's whole decay range
    return q, k, v, g, torch.randn(B, H, K, V, generator=gen)


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 64, 128])
def test_chunked_equals_recurrence(chunk_size):
    q, k, v, g, s0 = gla_inputs()  # T=37: never a multiple of the chunk (except 1)
    for state in (None, s0):
        o_ref, s_ref = gla_recurrent(q, k, v, g, 0.3, state)
        o, s = gla_chunked(q, k, v, g, 0.3, chunk_size, state)
        torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=1e-5)


def test_chunked_gradients_equal_recurrence():
    inputs = gla_inputs(T=21)
    grads = []
    for fn in (lambda *x: gla_recurrent(*x[:4], 0.3, x[4]), lambda *x: gla_chunked(*x[:4], 0.3, 8, x[4])):
        xs = [t.clone().requires_grad_() for t in inputs]
        o, s = fn(*xs)
        (o.square().sum() + s.sum()).backward()
        grads.append([x.grad for x in xs])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_chunked_exact_at_fastest_decay_and_long_chunks():
    q, k, v, _, _ = gla_inputs(B=1, H=2, T=300, K=16, V=16)
    g = torch.full_like(q, -MAX_LOG_DECAY)  # cumulative log decay reaches -78 inside a 128-chunk
    o_ref = gla_recurrent(10 * q, 10 * k, v, g, 0.25)[0]
    o = gla_chunked(10 * q, 10 * k, v, g, 0.25, 128)[0]
    assert torch.isfinite(o).all()
    torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-5 * o_ref.abs().max().item())


# --- students in tiny models of every family ------------------------------------------------------------


def tokens(n=SEQ_LEN, batch=2, seed=0):
    return torch.randint(1, 320, (batch, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def latent(model, calls, i, ids):
    """Layer i's attention input for token ids, the teacher's layers run as the model runs them."""
    h = embed(model, ids)
    for j in range(i):
        h = run_layer(model, calls, j, h)
    return block_input(model, calls, i, h)


def block_run(model, i, ids):
    """(x, call): layer i's attention input for ids and its Call, so that call(block, x) runs a block there."""
    calls = LayerCalls(model, "attn")
    return latent(model, calls, i, ids), calls.block(i, ids.shape)


def logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_window_covering_the_sequence_is_the_teacher(family):
    """Exactly (max abs diff 0), block by block and through the whole model's logits: softcapping, sliding
    layers, NoPE layers, fused projections and Falcon's direct sdpa call included. A shorter window differs."""
    model, ids = family_model(family), tokens()
    teacher_logits = logits(model, ids)
    calls = LayerCalls(model, "attn")
    wide = {}
    with torch.no_grad():
        for i in range(2):
            x, call = latent(model, calls, i, ids), calls.block(i, ids.shape)
            teacher = get_block(model, i, "attn")
            wide[(i, "attn")] = make_student("attn", "window", teacher, model.config, window=SEQ_LEN)
            narrow = make_student("attn", "window", teacher, model.config, window=4, sink=2)
            assert torch.equal(call(wide[(i, "attn")], x), call(teacher, x))
            assert (call(narrow, x) - call(teacher, x))[:, 6:].abs().max() > 1e-3
            torch.testing.assert_close(call(narrow, x)[:, :6], call(teacher, x)[:, :6])  # 2 sinks + 4 cover them
    with swapped(model, wide):
        assert torch.equal(logits(model, ids), teacher_logits)
    assert torch.equal(logits(model, ids), teacher_logits)  # restored


@contextlib.contextmanager
def teacher_attention_inputs(teacher):
    """Records (q, k, v, scale) of every attention the teacher's own code mixes: through torch's sdpa
    (transformers' sdpa, Falcon's direct call) or its family's eager function (Gemma 2)."""
    seen, sdpa = [], F.scaled_dot_product_attention
    modeling = sys.modules[type(teacher).__module__]
    eager = getattr(modeling, "eager_attention_forward", None)

    def sdpa_seen(q, k, v, *args, scale=None, **kwargs):
        seen.append((q, k, v, q.shape[-1] ** -0.5 if scale is None else scale))
        return sdpa(q, k, v, *args, scale=scale, **kwargs)

    def eager_seen(module, q, k, v, mask, **kwargs):
        seen.append((q, k, v, kwargs["scaling"]))
        return eager(module, q, k, v, mask, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(F, "scaled_dot_product_attention", sdpa_seen)
        if eager is not None:
            patch.setattr(modeling, "eager_attention_forward", eager_seen)
        yield seen


def heads(t, n):
    """k or v (B, kv_heads, T, hd) repeated to n heads, as grouped attention shares them."""
    return t.repeat_interleave(n // t.shape[1], 1)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_short_window_is_a_masked_softmax(family):
    """window 8 + 2 sinks on 32 tokens = softmax over the teacher's own q, k, v with the causal mask, the window,
    the sinks and (Mistral) the teacher's own sliding window of 16, which hides sinks more than 16 back."""
    model, ids = family_model(family), tokens()
    x, call = block_run(model, 1, ids)
    teacher = get_block(model, 1, "attn")
    with torch.no_grad(), teacher_attention_inputs(teacher) as seen:
        call(teacher, x)
        out = call(make_student("attn", "window", teacher, model.config, window=8, sink=2), x)
    (q, k, v, scale), slide = seen[0], getattr(model.config, "sliding_window", None) or SEQ_LEN
    i, j = torch.arange(SEQ_LEN)[:, None], torch.arange(SEQ_LEN)[None]
    allowed = (j <= i) & (j > i - slide) & ((j > i - 8) | (j < 2))
    scores = (q @ heads(k, q.shape[1]).transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    o = scores.softmax(-1) @ heads(v, q.shape[1])
    torch.testing.assert_close(out, teacher.o_proj(o.transpose(1, 2).flatten(2)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "delta"])
@pytest.mark.parametrize("family", FAMILIES)
def test_recurrent_students_mix_the_teachers_own_q_k_v(family, kind):
    """On both layers (smollm3's layer 1 has no rotary, gpt2 none at all) the q, k, v and scale the student mixes
    are the ones the teacher's code computes: linear's initial scores q.k * scale are the teacher's attention logits,
    delta's the same up to q and k's L2 norms."""
    model, ids = family_model(family), tokens()
    calls = LayerCalls(model, "attn")
    for i in range(2):
        x, call = latent(model, calls, i, ids), calls.block(i, ids.shape)
        teacher = get_block(model, i, "attn")
        with torch.no_grad(), teacher_attention_inputs(teacher) as seen:
            call(teacher, x)
        student, mixed = make_student("attn", kind, teacher, model.config), []

        def spy(module, q, k, v, mask, *, x, cache, scaling=None, **kwargs):
            mixed.append((q, k, v, q.shape[-1] ** -0.5 if scaling is None else scaling))
            return type(student).mix(student, module, q, k, v, mask, x=x, cache=cache, scaling=scaling, **kwargs)

        student.mix = spy
        with torch.no_grad():
            out = call(student, x)
        (q, k, v, scale), (tq, tk, tv, t_scale) = mixed[0], seen[0]
        H = q.shape[1]
        assert torch.equal(q, tq) and scale == t_scale
        assert torch.equal(heads(k, H), heads(tk, H)) and torch.equal(heads(v, H), heads(tv, H))
        g = student.log_decay(x)
        assert out.shape == x.shape and torch.isfinite(out).all() and ((g < 0) & (g >= -MAX_LOG_DECAY)).all()


def trained_on_block_mse(model, kind, ids, steps, **kwargs):
    """A `kind` student of layer 1's attention after `steps` Adam steps (lr 3e-3, seed 0) on the MSE of its block
    output to the teacher's: (the student, the block's latent x, the loss of every step)."""
    x, call = block_run(model, 1, ids)
    teacher = get_block(model, 1, "attn")
    with torch.no_grad():
        target = call(teacher, x)
    torch.manual_seed(0)
    student = make_student("attn", kind, teacher, model.config, **kwargs)
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        loss = F.mse_loss(call(student, x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return student, x, losses


def test_linear_student_trains():
    """Adam on the block's output MSE: the loss falls (2.38 to 0.83 in 40 steps when written)."""
    model, ids = family_model("llama"), tokens(n=64, batch=4)
    _, _, losses = trained_on_block_mse(model, "linear", ids, 40, chunk_size=16)
    assert losses[-1] < 0.5 * losses[0], losses[::8]  # gradients reach the copy's projections and the decay


@pytest.mark.parametrize(
    "kind,kwargs,n_train,most",
    [
        ("linear", {}, 4, 0.97),
        ("delta", {}, 8, 0.95),  # 0.79 to 0.74 when written
        ("lolcats", {"window": 4}, 8, 0.95),  # 0.35 to 0.28 when written (gamma 0.1 to 0.9)
    ],
)
def test_calibration_lowers_held_out_error(kind, kwargs, n_train, most):
    """calibrate(teacher, batches, all_reduce, forward), forward the block run as its layer calls it: what a recurrent
    student fits in closed form (its starts, the output gain) on n_train x 64 tokens lowers the error on held-out
    ones to at most `most` of its start's."""
    model = family_model("gpt2")
    calls = LayerCalls(model, "attn")
    teacher = get_block(model, 1, "attn")

    def forward(block, x):
        return calls.block(1, x.shape[:2])(block, x)

    def pairs(seeds):
        xs = [latent(model, calls, 1, tokens(seed=s)) for s in seeds]
        with torch.no_grad():
            return [(x, forward(teacher, x)) for x in xs]

    train, held_out = pairs(range(n_train)), pairs(range(10, 10 + n_train // 2))

    def error(student):
        with torch.no_grad():
            return sum((forward(student, x) - y).square().sum() for x, y in held_out) / sum(
                y.square().sum() for _, y in held_out
            )

    torch.manual_seed(0)
    student = make_student("attn", kind, teacher, model.config, **kwargs)
    before = error(student)
    student.calibrate(
        teacher, lambda targets=True: ((x, y if targets else None) for x, y in train), lambda t: t, forward
    )
    assert error(student) < most * before


@pytest.mark.parametrize("kind", ["linear", "delta", "lolcats"])
def test_recurrent_students_refuse_a_transformers_kv_cache(kind):
    model, ids = family_model("llama"), tokens()
    set_block(model, 0, "attn", make_student("attn", kind, get_block(model, 0, "attn"), model.config))
    with torch.no_grad():
        first = model(ids)  # a plain forward (transformers' default use_cache=True) works
        with pytest.raises(ValueError, match=f"a {kind} attention student keeps no KV cache"):
            model(ids[:, :1], past_key_values=first.past_key_values)


def test_swap_keeps_every_other_weight_bit_identical():
    model = family_model("llama", layers=3)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    for i in range(3):
        set_block(model, i, "attn", make_student("attn", "linear", get_block(model, i, "attn"), model.config))
    after = model.state_dict()
    assert all(torch.equal(after[n], before[n]) for n in before if ".self_attn." not in n)
    # the student's copy of the teacher's module holds the teacher's weights unchanged (k/v not expanded)
    assert all(
        torch.equal(after[n.replace(".self_attn.", ".self_attn.attn.")], p)
        for n, p in before.items()
        if ".self_attn." in n
    )
    assert [s["layer"] for s in student_specs(model)] == [0, 1, 2]
    assert torch.isfinite(logits(model, tokens())).all()


def test_checkpoint_round_trip(tmp_path):
    model = family_model("llama", layers=4)
    torch.manual_seed(0)
    set_block(model, 0, "attn", make_student("attn", "linear", get_block(model, 0, "attn"), model.config, decay_rank=8))
    set_block(model, 1, "attn", make_student("attn", "window", get_block(model, 1, "attn"), model.config, window=8))
    set_block(model, 2, "attn", make_student("attn", "delta", get_block(model, 2, "attn"), model.config, gate_rank=8))
    set_block(model, 3, "attn", make_student("attn", "lolcats", get_block(model, 3, "attn"), model.config, window=8))
    with torch.no_grad():  # move the new parameters off their initial values, so loading must restore them
        for i in (0, 2, 3):
            for p in get_block(model, i, "attn").parameters():
                p.add_(0.01 * torch.randn_like(p))
    save_checkpoint(str(tmp_path / "final"), model, meta={"phase": "test", "step": 0})
    loaded = load_model(str(tmp_path / "final")).eval()
    assert (
        student_specs(loaded)
        == student_specs(model)
        == [
            {"layer": 0, "target": "attn", "kind": "linear", "kwargs": {"decay_rank": 8, "chunk_size": 64}},
            {"layer": 1, "target": "attn", "kind": "window", "kwargs": {"window": 8, "sink": 4}},
            {"layer": 2, "target": "attn", "kind": "delta", "kwargs": {"gate_rank": 8, "chunk_size": 64}},
            {
                "layer": 3,
                "target": "attn",
                "kind": "lolcats",
                "kwargs": {"window": 8, "feature_dim": None, "chunk_size": 64, "decay": 4, "sink": 4},
            },
        ]
    )
    assert torch.equal(logits(loaded, tokens()), logits(model, tokens()))


def test_a_checkpoint_from_before_an_argument_loads_as_it_was(tmp_path):
    """A lolcats checkpoint written before `decay` and `sink` existed (neither in its students.json, no decay_logit
    in its weights) loads as the student it was then, with no decay and no sinks (ADDED_KWARGS), not the new
    defaults."""
    model = family_model("llama", layers=2)
    torch.manual_seed(0)
    block = get_block(model, 1, "attn")
    set_block(model, 1, "attn", make_student("attn", "lolcats", block, model.config, window=4, decay=None, sink=0))
    save_checkpoint(str(tmp_path / "final"), model, meta={"phase": "test", "step": 0})
    specs = json.loads((tmp_path / "final" / "students.json").read_text())
    del specs[0]["kwargs"]["decay"], specs[0]["kwargs"]["sink"]  # as the code before them wrote it
    (tmp_path / "final" / "students.json").write_text(json.dumps(specs))
    loaded = load_model(str(tmp_path / "final")).eval()
    assert get_block(loaded, 1, "attn").decay_logit is None and get_block(loaded, 1, "attn").sink == 0
    assert torch.equal(logits(loaded, tokens(n=24)), logits(model.eval(), tokens(n=24)))


def test_bad_student_kwargs():
    model = family_model("llama")
    teacher = get_block(model, 0, "attn")
    for kind, name, value, least in (
        ("linear", "chunk_size", 0, 1),
        ("linear", "decay_rank", 8.5, 1),
        ("delta", "gate_rank", True, 1),
        ("window", "window", 0, 1),
        ("window", "window", 64.0, 1),
        ("window", "sink", -1, 0),
        ("window", "sink", 2.5, 0),
    ):
        with pytest.raises(
            ValueError, match=f"{kind} student: {name} must be a whole number >= {least}, got {value!r}"
        ):
            make_student("attn", kind, teacher, model.config, **{name: value})
    with pytest.raises(ValueError, match="linear student: chunk_size must be at most"):
        make_student("attn", "linear", teacher, model.config, chunk_size=10**6)
    with pytest.raises(ValueError, match="do not fit"):
        make_student("attn", "linear", teacher, model.config, rope=True)  # gone: rotary is the teacher's own
    teacher.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="eager or sdpa"):
        make_student("attn", "window", teacher, model.config)
    falcon = family_model("falcon")
    get_block(falcon, 0, "attn").config._attn_implementation = "flash_attention_2"  # calls no sdpa to redirect
    with pytest.raises(ValueError, match="FalconAttention students need the teacher loaded with sdpa or eager"):
        make_student("attn", "linear", get_block(falcon, 0, "attn"), falcon.config)


@pytest.mark.skipif(
    not torch.cuda.is_available() or fla_chunk_gla() is None, reason="needs a GPU and flash-linear-attention"
)
def test_fla_kernel_matches_chunked():
    model, ids = family_model("llama"), tokens(n=200)
    student = make_student("attn", "linear", get_block(model, 0, "attn"), model.config)
    x, call = block_run(model, 0, ids)
    with torch.no_grad():
        cpu = call(student, x)  # the pure-PyTorch chunked path
        x, call = block_run(model.cuda(), 0, ids.cuda())
        gpu = call(student.cuda(), x)  # fla's chunk_gla
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-3, atol=1e-3 * cpu.abs().max().item())
