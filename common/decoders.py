"""Decoders: the swappable block of a transformer layer, and the students that replace them.

A target names the block: 'mlp' (the FFN) or 'attn' (self-attention). For the Llama family of
pre-norm layers (Llama, Mistral, Qwen2/3, SmolLM) a layer computes
    h -> r = h + attn(norm1(h)) -> r + mlp(norm2(r)).
`decoder_input` splits a layer just before its target block, `run_block` runs a block on a
latent, `finish_layer` completes the layer from the block's output: together they advance the
teacher's residual stream one layer at a time without the model's own forward.

A student kind is one small nn.Module class registered with `@register(target, kind)`. Its
constructor takes (teacher_block, config, **kwargs) and starts from the teacher block it
replaces (a copy, a pruned copy, or fresh weights); it records `kwargs` so a checkpoint can
rebuild it from its folder alone. A kind may also define
    calibrate(teacher_block, batches, all_reduce, pos_emb)
to fit itself to data before training: batches() iterates (latent x, teacher output y) pairs of
shape (B, T, d), batches(targets=False) the latents alone (y is None: no teacher forward);
all_reduce(t) sums a tensor over ranks in place. Calibration accumulates fixed-size
statistics in fp64 (Gram matrices, second moments) over the batches, never all activations, so its
memory does not grow with the number of tokens.
"""
import copy
import functools
import inspect
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "smollm3")
TARGET_ATTRS = {"mlp": "mlp", "attn": "self_attn"}
STUDENTS = {}  # (target, kind) -> class


def register(target, kind):
    def add(cls):
        cls.target, cls.kind = target, kind
        STUDENTS[(target, kind)] = cls
        return cls
    return add


def decoder_layers(model):
    """The model's decoder layers; a clear error for a model whose structure is not handled."""
    mtype = getattr(model.config, "model_type", "?")
    layers = getattr(getattr(model, "model", None), "layers", None)
    if mtype not in SUPPORTED_MODEL_TYPES or layers is None:
        raise ValueError(f"model type {mtype!r} is not supported: decoder swap handles the Llama family "
                         f"({', '.join(SUPPORTED_MODEL_TYPES)}); add its layer structure to common/decoders.py")
    impl = getattr(model.config, "_attn_implementation", None)
    if impl not in ("sdpa", "flash_attention_2", "flash_attention_3"):
        raise ValueError(f"attention implementation {impl!r} needs an explicit mask; load the model with "
                         f"attn_implementation='sdpa' (common.checkpoint.load_model does)")
    return layers


def check_target(model, target):
    if target not in TARGET_ATTRS:
        raise ValueError(f"unknown TARGET {target!r}: use one of {', '.join(TARGET_ATTRS)}")
    layer = decoder_layers(model)[0]
    if not hasattr(layer, TARGET_ATTRS[target]):
        raise ValueError(f"{type(layer).__name__} has no '{TARGET_ATTRS[target]}' block, so TARGET={target!r} cannot be swapped")


def check_layers(model, layers, name="LAYERS"):
    n = len(decoder_layers(model))
    bad = [i for i in layers if not 0 <= i < n]
    if bad:
        raise ValueError(f"{name} {bad} out of range: this model has layers 0..{n - 1}")


def get_block(model, i, target):
    return getattr(decoder_layers(model)[i], TARGET_ATTRS[target])


def set_block(model, i, target, block):
    """Put `block` in layer i's target slot; return the block it replaced."""
    layer = decoder_layers(model)[i]
    old = getattr(layer, TARGET_ATTRS[target])
    setattr(layer, TARGET_ATTRS[target], block)
    return old


def make_student(target, kind, teacher_block, config, **kwargs):
    cls = STUDENTS.get((target, kind))
    if cls is None:
        known = ", ".join(k for t, k in STUDENTS if t == target)
        raise ValueError(f"unknown STUDENT_KIND {kind!r} for target {target!r}; known: {known}")
    try:
        student = cls(teacher_block, config, **kwargs)
    except TypeError as e:
        raise ValueError(f"STUDENT_KWARGS {kwargs} do not fit student {kind!r}: {e}") from None
    defaults = {n: p.default for n, p in inspect.signature(cls).parameters.items() if p.default is not p.empty}
    student.kwargs = {**defaults, **kwargs}  # every argument, defaults too: the checkpoint says what was used
    return student.to(next(teacher_block.parameters()).device)


