"""common/generate.py: incremental decoding through the model's own forward against the full re-run, on every
family, for the teacher and hybrids of student kinds; left-padded batches; the decoding state's size; --speed."""

import pytest
import torch
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from common.generate import decoding_cache, forward_cached, generate, left_pad, state_bytes
from common.students import make_student
from common.students.attention import RecurrentLayer, WindowLayer
from common.students.lolcats import LolcatsLayer
from common.swap import get_block, set_block
from families import FAMILIES, WINDOW, family_model

PROMPTS = [[5, 17, 42, 9, 100, 3, 8, 77, 31, 2, 4, 6, 7], [7, 8, 9], [11, 12, 13, 14, 15, 16]]
NEW = 12  # the longest prompt and NEW make 25 tokens: past the families' sliding windows of 16
STUDENT_WINDOW, SINK = 5, 2  # shorter than the prompts, so a window cache drops keys while prefilling
SETUPS = {
    "teacher": {},
    "linear+window": {0: "linear", 1: "window"},
    "window+teacher": {0: "window"},
    "delta+window": {0: "delta", 1: "window"},
    "teacher+delta": {1: "delta"},
    "lolcats+window": {0: "lolcats", 1: "window"},
    "delta+lolcats": {0: "delta", 1: "lolcats"},
    "teacher+lolcats": {1: "lolcats"},
    "lolcats with decay and sinks+delta": {0: "lolcats decay sinks", 1: "delta"},
}
# chunks of 4: the prompts prefill over several chunks, the last one partial; lolcats' window shorter than the prompts
KWARGS = {
    "linear": {"chunk_size": 4},
    "delta": {"chunk_size": 4},
    "window": {"window": STUDENT_WINDOW, "sink": SINK},
    "lolcats": {"window": STUDENT_WINDOW, "chunk_size": 4, "sink": 0, "decay": None},  # LoLCATs' own
    # a memory shorter than the tokens; the sinks out of the window after the shortest prompt's first token
    "lolcats decay sinks": {"window": STUDENT_WINDOW, "chunk_size": 4, "decay": 6, "sink": SINK},
}


def model_with(family, setup, layers=2):
    """The family's tiny model with SETUPS[setup]'s attention students ({layer: kind})."""
    model = family_model(family, layers)
    torch.manual_seed(0)
    for i, name in SETUPS[setup].items():
        kind = name.split()[0]  # "lolcats decay sinks": lolcats with KWARGS["lolcats decay sinks"]
        student = make_student("attn", kind, get_block(model, i, "attn"), model.config, **KWARGS[name])
        set_block(model, i, "attn", student)
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_incremental_decoding_equals_the_rerun(family):
    for setup in SETUPS:
        model = model_with(family, setup)
        ids = torch.tensor([PROMPTS[0]])
        ref, ref_logits = generate(model, ids, NEW, rerun=True, return_logits=True)
        out, out_logits = generate(model, ids, NEW, return_logits=True)
        assert torch.equal(out, ref), setup
        torch.testing.assert_close(out_logits, ref_logits, rtol=0, atol=1e-4, msg=setup)
        assert ref_logits.abs().max() > 1  # logits of order 1: a 1e-4 match is fp32 rounding, not smallness


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2", "gpt2", "falcon"])
def test_left_padded_rows_continue_as_alone(family):
    """In a batch of prompts of different lengths each row continues exactly as its prompt alone (GPT-2: learned
    positions, which the padding must not shift; Mistral, Gemma 2: sliding windows)."""
    ids, real = left_pad(PROMPTS, pad_id=0)
    for setup in SETUPS:
        model = model_with(family, setup)
        batch, batch_logits = generate(model, ids, 6, real=real, return_logits=True)
        for b, prompt in enumerate(PROMPTS):
            ref, ref_logits = generate(model, torch.tensor([prompt]), 6, rerun=True, return_logits=True)
            assert torch.equal(batch[b, ids.shape[1] :], ref[0, len(prompt) :]), setup
            torch.testing.assert_close(batch_logits[b], ref_logits[0], rtol=0, atol=1e-4, msg=setup)


