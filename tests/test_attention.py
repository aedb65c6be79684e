"""Attention students: the GLA recurrence's chunked form, the swap, training, hybrids, checkpoints, generation."""

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from common.checkpoint import load_model, save_checkpoint
from common.students import make_student
from common.students.attention import MAX_LOG_DECAY, LinearAttention, fla_chunk_gla, gla_chunked, gla_recurrent
from common.swap import (
    decoder_input,
    finish_layer,
    get_block,
    position_embeddings,
    run_block,
    set_block,
    student_specs,
    swapped,
    transformer_layers,
)


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


@pytest.mark.skipif(
    not torch.cuda.is_available() or fla_chunk_gla() is None, reason="needs a GPU and flash-linear-attention"
)
def test_fla_kernel_matches_chunked(tiny_model_dir):
    model = load_model(tiny_model_dir)
    student = make_student("attn", "linear", get_block(model, 0, "attn"), model.config)
    x, pos = attn_latent(model, tokens(n=200), 0)
    with torch.no_grad():
        cpu = run_block(student, x, "attn", pos)  # the pure-PyTorch chunked path
        gpu = run_block(student.cuda(), x.cuda(), "attn", tuple(t.cuda() for t in pos))  # fla's chunk_gla
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-3, atol=1e-3 * cpu.abs().max().item())


# --- students in a tiny model -------------------------------------------------------------------


@pytest.fixture
def model(tiny_model_dir):
    return load_model(tiny_model_dir).eval()