def student_specs(model):
    """[{layer, target, kind, kwargs}] for every student in the model, in layer order."""
    specs = []
    for i, layer in enumerate(decoder_layers(model)):
        for target, attr in TARGET_ATTRS.items():
            block = getattr(layer, attr)
            if (target, getattr(block, "kind", None)) in STUDENTS:
                specs.append({"layer": i, "target": target, "kind": block.kind, "kwargs": block.kwargs})
    return specs


class swapped:
    """Context manager: the model with `blocks` ({(layer, target): block}) swapped in, restored after."""

    def __init__(self, model, blocks):
        self.model, self.blocks = model, blocks

    def __enter__(self):
        self.saved = {key: set_block(self.model, *key, b) for key, b in self.blocks.items()}
        return self.model

    def __exit__(self, *exc):
        for key, b in self.saved.items():
            set_block(self.model, *key, b)


def ridge_solve(gram, cross, ridge):
    """argmin_W ||A W - Y||^2 + lam ||W||^2 from gram = A^T A (n, n) and cross = A^T Y (n, d), in fp64,
    with lam = ridge x the mean of gram's diagonal (so `ridge` does not depend on scale or token count)."""
    lam = ridge * gram.diagonal().mean().clamp_min(1e-30)
    return torch.linalg.solve(gram + lam * torch.eye(len(gram), dtype=gram.dtype, device=gram.device), cross)


def fit_linear(linear, features, batches, all_reduce, ridge):
    """Refit `linear` (weight and bias) by ridge least squares so that linear(features(x)) matches y,
    from the Gram statistics of the features accumulated in fp64 over the batches."""
    gram = cross = None
    for x, y in batches():
        a = features(x).flatten(0, -2).double()
        if linear.bias is not None:  # an all-ones feature carries the bias
            a = torch.cat([a, torch.ones_like(a[:, :1])], 1)
        y = y.flatten(0, -2).double()
        gram = a.T @ a if gram is None else gram.addmm_(a.T, a)
        cross = a.T @ y if cross is None else cross.addmm_(a.T, y)
    all_reduce(gram)
    all_reduce(cross)
    w = ridge_solve(gram, cross, ridge).T.to(linear.weight.dtype)
    if linear.bias is not None:
        w, b = w[:, :-1], w[:, -1]
        linear.bias.copy_(b)
    linear.weight.copy_(w)


def position_embeddings(model, h):
    """Rotary (cos, sin) for positions 0..T-1 of h (B, T, d), as the model's forward makes them."""
    pos = torch.arange(h.shape[1], device=h.device)[None]
    return model.model.rotary_emb(h, pos)


def decoder_input(layer, h, target, pos_emb):
    """Split layer at its target block: return (latent the block sees, residual beside it)."""
    if target == "attn":
        return layer.input_layernorm(h), h
    a = layer.self_attn(layer.input_layernorm(h), position_embeddings=pos_emb, attention_mask=None)[0]
    r = h + a
    return layer.post_attention_layernorm(r), r


def run_block(block, x, target, pos_emb):
    if target == "mlp":
        return block(x)
    return block(x, position_embeddings=pos_emb, attention_mask=None)[0]


def finish_layer(layer, residual, y, target):
    """The layer's output, given the residual from decoder_input and the target block's output y."""
    h = residual + y
    if target == "attn":
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return h


# ---------------------------------------------------------------------------------------------
# FFN students

def _intermediate_size(teacher, config):
    return getattr(teacher, "intermediate_size", None) or config.intermediate_size


@register("mlp", "copy")
class CopyMLP(nn.Module):
    """A clone of the teacher block: the distillation loss is exactly 0 at step 0 (a sanity check)."""

    def __init__(self, teacher, config):
        super().__init__()
        self.block = copy.deepcopy(teacher)

    def forward(self, x):
        return self.block(x)


ACTIVATIONS = {"relu2": lambda x: F.relu(x).square(), "gelu": F.gelu, "silu": F.silu}


