"""The decoder swap, for any decoder-only model in transformers: a decoder is the swappable block of a
transformer layer, the slot a student takes.

A target names the block: 'mlp' (the FFN, or a mixture of experts) or 'attn' (self-attention). Families name
their blocks differently (BLOCK_NAMES); nothing else here is per family. This module computes no layer
math of its own: the teacher's own decoder-layer forward computes every layer, called with the very
arguments the model's own forward gives it (attention masks, sliding windows, rotary embeddings, local or
global, positions), captured from that forward once per batch shape (LayerCalls). The latent a block sees
and its output are taken where the layer computes them, with hooks on the block module (run_layer), and a
student is swapped in by replacing the block module (swapped).

`student_specs` lists the students a model holds (a checkpoint writes them to students.json).
"""

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn

from common.students import STUDENTS

# The attribute that holds each target's block in a decoder layer, by family: Llama and most others use
# mlp/self_attn; GPT-2 attn, GPT-NeoX attention, Falcon self_attention; Mixtral-style MoE block_sparse_moe.
BLOCK_NAMES = {
    "mlp": ("mlp", "feed_forward", "block_sparse_moe"),
    "attn": ("self_attn", "self_attention", "attention", "attn"),
}


def transformer_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder layers: the one ModuleList of its base model that holds num_hidden_layers modules."""
    n = model.config.num_hidden_layers
    found = [m for m in model.base_model.children() if isinstance(m, nn.ModuleList) and len(m) == n]
    if len(found) != 1:
        raise ValueError(
            f"{type(model).__name__}: no single list of {n} decoder layers in {type(model.base_model).__name__}, "
            f"so it is not a decoder-only model this repo can swap blocks in"
        )
    return found[0]


def block_name(layer: nn.Module, target: str) -> str:
    """The attribute of `layer` that holds its `target` block; ValueError when it has none."""
    if target not in BLOCK_NAMES:
        raise ValueError(f"unknown block target {target!r}: use one of {', '.join(BLOCK_NAMES)}")
    for name in BLOCK_NAMES[target]:
        if isinstance(getattr(layer, name, None), nn.Module):
            return name
    raise ValueError(
        f"{type(layer).__name__} has no {target} block (none of {', '.join(BLOCK_NAMES[target])}), so its "
        f"{target!r} blocks cannot be swapped; add its name to BLOCK_NAMES in common/swap.py"
    )


def check_target(model: nn.Module, target: str) -> None:
    """Raise ValueError unless every layer of the model has a `target` block."""
    for layer in transformer_layers(model):
        block_name(layer, target)


def check_layers(model: nn.Module, layers: list[int], name: str = "LAYERS") -> None:
    """Raise ValueError naming the constant `name` unless every index is one of the model's layers."""
    n = len(transformer_layers(model))
    bad = [i for i in layers if not 0 <= i < n]
    if bad:
        raise ValueError(f"{name} {bad} out of range: this model has layers 0..{n - 1}")


def get_block(model: nn.Module, i: int, target: str) -> nn.Module:
    """Layer i's `target` block (its decoder)."""
    layer = transformer_layers(model)[i]
    return getattr(layer, block_name(layer, target))


def set_block(model: nn.Module, i: int, target: str, block: nn.Module) -> nn.Module:
    """Put `block` in layer i's target slot; return the block it replaced."""
    layer = transformer_layers(model)[i]
    name = block_name(layer, target)
    old = getattr(layer, name)
    setattr(layer, name, block)
    return old


def block_path(model: nn.Module, i: int, target: str) -> str:
    """The qualified name of layer i's target block in the model: its state_dict keys start with it and a dot."""
    layer = transformer_layers(model)[i]
    layer_path = next(name for name, m in model.named_modules() if m is layer)
    return f"{layer_path}.{block_name(layer, target)}"


