"""Tiny random models of every model family the suite checks, built from transformers' own config classes.

Each family's config turns on what makes it differ from Llama, so that a test on it exercises that difference:
sliding windows shorter than the test sequences, NoPE layers, post-norms, parallel attention and FFN, fused
projections, partial rotary, q/k norms, attention and logit softcapping, logit scaling, absolute positions,
multi-query heads and mixture-of-experts FFNs."""

import torch

VOCAB = 320  # tests/conftest.py's tokenizer
SEQ_LEN = 32  # the sequence length the family tests use: sliding windows below are shorter
WINDOW = 16

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=256,
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=None,
)
_GATED = dict(intermediate_size=128, num_key_value_heads=2)

FAMILIES = {
    "llama": dict(_GATED),
    "mistral": dict(_GATED, sliding_window=WINDOW),
    "qwen2": dict(_GATED, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),  # q/k/v biases
    "qwen3": dict(_GATED, head_dim=16),  # per-head q/k norms
    "smollm3": dict(_GATED, no_rope_layer_interval=2),  # layer 1 has no rotary (NoPE)
    "gemma": dict(intermediate_size=128, num_key_value_heads=1, head_dim=16),  # multi-query, GeGLU, scaled embeddings
    "gemma2": dict(_GATED, head_dim=16, sliding_window=WINDOW, final_logit_softcapping=5.0, attn_logit_softcapping=4.0),
    "gemma3_text": dict(_GATED, head_dim=16, sliding_window=WINDOW, sliding_window_pattern=2),  # local/global rotary
    "phi3": dict(_GATED, partial_rotary_factor=0.5),  # fused qkv_proj and gate_up_proj
    "olmo2": dict(_GATED),  # post-norms, q/k norms over the whole projection
    "granite": dict(
        _GATED, logits_scaling=2.0, embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.2
    ),
    "cohere": dict(_GATED, use_qk_norm=True, logit_scale=0.5),  # parallel attention and FFN
    "stablelm": dict(_GATED, qk_layernorm=True, partial_rotary_factor=0.25),
    "gpt_neox": dict(intermediate_size=128, rotary_pct=0.25),  # fused, head-interleaved qkv; parallel residual
    "gpt2": dict(n_inner=128),  # absolute positions, Conv1D projections
    "falcon": dict(),  # multi-query, fused qkv, parallel attention and FFN
    "qwen3_moe": dict(
        _GATED, head_dim=16, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True
    ),
}


def family_config(family: str, layers: int = 2):
    from transformers import AutoConfig

    return AutoConfig.for_model(family, **{**_COMMON, "num_hidden_layers": layers, **FAMILIES[family]})


def family_model(family: str, layers: int = 2, seed: int = 0):
    """A random model of the family in eval mode, fp32, weights scaled so that blocks output values of order 1."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = family_config(family, layers)
    config.initializer_range = 0.2
    return AutoModelForCausalLM.from_config(config).eval()
