"""common/generate.py: incremental decoding against the full re-run for every student kind and hybrids,
batches of prompts of different lengths, and the size of the decoding state."""

import pytest
import torch
from transformers.cache_utils import DynamicLayer

from common.checkpoint import load_model
from common.generate import decoding_cache, forward_cached, generate, left_pad, state_bytes
from common.students import make_student
from common.students.attention import RecurrentState, WindowCache
from common.swap import get_block, set_block, transformer_layers
from conftest import make_model_folder

PROMPTS = [[5, 17, 42, 9, 100, 3, 8, 77, 31, 2, 4], [7, 8, 9], [11, 12, 13, 14, 15, 16]]
WINDOW, SINK = 5, 2  # shorter than the longest prompt, so the window cache must drop keys while prefilling


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """Four layers with order-1 logits: greedy choices are clear-cut, not fp32 coin flips."""
    return make_model_folder(str(tmp_path_factory.mktemp("gen_teacher")), layers=4, initializer_range=0.2)


def model_with(folder, setup):
    """The teacher with students: 'pruned' FFNs, 'linear' or 'window' attention everywhere, or a hybrid
    (pruned FFNs in layers 0 and 2, linear attention in 1, window in 2, the teacher's attention in 0 and 3)."""
    model = load_model(folder).eval()
    torch.manual_seed(0)
    for i in range(len(transformer_layers(model))):
        if setup == "pruned" or (setup == "hybrid" and i in (0, 2)):
            set_block(
                model, i, "mlp", make_student("mlp", "pruned", get_block(model, i, "mlp"), model.config, scale=0.5)
            )
        if setup == "linear" or (setup == "hybrid" and i == 1):
            set_block(
                model,
                i,
                "attn",
                make_student("attn", "linear", get_block(model, i, "attn"), model.config, chunk_size=4),
            )
        if setup in ("window", "window without sinks") or (setup == "hybrid" and i == 2):
            set_block(
                model,
                i,
                "attn",
                make_student(
                    "attn",
                    "window",
                    get_block(model, i, "attn"),
                    model.config,
                    window=WINDOW,
                    sink=0 if "without" in setup else SINK,
                ),
            )
    return model


@pytest.mark.parametrize("setup", ["teacher", "pruned", "linear", "window", "window without sinks", "hybrid"])
def test_incremental_decoding_equals_the_rerun(teacher_dir, setup):
    model = model_with(teacher_dir, setup)
    ids, real = left_pad(PROMPTS, pad_id=0)
    batch, batch_logits = generate(model, ids, 10, real=real, return_logits=True)
    for b, prompt in enumerate(PROMPTS):
        one = torch.tensor([prompt])
        ref, ref_logits = generate(model, one, 10, rerun=True, return_logits=True)
        out, logits = generate(model, one, 10, return_logits=True)
        assert torch.equal(out, ref)
        torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-4)
        # in a left-padded batch each row continues exactly as its prompt alone
        assert torch.equal(batch[b, ids.shape[1] :], ref[0, len(prompt) :])
        torch.testing.assert_close(batch_logits[b], ref_logits[0], rtol=0, atol=1e-4)
    assert ref_logits.abs().max() > 1  # logits of order 1: a 1e-4 match is fp32 rounding, not smallness


def test_rerun_refuses_padding_and_eos_stops_rows(teacher_dir):
    model = model_with(teacher_dir, "hybrid")
    ids, real = left_pad(PROMPTS, pad_id=0)
    with pytest.raises(ValueError, match="one length"):
        generate(model, ids, 2, real=real, rerun=True)
    free = generate(model, ids, 6, real=real)
    eos = int(free[1, ids.shape[1] + 1])  # row 1's second new token: it stops there
    out = generate(model, ids, 6, real=real, eos_id=eos)
    row = out[1, ids.shape[1] :]
    assert row[1] == eos and (row[1:] == eos).all()


def test_decoding_state_per_student_kind(teacher_dir):
    model = model_with(teacher_dir, "hybrid")
    cache = decoding_cache(model)
    assert [type(c) for c in cache.layers] == [DynamicLayer, RecurrentState, WindowCache, DynamicLayer]
    ids = torch.tensor([PROMPTS[0] * 2])  # 22 tokens
    positions = torch.arange(ids.shape[1])[None]
    held = []
    with torch.no_grad():
        forward_cached(model, ids, positions, cache)
        held.append(state_bytes(cache))
        for t in range(ids.shape[1], ids.shape[1] + 8):
            forward_cached(model, ids[:, :1], torch.tensor([[t]]), cache)
        held.append(state_bytes(cache))
    heads, head_dim = model.config.num_attention_heads, get_block(model, 1, "attn").head_dim
    assert cache.layers[1].state.shape == (1, heads, head_dim, head_dim)  # linear: the same size at any length
    assert held[0]["recurrent"] == held[1]["recurrent"] == 4 * heads * head_dim * head_dim
    assert cache.layers[2].keys.shape[2] == SINK + WINDOW - 1  # window: sinks plus the last window - 1 tokens
    assert cache.layers[2].positions.tolist() == [[0, 1, 26, 27, 28, 29]]
    kv = 2 * 4 * model.config.num_key_value_heads * head_dim  # bytes per token of one layer's keys and values
    assert cache.layers[0].keys.shape[2] == 30  # the teacher's KV cache keeps every token
    assert held[1]["kv"] - held[0]["kv"] == 2 * 8 * kv  # grows by 8 tokens in two teacher layers; window: constant


def test_cli_generates_a_file_of_prompts_as_one_batch(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import common.generate

    for name in [n for n in vars(common.generate) if n.isupper()]:  # the CLI overrides module constants
        monkeypatch.setattr(common.generate, name, getattr(common.generate, name))
    prompts = ["the cat sat on a mat and the dog", "water flows"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n\n")
    common.generate.main([tiny_model_dir, "--prompts-file", str(tmp_path / "prompts.txt"), "--max-new-tokens", "5"])
    batch = capsys.readouterr()
    alone = []
    for p in prompts:
        common.generate.main([tiny_model_dir, "--prompt", p, "--max-new-tokens", "5", "--prompts-file", ""])
        alone.append(capsys.readouterr().out.strip())
    assert batch.out.strip() == "\n\n".join(alone) and "2 x 5 new tokens" in batch.err
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(SystemExit, match="holds no prompt"):
        common.generate.main([tiny_model_dir, "--prompts-file", str(tmp_path / "empty.txt")])