def student_specs(model: nn.Module) -> list[dict]:
    """[{layer, target, kind, kwargs}] for every student in the model, in layer order."""
    specs = []
    for i, layer in enumerate(transformer_layers(model)):
        for target, names in BLOCK_NAMES.items():
            for block in (getattr(layer, name, None) for name in names):
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


# ---------------------------------------------------------------------------------------------- calls
@dataclass(frozen=True)
class Call:
    """How the model's own forward calls a module (a layer or a block) for one batch shape, less the hidden
    states: `call(module, h)` calls it so on h and returns its output tensor (the first of a tuple)."""

    args: tuple  # positional arguments after the hidden states
    kwargs: dict
    key: str | None  # the hidden states' keyword, or None when they come first among args

    def __call__(self, module: nn.Module, h: torch.Tensor) -> torch.Tensor:
        out = self.raw(module, h)
        return out[0] if isinstance(out, tuple) else out

    def raw(self, module: nn.Module, h: torch.Tensor) -> object:
        """The module's output as it returns it (a tensor, or a tuple whose first item is the tensor)."""
        if self.key is None:
            return module(h, *self.args, **self.kwargs)
        return module(*self.args, **{**self.kwargs, self.key: h})


def _split_call(args, kwargs):
    """(hidden states, Call) from a module's call arguments."""
    if args:
        return args[0], Call(tuple(args[1:]), dict(kwargs), None)
    return kwargs["hidden_states"], Call((), {k: v for k, v in kwargs.items() if k != "hidden_states"}, "hidden_states")


class _Stop(Exception):
    """Raised by a hook to end a forward once it has what it came for."""


