"""The decoder swap: a decoder is the swappable block of a transformer layer, the slot a student takes.

A target names the block: 'mlp' (the FFN) or 'attn' (self-attention). For the Llama family of
pre-norm layers (Llama, Mistral, Qwen2/3, SmolLM) a layer computes
    h -> r = h + attn(norm1(h)) -> r + mlp(norm2(r)).
`decoder_input` splits a layer just before its target block, `run_block` runs a block on a
latent, `finish_layer` completes the layer from the block's output: together they advance the
teacher's residual stream one layer at a time without the model's own forward.

`swapped(model, blocks)` puts students into their layers' slots for the length of a `with` block;
`student_specs` lists the students a model holds (a checkpoint writes them to students.json).
"""

import torch
import torch.nn as nn

from common.students import STUDENTS

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "smollm3")
TARGET_ATTRS = {"mlp": "mlp", "attn": "self_attn"}


def transformer_layers(model: nn.Module) -> nn.ModuleList:
    """The model's transformer layers; a clear error for a model whose structure is not handled."""
    mtype = getattr(model.config, "model_type", "?")
    layers = getattr(getattr(model, "model", None), "layers", None)
    if mtype not in SUPPORTED_MODEL_TYPES or layers is None:
        raise ValueError(
            f"model type {mtype!r} is not supported: decoder swap handles the Llama family "
            f"({', '.join(SUPPORTED_MODEL_TYPES)}); add its layer structure to common/swap.py"
        )
    impl = getattr(model.config, "_attn_implementation", None)
    if impl not in ("sdpa", "flash_attention_2", "flash_attention_3"):
        raise ValueError(
            f"attention implementation {impl!r} needs an explicit mask; load the model with "
            f"attn_implementation='sdpa' (common.checkpoint.load_model does)"
        )
    return layers


def check_target(model: nn.Module, target: str) -> None:
    """Raise ValueError unless `target` names a block this model's layers have."""
    if target not in TARGET_ATTRS:
        raise ValueError(f"unknown TARGET {target!r}: use one of {', '.join(TARGET_ATTRS)}")
    layer = transformer_layers(model)[0]
    if not hasattr(layer, TARGET_ATTRS[target]):
        raise ValueError(
            f"{type(layer).__name__} has no '{TARGET_ATTRS[target]}' block, so TARGET={target!r} cannot be swapped"
        )


def check_layers(model: nn.Module, layers: list[int], name: str = "LAYERS") -> None:
    """Raise ValueError naming the constant `name` unless every index is one of the model's layers."""
    n = len(transformer_layers(model))
    bad = [i for i in layers if not 0 <= i < n]
    if bad:
        raise ValueError(f"{name} {bad} out of range: this model has layers 0..{n - 1}")


def get_block(model: nn.Module, i: int, target: str) -> nn.Module:
    """Layer i's `target` block (its decoder)."""
    return getattr(transformer_layers(model)[i], TARGET_ATTRS[target])


def set_block(model: nn.Module, i: int, target: str, block: nn.Module) -> nn.Module:
    """Put `block` in layer i's target slot; return the block it replaced."""
    layer = transformer_layers(model)[i]
    old = getattr(layer, TARGET_ATTRS[target])
    setattr(layer, TARGET_ATTRS[target], block)
    return old


def student_specs(model: nn.Module) -> list[dict]:
    """[{layer, target, kind, kwargs}] for every student in the model, in layer order."""
    specs = []
    for i, layer in enumerate(transformer_layers(model)):
        for target, attr in TARGET_ATTRS.items():
            block = getattr(layer, attr)
            if (target, getattr(block, "kind", None)) in STUDENTS:
                specs.append({"layer": i, "target": target, "kind": block.kind, "kwargs": block.kwargs})
    return specs


class swapped:
    """Context manager: the model with `blocks` ({(layer, target): block}) swapped in, restored after."""

    def __init__(self, model: nn.Module, blocks: dict):
        self.model, self.blocks = model, blocks

    def __enter__(self):
        self.saved = {key: set_block(self.model, *key, b) for key, b in self.blocks.items()}
        return self.model

    def __exit__(self, *exc):
        for key, b in self.saved.items():
            set_block(self.model, *key, b)


def position_embeddings(model: nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary (cos, sin) for positions 0..T-1 of h (B, T, d), as the model's forward makes them."""
    pos = torch.arange(h.shape[1], device=h.device)[None]
    return model.model.rotary_emb(h, pos)


def decoder_input(
    layer: nn.Module, h: torch.Tensor, target: str, pos_emb: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split layer at its target block: return (latent the block sees, residual beside it)."""
    if target == "attn":
        return layer.input_layernorm(h), h
    a = layer.self_attn(layer.input_layernorm(h), position_embeddings=pos_emb, attention_mask=None)[0]
    r = h + a
    return layer.post_attention_layernorm(r), r


def run_block(
    block: nn.Module, x: torch.Tensor, target: str, pos_emb: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """The block's output on latent x (attention blocks take the rotary embeddings, no mask: causal)."""
    if target == "mlp":
        return block(x)
    return block(x, position_embeddings=pos_emb, attention_mask=None)[0]


def finish_layer(layer: nn.Module, residual: torch.Tensor, y: torch.Tensor, target: str) -> torch.Tensor:
    """The layer's output, given the residual from decoder_input and the target block's output y."""
    h = residual + y
    if target == "attn":
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return h