@register("mlp", "prototype")
class PrototypeMLP(nn.Module):
    """Two matrices: d -> width (x2 when gated) -> d, width = scale x the teacher's intermediate
    size. The output projection starts at zero, so the student starts as the zero function;
    calibration fits it by ridge least squares on the student's random features (an extreme
    learning machine), so that it starts near the teacher."""

    def __init__(self, teacher, config, scale=1.0, activation="relu2", gated=False, bias=False, ridge=1e-3):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation {activation!r} unknown; use {', '.join(ACTIVATIONS)}")
        if ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {ridge}")
        self.ridge = ridge
        d = config.hidden_size
        self.width = max(1, int(round(scale * _intermediate_size(teacher, config))))
        self.activation, self.gated = activation, gated
        self.fc_in = nn.Linear(d, self.width * (2 if gated else 1), bias=bias)
        self.fc_out = nn.Linear(self.width, d, bias=bias)
        nn.init.normal_(self.fc_in.weight, std=1 / math.sqrt(d))
        nn.init.zeros_(self.fc_out.weight)
        if bias:
            nn.init.zeros_(self.fc_in.bias)
            nn.init.zeros_(self.fc_out.bias)

    def hidden(self, x):
        h = self.fc_in(x)
        if self.gated:
            g, h = h.chunk(2, dim=-1)
            return ACTIVATIONS[self.activation](g) * h
        return ACTIVATIONS[self.activation](h)

    def forward(self, x):
        return self.fc_out(self.hidden(x))

    @torch.no_grad()
    def calibrate(self, teacher, batches, all_reduce, pos_emb=None):
        fit_linear(self.fc_out, self.hidden, batches, all_reduce, self.ridge)


@register("mlp", "pruned")
class PrunedMLP(nn.Module):
    """A narrower FFN of the teacher's own class (SwiGLU for Llama): the `scale` fraction of the
    teacher's intermediate channels, copied from it, so it starts close to the teacher.

    importance  which channels to keep. 'weight': the largest ||gate_j|| * ||up_j|| * ||down_:,j||
                (data-blind; also the choice before calibration). 'activation': the largest
                RMS over calibration tokens of act_j = act(gate_j x) * (up_j x), times ||down_:,j||:
                the size of channel j's contribution to the output on real latents.
    refit       calibration refits the down projection by ridge least squares on the kept
                channels' activations against the teacher's output (ridge: lam = ridge x mean
                diagonal of the Gram matrix), which takes over much of the dropped channels' work.
    With importance='weight' and refit=False calibration changes nothing."""

    def __init__(self, teacher, config, scale=0.5, importance="activation", refit=True, ridge=1e-4):
        super().__init__()
        if importance not in ("activation", "weight"):
            raise ValueError(f"importance must be 'activation' or 'weight', got {importance!r}")
        if ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {ridge}")
        self.importance, self.refit, self.ridge = importance, refit, ridge
        full = _intermediate_size(teacher, config)
        width = max(1, min(full, int(round(scale * full))))
        narrow = copy.deepcopy(config)
        narrow.intermediate_size = width
        self.block = type(teacher)(narrow)
        g, u, d = teacher.gate_proj.weight, teacher.up_proj.weight, teacher.down_proj.weight
        self.keep_channels(teacher, g.float().norm(dim=1) * u.float().norm(dim=1) * d.float().norm(dim=0))

    @torch.no_grad()
    def keep_channels(self, teacher, importance):
        """Copy the teacher's channels of largest importance (in the teacher's order)."""
        keep = importance.topk(self.block.down_proj.in_features).indices.sort().values
        for name in ("gate_proj", "up_proj"):
            mine, theirs = getattr(self.block, name), getattr(teacher, name)
            mine.weight.copy_(theirs.weight[keep])
            if theirs.bias is not None:
                mine.bias.copy_(theirs.bias[keep])
        self.block.down_proj.weight.copy_(teacher.down_proj.weight[:, keep])
        if teacher.down_proj.bias is not None:
            self.block.down_proj.bias.copy_(teacher.down_proj.bias)

    @torch.no_grad()
    def calibrate(self, teacher, batches, all_reduce, pos_emb=None):
        if self.importance == "activation":
            square_sum = 0
            for x, _ in batches(targets=False):
                square_sum = square_sum + _swiglu_hidden(teacher, x).flatten(0, -2).double().square().sum(0)
            all_reduce(square_sum)
            self.keep_channels(teacher, square_sum.sqrt() * teacher.down_proj.weight.double().norm(dim=0))
        if self.refit:
            fit_linear(self.block.down_proj, functools.partial(_swiglu_hidden, self.block), batches, all_reduce,
                       self.ridge)

    def forward(self, x):
        return self.block(x)


def _swiglu_hidden(mlp, x):
    """The intermediate activations act(gate x) * (up x) of a Llama-family MLP (what down_proj sees)."""
    return mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)


from common import attention  # noqa: E402,F401  (registers the 'attn' students)