def tokens(n=64, batch=2, seed=0):
    return torch.randint(1, 320, (batch, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def attn_latent(model, ids, i):
    """The input to layer i's attention (after its norm), advancing the teacher one layer at a time."""
    layers = transformer_layers(model)
    h = model.model.embed_tokens(ids)
    pos = position_embeddings(model, h)
    for layer in layers[:i]:
        x, r = decoder_input(layer, h, "attn", pos)
        h = finish_layer(layer, r, run_block(layer.self_attn, x, "attn", pos), "attn")
    return decoder_input(layers[i], h, "attn", pos)[0], pos


def logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def test_linear_student_starts_from_teacher_projections(model):
    teacher = get_block(model, 1, "attn")
    student = make_student("attn", "linear", teacher, model.config)
    assert student.kwargs == {"rope": True, "decay_rank": 32, "chunk_size": 64} and student.kind == "linear"
    assert torch.equal(student.q_proj.weight, teacher.q_proj.weight)
    assert torch.equal(student.o_proj.weight, teacher.o_proj.weight)
    groups = teacher.num_key_value_groups
    for mine, theirs in ((student.k_proj, teacher.k_proj), (student.v_proj, teacher.v_proj)):
        heads, kv_heads = (w.weight.unflatten(0, (-1, teacher.head_dim)) for w in (mine, theirs))
        assert len(heads) == model.config.num_attention_heads  # query head h reads KV head h // groups
        assert all(torch.equal(heads[h], kv_heads[h // groups]) for h in range(len(heads)))
    x, pos = attn_latent(model, tokens(), 1)
    q, k, v, g = student.features(x, pos)
    assert ((g < 0) & (g >= -MAX_LOG_DECAY)).all()
    # the copied projections with rotary: the student's q.k are exactly the teacher's attention logits
    tq = teacher.q_proj(x).view(*x.shape[:2], -1, teacher.head_dim).transpose(1, 2)
    tk = teacher.k_proj(x).view(*x.shape[:2], -1, teacher.head_dim).transpose(1, 2)
    tq, tk = apply_rotary_pos_emb(tq, tk, *pos)
    torch.testing.assert_close(q @ k.transpose(-1, -2), tq @ repeat_kv(tk, groups).transpose(-1, -2))


def test_swap_keeps_every_other_weight_bit_identical(model):
    before = {n: p.clone() for n, p in model.state_dict().items()}
    for i in range(len(transformer_layers(model))):
        set_block(model, i, "attn", make_student("attn", "linear", get_block(model, i, "attn"), model.config))
    after = model.state_dict()
    others = [n for n in before if ".self_attn." not in n]
    assert others and all(torch.equal(after[n], before[n]) for n in others)
    k_rows = model.config.num_attention_heads * get_block(model, 0, "attn").head_dim
    assert after["model.layers.0.self_attn.k_proj.weight"].shape[0] == k_rows  # expanded from GQA
    assert [s["layer"] for s in student_specs(model)] == [0, 1, 2]
    assert torch.isfinite(logits(model, tokens())).all()


def test_linear_student_attention_mse_falls(model):
    torch.manual_seed(0)
    x, pos = attn_latent(model, tokens(n=64, batch=4), 1)
    teacher = get_block(model, 1, "attn")
    with torch.no_grad():
        target = run_block(teacher, x, "attn", pos)
    student = make_student("attn", "linear", teacher, model.config, chunk_size=16)
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = torch.nn.functional.mse_loss(run_block(student, x, "attn", pos), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], losses[::8]


def test_window_student(model):
    ids = tokens(n=40)
    x, pos = attn_latent(model, ids, 2)
    teacher = get_block(model, 2, "attn")
    with torch.no_grad():
        full = run_block(teacher, x, "attn", pos)
        wide = run_block(make_student("attn", "window", teacher, model.config, window=40), x, "attn", pos)
        narrow = run_block(make_student("attn", "window", teacher, model.config, window=4), x, "attn", pos)
        single = run_block(make_student("attn", "window", teacher, model.config, window=1, sink=0), x, "attn", pos)
        no_sink = run_block(make_student("attn", "window", teacher, model.config, window=4, sink=0), x, "attn", pos)
    torch.testing.assert_close(wide, full, rtol=1e-5, atol=1e-6)
    # window 4 plus the first 4 tokens (the default sinks) covers positions 0..7 whole
    torch.testing.assert_close(narrow[:, :8], full[:, :8], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(narrow[:, 8:], full[:, 8:], atol=1e-4)
    torch.testing.assert_close(no_sink[:, :4], full[:, :4], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(no_sink[:, 4:], narrow[:, 4:], atol=1e-4)
    # a window of one sees only its own token: the output is o_proj of its (GQA-shared) value
    v = teacher.v_proj(x).view(*x.shape[:2], -1, teacher.head_dim).transpose(1, 2)
    own = teacher.o_proj(repeat_kv(v, teacher.num_key_value_groups).transpose(1, 2).flatten(2))
    torch.testing.assert_close(single, own.detach(), rtol=1e-5, atol=1e-6)


def test_hybrid_keeps_teacher_attention_where_asked(model, tiny_model_dir):
    ids = tokens()
    teacher_logits = logits(model, ids)
    students = {i: make_student("attn", "linear", get_block(model, i, "attn"), model.config) for i in (0, 2)}
    kept = get_block(model, 1, "attn")
    with swapped(model, {(i, "attn"): s for i, s in students.items()}) as hybrid:
        assert get_block(hybrid, 1, "attn") is kept
        assert [s["layer"] for s in student_specs(hybrid)] == [0, 2]
        hybrid_logits = logits(hybrid, ids)
        # layer by layer: students where swapped, a fresh teacher's attention at layer 1
        reference = load_model(tiny_model_dir)
        h = model.model.embed_tokens(ids)
        pos = position_embeddings(model, h)
        with torch.no_grad():
            for i, layer in enumerate(transformer_layers(model)):
                x, r = decoder_input(layer, h, "attn", pos)
                block = get_block(reference, 1, "attn") if i == 1 else students[i]
                h = finish_layer(layer, r, run_block(block, x, "attn", pos), "attn")
            manual = model.lm_head(model.model.norm(h))
    torch.testing.assert_close(hybrid_logits, manual, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(hybrid_logits, teacher_logits, atol=1e-3)
    assert torch.equal(logits(model, ids), teacher_logits)  # restored: the teacher again, bit for bit


def test_checkpoint_round_trip_evaluates_and_generates(model, tmp_path):
    torch.manual_seed(0)
    set_block(
        model,
        0,
        "attn",
        make_student("attn", "linear", get_block(model, 0, "attn"), model.config, decay_rank=8, chunk_size=16),
    )
    set_block(model, 1, "attn", make_student("attn", "window", get_block(model, 1, "attn"), model.config, window=8))
    with torch.no_grad():  # move the new parameters off their initial values, so loading must restore them
        for p in get_block(model, 0, "attn").parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_checkpoint(str(tmp_path / "final"), model, meta={"phase": "test", "step": 0})
    loaded = load_model(str(tmp_path / "final")).eval()
    assert (
        student_specs(loaded)
        == student_specs(model)
        == [
            {
                "layer": 0,
                "target": "attn",
                "kind": "linear",
                "kwargs": {"rope": True, "decay_rank": 8, "chunk_size": 16},
            },
            {"layer": 1, "target": "attn", "kind": "window", "kwargs": {"window": 8, "sink": 4}},
        ]
    )
    assert type(get_block(loaded, 2, "attn")) is type(get_block(model, 2, "attn"))
    ids = tokens(n=30, batch=1)
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    # greedy generation by re-running the sequence: each step's logits are the parallel forward's
    seq, steps = ids[:, :10], []
    for _ in range(6):
        steps.append(logits(loaded, seq)[:, -1])
        seq = torch.cat([seq, steps[-1].argmax(-1, keepdim=True)], 1)
    torch.testing.assert_close(torch.stack(steps, 1), logits(loaded, seq)[:, 9:-1], rtol=1e-5, atol=1e-5)


def test_recurrent_decoding_matches_parallel_logits(model):
    for i in range(len(transformer_layers(model))):
        set_block(model, i, "attn", make_student("attn", "linear", get_block(model, i, "attn"), model.config))
    ids = tokens(n=24, batch=2)
    states, out = [None] * len(transformer_layers(model)), []
    with torch.no_grad():
        for t in range(ids.shape[1]):  # one token at a time, each layer carrying its recurrent state
            h = model.model.embed_tokens(ids[:, t : t + 1])
            pos = model.model.rotary_emb(h, torch.tensor([[t]]))
            for i, layer in enumerate(transformer_layers(model)):
                x, r = decoder_input(layer, h, "attn", pos)
                y, states[i] = layer.self_attn.step(x, pos, states[i])
                h = finish_layer(layer, r, y, "attn")
            out.append(model.lm_head(model.model.norm(h)))
    torch.testing.assert_close(torch.cat(out, 1), logits(model, ids), rtol=1e-4, atol=1e-5)


def test_incremental_decoding_with_a_cache(model):
    ids = tokens(n=16, batch=1)
    set_block(
        model, 1, "attn", make_student("attn", "window", get_block(model, 1, "attn"), model.config, window=5, sink=2)
    )
    with torch.no_grad():  # window students use the KV cache like the teacher: same logits as a re-run
        out, steps = model(ids[:, :10]), []
        for t in range(10, 16):
            out = model(ids[:, t : t + 1], past_key_values=out.past_key_values)
            steps.append(out.logits[:, -1])
    torch.testing.assert_close(torch.stack(steps, 1), logits(model, ids)[:, 10:], rtol=1e-5, atol=1e-5)
    set_block(model, 2, "attn", make_student("attn", "linear", get_block(model, 2, "attn"), model.config))
    with torch.no_grad():
        first = model(ids)  # a plain forward (HF default use_cache=True) works
        with pytest.raises(RuntimeError, match="use_cache=False"):  # linear students keep no cache
            model(ids[:, :1], past_key_values=first.past_key_values)


def test_bad_student_kwargs(model):
    teacher = get_block(model, 0, "attn")
    with pytest.raises(ValueError, match="chunk_size"):
        make_student("attn", "linear", teacher, model.config, chunk_size=0)
    with pytest.raises(ValueError, match="window"):
        make_student("attn", "window", teacher, model.config, window=0)
    with pytest.raises(ValueError, match="sink"):
        make_student("attn", "window", teacher, model.config, sink=-1)
    with pytest.raises(ValueError, match="do not fit"):
        make_student("attn", "linear", teacher, model.config, rank=4)
    assert isinstance(make_student("attn", "linear", teacher, model.config), LinearAttention)