@contextlib.contextmanager
def _hook(module: nn.Module, pre: Callable | None = None, post: Callable | None = None) -> Iterator[None]:
    """module's forward pre-hook pre(h, call) and/or forward hook post(h, out) -> replacement output or None,
    for the length of a `with` block (h: the hidden states it was called on; out: its output tensor)."""
    handles = []
    if pre is not None:
        handles.append(module.register_forward_pre_hook(lambda m, a, kw: pre(*_split_call(a, kw)), with_kwargs=True))
    if post is not None:

        def after(m, a, kw, out):
            new = post(_split_call(a, kw)[0], out[0] if isinstance(out, tuple) else out)
            if new is not None:
                return (new, *out[1:]) if isinstance(out, tuple) else new

        handles.append(module.register_forward_hook(after, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _standing_in(layers: list[nn.Module], forward: Callable) -> Iterator[None]:
    """Within the block, `forward` runs in place of each of the layers' own (an instance attribute: the model's
    loop calls it instead of the class's)."""
    for layer in layers:
        layer.forward = forward
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def _forward_until(model: nn.Module, module: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, Call]:
    """Run the base model's forward on ids until `module` is called: (its hidden states, its Call)."""
    seen = []

    def stop(h, call):
        seen.append((h, call))
        raise _Stop

    with _hook(module, pre=stop), contextlib.suppress(_Stop):
        model.base_model(input_ids=ids, use_cache=False)
    return seen[0]


@torch.no_grad()
def embed(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The input of the first decoder layer for token ids (B, T), as the model's forward computes it (token and
    position embeddings, any scaling): the start of the residual stream."""
    return _forward_until(model, transformer_layers(model)[0], ids)[0]


class LayerCalls:
    """How the model's own forward calls each decoder layer, and each layer's `target` block within it, for
    batches of shape (B, T): captured from the model's forward once per shape, on dummy tokens (nothing it
    captures depends on the token ids, only on the shape)."""

    def __init__(self, model: nn.Module, target: str) -> None:
        self.model, self.target = model, target
        self._layers, self._blocks = {}, {}
        self.output_len = None  # a layer's output: a tensor (None) or a tuple of this length; known once captured

    def layer(self, i: int, shape: tuple[int, int]) -> Call:
        """Layer i's Call for batches of shape (B, T)."""
        shape = tuple(shape)
        if shape not in self._layers:
            self._layers[shape] = self._capture_layers(shape)
        return self._layers[shape][i]

    def block(self, i: int, shape: tuple[int, int]) -> Call:
        """Layer i's target block's Call for batches of shape (B, T)."""
        key = (i, tuple(shape))
        if key not in self._blocks:
            layer = transformer_layers(self.model)[i]
            seen = []

            def stop(h, call):
                seen.append(call)
                raise _Stop

            h = torch.zeros(*shape, self.model.config.hidden_size, device=self.device)
            call = self.layer(i, shape)  # before the hook: capturing the layers' calls runs layer 0
            with torch.no_grad(), _hook(getattr(layer, block_name(layer, self.target)), pre=stop):
                with contextlib.suppress(_Stop):
                    call(layer, h)
            self._blocks[key] = seen[0]
        return self._blocks[key]

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def pass_on(self, h: torch.Tensor) -> object:
        """h in the form a layer returns its output (a stand-in layer that hands its input on)."""
        return h if self.output_len is None else (h, *[None] * (self.output_len - 1))

    @torch.no_grad()
    def _capture_layers(self, shape):
        """Every layer's Call, from one forward of the base model whose layers are stand-ins that record how
        they are called and pass the hidden states on (the layers' own compute is skipped)."""
        layers = transformer_layers(self.model)
        ids = torch.zeros(shape, dtype=torch.long, device=self.device)
        h, first = _forward_until(self.model, layers[0], ids)
        real = first.raw(layers[0], h)  # the form of a layer's output, which the stand-ins return
        self.output_len = len(real) if isinstance(real, tuple) else None
        calls = []

        def record(*args, **kwargs):
            h, call = _split_call(args, kwargs)
            calls.append(call)
            if len(calls) == len(layers):
                raise _Stop
            return self.pass_on(h)

        with _standing_in(layers, record), contextlib.suppress(_Stop):
            self.model.base_model(input_ids=ids, use_cache=False)
        return calls


def run_layer(
    model: nn.Module,
    calls: LayerCalls,
    i: int,
    h: torch.Tensor,
    on_block: Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Layer i's output on residual h (B, T, d), computed by the layer's own forward as the model calls it.
    on_block(x, y), when given, sees the target block's input latent x and output y and may return a
    replacement for y (the rest of the layer then continues from it)."""
    layer = transformer_layers(model)[i]
    call = calls.layer(i, h.shape[:2])
    if on_block is None:
        return call(layer, h)
    with _hook(getattr(layer, block_name(layer, calls.target)), post=on_block):
        return call(layer, h)


def block_input(model: nn.Module, calls: LayerCalls, i: int, h: torch.Tensor) -> torch.Tensor:
    """The latent layer i's target block sees for residual h: the layer's forward run up to that block."""
    layer, call = transformer_layers(model)[i], calls.layer(i, h.shape[:2])
    seen = []

    def stop(x, block_call):
        seen.append(x)
        raise _Stop

    with _hook(getattr(layer, block_name(layer, calls.target)), pre=stop), contextlib.suppress(_Stop):
        call(layer, h)
    return seen[0]


@contextlib.contextmanager
def starting_at(calls: LayerCalls, i: int, h: torch.Tensor) -> Iterator[None]:
    """Within the block, the model's own forward starts at layer i from the residual h (B, T, d): the layers
    before it are stand-ins that hand their input on (their compute skipped, as LayerCalls' capture does) and
    layer i is called on h. Embeddings, masks, positions, the later layers and the final norm are the model's own,
    so kd.final_hidden then gives what the model would with h as layer i's input."""
    layers = transformer_layers(calls.model)
    calls.layer(i, h.shape[:2])  # captured for this shape: the stand-ins need the form of a layer's output

    def stand_in(*args, **kwargs):
        return calls.pass_on(_split_call(args, kwargs)[0])

    def feed_h(module, args, kwargs):
        return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

    handle = layers[i].register_forward_pre_hook(feed_h, with_kwargs=True)
    try:
        with _standing_in(layers[:i], stand_in):
            yield
    finally:
        handle.remove()