def test_rerun_refuses_padding_and_eos_stops_rows():
    model = model_with("llama", "linear+window")
    ids, real = left_pad(PROMPTS, pad_id=0)
    with pytest.raises(ValueError, match="one length"):
        generate(model, ids, 2, real=real, rerun=True)
    free = generate(model, ids, 6, real=real)
    eos = int(free[1, ids.shape[1] + 1])  # row 1's second new token: it stops there
    out = generate(model, ids, 6, real=real, eos_id=eos)
    row = out[1, ids.shape[1] :]
    assert row[1] == eos and (row[1:] == eos).all()


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_window_student_with_a_transformers_cache(family):
    """Given transformers' own cache (model.generate's), a window student keeps every key, as the teacher does,
    and decodes as the re-run (Mistral: its cache layers slide)."""
    model = model_with(family, "window+teacher")
    ids = torch.tensor([PROMPTS[0] * 2])  # 26 tokens
    with torch.no_grad():
        out, steps = model(ids[:, :10]), []
        for t in range(10, ids.shape[1]):
            out = model(ids[:, t : t + 1], past_key_values=out.past_key_values)
            steps.append(out.logits[:, -1])
        full = model(ids, use_cache=False).logits[:, 10:]
    torch.testing.assert_close(torch.stack(steps, 1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family,teacher_layer", [("llama", DynamicLayer), ("mistral", DynamicSlidingWindowLayer)])
def test_decoding_state_per_student_kind(family, teacher_layer):
    model = family_model(family, layers=5)
    set_block(model, 0, "attn", make_student("attn", "linear", get_block(model, 0, "attn"), model.config))
    window = make_student("attn", "window", get_block(model, 1, "attn"), model.config, window=STUDENT_WINDOW, sink=SINK)
    set_block(model, 1, "attn", window)
    set_block(model, 3, "attn", make_student("attn", "delta", get_block(model, 3, "attn"), model.config))
    lolcats = make_student(
        "attn", "lolcats", get_block(model, 4, "attn"), model.config, window=STUDENT_WINDOW, sink=SINK
    )
    set_block(model, 4, "attn", lolcats)
    cache = decoding_cache(model)
    kinds = [RecurrentLayer, WindowLayer, teacher_layer, RecurrentLayer, LolcatsLayer]
    assert [type(layer) for layer in cache.layers] == kinds
    ids = torch.tensor([PROMPTS[0] * 2])  # 26 tokens
    held = [state_bytes(cache)]
    forward_cached(model, ids, cache)
    held.append(state_bytes(cache))
    for _ in range(8):
        forward_cached(model, ids[:, :1], cache)
    held.append(state_bytes(cache))
    linear, window, teacher, delta, lolcats = cache.layers
    # (head_dim x head_dim) per query head, whatever the context (delta too: its k and v are repeated to every head);
    # lolcats: (2 x feature_dim) x (head_dim + 1), its last column the normaliser's
    assert linear.state.shape == delta.state.shape == (1, 4, 16, 16) and lolcats.state.shape == (1, 4, 16, 17)
    recurrent = 4 * 4 * (2 * 16 * 16 + 16 * 17)
    assert held[1]["recurrent"] == held[2]["recurrent"] == recurrent and held[0]["recurrent"] == 0
    assert window.sink_index.tolist() == [[0, 1]] and window.positions.tolist() == [[30, 31, 32, 33]]
    assert window.keys.shape[2] == STUDENT_WINDOW - 1 and window.sink_keys.shape[2] == SINK
    # lolcats' window: the latest window - 1 tokens' keys and values per kv head (not repeated), all real here
    window_kv = (1, model.config.num_key_value_heads, STUDENT_WINDOW - 1, 16)
    assert lolcats.keys.shape == lolcats.values.shape == window_kv and lolcats.real.all()
    # and its sinks: slot p the keys and values of the token at position p (here the prompt's first tokens)
    sink_kv = (1, model.config.num_key_value_heads, SINK, 16)
    assert lolcats.sink_keys.shape == lolcats.sink_values.shape == sink_kv and lolcats.sink_filled.all()
    # the model's mask bookkeeping: student layers answer as the teacher's layer would at their index
    assert [layer.get_seq_length() for layer in cache.layers] == [34] * 5
    assert linear.get_mask_sizes(1) == window.get_mask_sizes(1) == delta.get_mask_sizes(1) == teacher.get_mask_sizes(1)
    assert lolcats.get_mask_sizes(1) == teacher.get_mask_sizes(1)
    kv = 2 * 4 * model.config.num_key_value_heads * 16  # bytes per token of one layer's keys and values
    if teacher_layer is DynamicLayer:
        assert teacher.keys.shape[2] == 34 and held[2]["kv"] - held[1]["kv"] == 8 * kv  # window: constant
    else:
        assert teacher.keys.shape[2] == WINDOW - 1 and held[2]["kv"] == held[1]["kv"]


def test_speed_at_on_a_hybrid():
    from common.evaluate import speed_at
    from common.runtime import Runtime

    models = {"teacher": model_with("llama", "teacher"), "hybrid": model_with("llama", "linear+window")}
    tokens = torch.randint(1, 320, (1, 40), generator=torch.Generator().manual_seed(0))
    short, long = (speed_at(models, tokens[:, :n], 3, Runtime("cpu")) for n in (10, 30))
    for at in (short, long):
        assert at["hybrid"]["recurrent_bytes"] == 4 * 4 * 16 * 16 and at["teacher"]["recurrent_bytes"] == 0
        assert all(r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 for r in at.values())
    assert long["teacher"]["kv_bytes"] - short["teacher"]["kv_bytes"] == 2 * 20 * 2 * 4 * 2 * 16  # 20 tokens more
    assert long["hybrid"]["kv_bytes"] == short["hybrid"]["kv_bytes"]  # linear and window layers: bounded


def test_cli_generates_a_file_of_prompts_as_one_batch(tiny_model_dir, tmp_path, capsys):
    import common.generate

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
