"""Attention students (target 'attn'): drop-in replacements for a layer's self-attention, for any family.

A student wraps a deep copy of the teacher's attention module and replaces only its mixing function, the
softmax(q k^T) v in the middle. transformers' attention modules compute their projections, biases, q/k norms,
rotary embeddings (partial, local/global, none on NoPE layers), scaling and softcap arguments themselves, then
call the attention function that config._attn_implementation names,
    attention_interface(module, q, k, v, attention_mask, scaling=..., dropout=..., sliding_window=..., ...)
with q (B, H, T, head_dim) and k, v (B, kv_heads, S, head_dim), and apply their own output projection to its
(B, T, H, head_dim) result. The copy gets its own config naming STUDENT_ATTENTION, which calls the student's
`mix`; nothing else of the teacher's code changes, so every family's details come for free. A module that
calls torch's scaled_dot_product_attention itself (Falcon) gets that function pointed at `mix` for the length
of its forward instead. The student is called exactly as the teacher's module is and returns the same form.

  linear  gated linear attention (GLA / RWKV-6 style) on the teacher's own q, k, v, with a per-head,
          per-channel, data-dependent decay (RADLADS, arXiv:2505.03005). A recurrent state of
          (head_dim x head_dim) per head replaces the KV cache.
  window  the teacher's own attention function, with its mask restricted to the last `window` positions and
          the first `sink` ones (attention sinks): a cheap baseline, equal to the teacher when the window
          covers the sequence.
  delta   (common/students/delta.py) Gated DeltaNet, built on RecurrentAttention as `linear` is: the
          students whose mixing is a recurrence share its output gain, calibration and decoding layer.
  lolcats (common/students/lolcats.py) LoLCATs, a softmax window plus learned-feature linear attention, on
          RecurrentAttention too (its decoding layer a RecurrentLayer that also keeps the window's keys).

The GLA recurrence, per head, with S the (K x V) state and g_t <= 0 the log decay per key channel:
    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,     o_t = scale * q_t^T S_t.
`gla_step` is one step of it, `gla_recurrent` the naive loop over steps, `gla_chunked` the same numbers
computed chunk-parallel (pure PyTorch, any device), and on a GPU with flash-linear-attention installed its
Triton `chunk_gla` (same recurrence) is used instead.

Incremental decoding (common/generate.py): a student makes its own layer of the decoding cache (`new_cache`):
a `RecurrentLayer` for `linear` and `delta` (the state, whatever the context), a `WindowLayer` for `window` (keys
and values of the sinks and the last window - 1 tokens), a `LolcatsLayer` for `lolcats` (both). All answer the
model's mask bookkeeping as the teacher's own cache layer would. The cache's `real` (B, L), when set, marks left
padding, which no state or window takes in.
"""

import contextlib
import copy
import functools
import inspect
import math
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedConfig
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from common.students.fit import AllReduce, Batches, ridge_solve
from common.students.registry import check_counts, register

# Log decay per step is bounded to [-MAX_LOG_DECAY, 0], RWKV-7's bound (decay >= exp(-e^-0.5) = 0.545
# per token). It keeps exp(-cumulative log decay) inside a chunk finite in fp32: chunk_size x 0.61
# must stay well under ~88 (fp32's exp range), so chunks up to MAX_CHUNK are exact.
MAX_LOG_DECAY = math.exp(-0.5)
MAX_CHUNK = 128
# Initial decay rates (-log decay per token), log-spaced over a head's rotary pairs: the fastest
# (half-life ~1.4 tokens) on the highest rotary frequency, the slowest (half-life ~700 tokens) on
# the lowest, so heads start with a spread of memory lengths, as RWKV initialises its decays.
FAST_DECAY, SLOW_DECAY = 0.5, 1e-3
OUT_NORM_EPS = 1e-5  # per-head RMSNorm of the linear-attention output (GLA's eps)
# The normalised output is rescaled to the RMS of the token's own value vector times a learned
# per-channel gain starting here. Softmax attention outputs a convex combination of values: on
# SmolLM2-135M its per-head output RMS is 0.16-0.8x the value RMS (layers 0-29).
OUT_GAIN_INIT = 0.25
# Calibration (LinearAttention.calibrate) tries the initial decay rates times each of these, with the
# output gain fit by least squares for each; GAIN_RIDGE is that fit's ridge (relative to the Gram's diagonal).
DECAY_SCALES = (0.25, 0.5, 1.0, 2.0, 4.0)
GAIN_RIDGE = 1e-4
STUDENT_ATTENTION = "layerwise_student"  # the attention implementation a student's copy of the teacher names
_TORCH_SDPA = F.scaled_dot_product_attention  # the real one, while a Falcon-style forward has it pointed at `mix`


def gla_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, state: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of the recurrence. q, k, g: (B, H, K); v: (B, H, V); state: (B, H, K, V)."""
    state = state * g.exp()[..., None] + k[..., None] * v[..., None, :]
    return scale * torch.einsum("bhk,bhkv->bhv", q, state), state


def gla_recurrent(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, scale: float, state: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The naive recurrence, token by token. q, k, g: (B, H, T, K); v: (B, H, T, V); state: (B, H, K, V)
    or None for zeros. Returns (o (B, H, T, V), final state)."""
    B, H, _, K = q.shape
    if state is None:
        state = q.new_zeros(B, H, K, v.shape[-1])
    out = []
    for q_t, k_t, v_t, g_t in zip(*(x.unbind(2) for x in (q, k, v, g))):  # unbind: one gradient stack, not T
        o, state = gla_step(q_t, k_t, v_t, g_t, state, scale)
        out.append(o)
    return torch.stack(out, 2), state


def gla_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float,
    chunk_size: int = 64,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence computed chunk by chunk: within a chunk as masked attention with the decay folded
    into queries and keys, across chunks through the state. Same arguments and results as
    gla_recurrent. exp(-sum of g over a chunk) must fit in the dtype (see MAX_LOG_DECAY)."""
    B, H, T, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    pad = -T % C  # padded steps have k = v = 0 and g = 0: they change neither outputs nor state
    q, k, v, g = (F.pad(x, (0, 0, 0, pad)).unflatten(2, (-1, C)) for x in (q, k, v, g))  # (B, H, N, C, .)
    G = g.cumsum(3)  # log decay from the chunk start to each position (inclusive)
    G_end = G[:, :, :, -1:]
    q_in = q * G.exp() * scale  # queries read states decayed to their position
    k_in = k * (-G).exp()
    k_end = k * (G_end - G).exp()  # keys as they stand at the chunk's end
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    o = (q_in @ k_in.transpose(-1, -2)).masked_fill(~causal, 0) @ v  # within each chunk
    S = q.new_zeros(B, H, K, V) if state is None else state
    starts = []  # the state entering each chunk
    for n in range(q.shape[2]):
        starts.append(S)
        S = S * G_end[:, :, n, 0, :, None].exp() + k_end[:, :, n].transpose(-1, -2) @ v[:, :, n]
    o = o + q_in @ torch.stack(starts, 2)  # from earlier chunks
    return o.flatten(2, 3)[:, :, :T], S


@functools.cache
def fla_chunk_gla() -> Callable[..., tuple[torch.Tensor, torch.Tensor | None]] | None:
    """flash-linear-attention's Triton chunk_gla ((B, T, H, K) layout) when installed, else None."""
    try:
        from fla.ops.gla import chunk_gla
    except ImportError:
        return None
    if "head_first" in inspect.signature(chunk_gla).parameters:  # fla < 0.3 has a layout switch
        return functools.partial(chunk_gla, head_first=False)
    return chunk_gla


# ---------------------------------------------------------------------------------------------- mixing
def student_attention(module: nn.Module, query, key, value, attention_mask, **kwargs) -> tuple:
    """The attention function a student's copy of the teacher module calls: the mixing its student set on it."""
    return module.mixing(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(STUDENT_ATTENTION, student_attention)


def calls_interface(teacher: nn.Module) -> bool:
    """Whether the module's family calls transformers' attention interface (all but a few, such as Falcon,
    that call torch's scaled_dot_product_attention themselves)."""
    return hasattr(sys.modules[type(teacher).__module__], "ALL_ATTENTION_FUNCTIONS")


def torch_sdpa_attention(module: nn.Module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The attention of a module that calls torch's scaled_dot_product_attention itself, as it calls it (a mask,
    or none and causal over more than one query), in the attention interface's form."""
    is_causal = attention_mask is None and query.shape[2] > 1
    out = _TORCH_SDPA(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, is_causal=is_causal, scale=scaling
    )
    return out.transpose(1, 2), None


def teacher_attention(teacher: nn.Module) -> Callable:
    """The attention function the teacher module calls: 'sdpa' from transformers' interface, 'eager' its
    family's own eager_attention_forward (Gemma 2's softcaps). Raises ValueError for implementations whose
    masks are not tensors (flash, flex), which a window cannot restrict."""
    if not calls_interface(teacher):
        return torch_sdpa_attention
    name = teacher.config._attn_implementation
    if name == "eager":
        return sys.modules[type(teacher).__module__].eager_attention_forward
    if name != "sdpa":
        raise ValueError(
            f"window students restrict the teacher's mask: load it with eager or sdpa attention, not {name}"
        )
    return ALL_ATTENTION_FUNCTIONS[name]


@contextlib.contextmanager
def sdpa_calls_mixing(module: nn.Module):
    """For the length of a `with` block, torch's scaled_dot_product_attention runs the module's mixing function:
    how a student replaces the mixing of a family that calls that function itself."""

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        # is_causal is only ever set without a mask, which the mixing functions read as causal
        return module.mixing(module, query, key, value, attn_mask, dropout=dropout_p, scaling=scale)[0].transpose(1, 2)

    saved, F.scaled_dot_product_attention = F.scaled_dot_product_attention, sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = saved


class StudentAttention(nn.Module):
    """A deep copy of the teacher's attention module (`attn`) whose mixing function is the subclass's `mix`:
        mix(module, q, k, v, attention_mask, *, x, cache, scaling=None, **kwargs) -> (output (B, T, H, hd), weights)
    with x the block's input and cache the transformers Cache the module was called with (or None)."""

    def __init__(self, teacher: nn.Module) -> None:
        super().__init__()
        self.calls_interface = calls_interface(teacher)
        name = teacher.config._attn_implementation
        if not self.calls_interface and name not in ("sdpa", "eager"):  # flash: another class, no sdpa call
            raise ValueError(
                f"{type(teacher).__name__} students need the teacher loaded with sdpa or eager, not {name}"
            )
        self.attn = copy.deepcopy(teacher)  # its own config too
        # a Falcon-style module takes its sdpa branch, where its call to torch's sdpa is redirected to `mix`
        self.attn.config._attn_implementation = STUDENT_ATTENTION if self.calls_interface else "sdpa"

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        x = args[0] if args else kwargs["hidden_states"]
        cache = next((a for a in (*args, *kwargs.values()) if isinstance(a, Cache)), None)  # any keyword name
        self.attn.mixing = functools.partial(self.mix, x=x, cache=cache)
        try:
            with contextlib.nullcontext() if self.calls_interface else sdpa_calls_mixing(self.attn):
                return self.attn(*args, **kwargs)
        finally:
            del self.attn.mixing

    def mixing_as(self, mix: Callable, forward: Callable, x: torch.Tensor) -> torch.Tensor:
        """forward(self, x) (calibrate's: the block run as its layer calls it) with `mix` as the mixing function."""
        self.mix = mix  # an instance attribute over the method, for this call only
        try:
            return forward(self, x)
        finally:
            del self.mix


def cache_layer(cache: Cache | None, layer_idx: int) -> CacheLayerMixin | None:
    return cache.layers[layer_idx] if cache is not None and layer_idx < len(cache.layers) else None


def new_positions(cache: Cache | None, tokens: int) -> torch.Tensor | None:
    """(B, tokens): the new tokens' positions, real tokens counted and -1 on left padding, from the decoding
    cache's `real`; None when it has none (no padding known: positions are token indices)."""
    real = getattr(cache, "real", None)
    if real is None:
        return None
    return (real.long().cumsum(1) - 1)[:, -tokens:].masked_fill(~real[:, -tokens:], -1)


# ---------------------------------------------------------------------------------------------- decoding caches
class StudentCacheLayer(CacheLayerMixin):
    """A student's layer of a decoding cache. The model sizes its masks by asking the cache for a layer's
    get_seq_length, get_mask_sizes and is_sliding: a student's layer answers as the teacher's own layer at its
    index would, through `shadow`, that layer fed the new tokens' shapes only (meta tensors: no memory) when it is
    next asked (the model asks one layer of each kind; a meta update per token cost a quarter of a student layer's
    decoding step on CPU). `update` hands the new keys and values back alone: the mixing function keeps what it
    needs."""

    def __init__(self, shadow: CacheLayerMixin) -> None:
        super().__init__()
        self.shadow, self.is_sliding = shadow, getattr(shadow, "is_sliding", False)
        self.unfed = 0  # tokens updated since the shadow was last fed

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple:
        self.unfed += key_states.shape[2]
        return key_states, value_states

    def fed(self) -> CacheLayerMixin:
        """The shadow after every token so far, fed at once (a teacher layer fed tokens in one update or in several
        ends the same)."""
        if self.unfed:
            shape = torch.empty(1, 1, self.unfed, 1, device="meta")
            self.shadow.update(shape, shape)
            self.unfed = 0
        return self.shadow

    def get_seq_length(self) -> int:
        return self.fed().get_seq_length()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.fed().get_mask_sizes(query_length)

    def get_max_length(self) -> int:
        return self.fed().get_max_length()


class RecurrentLayer(StudentCacheLayer):
    """A recurrent student's decoding cache (linear, delta; lolcats' subclasses it): its state (B, H, head_dim,
    head_dim) in fp32, None before the first token."""

    def __init__(self, shadow: CacheLayerMixin) -> None:
        super().__init__(shadow)
        self.state = None


class WindowLayer(StudentCacheLayer):
    """A window student's decoding cache, bounded whatever the context: `sink` slots, slot p holding the keys
    and values (B, kv_heads, sink, head_dim) of the token at position p (an attention sink) and that token's
    index (B, sink; -1 = empty), then the latest window - 1 tokens' keys and values with their positions
    (B, R; -1 = padding, or a sink that its slot holds)."""

    def __init__(self, shadow: CacheLayerMixin, window: int, sink: int) -> None:
        super().__init__(shadow)
        self.window, self.sink = window, sink
        self.seen = 0  # tokens so far, padding included: the next token's index
        self.sink_index = None
        self.mask_offset = 0  # the token index of the model's mask's first column, for the latest tokens

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple:
        self.mask_offset = self.get_mask_sizes(key_states.shape[2])[1]  # before the update, as the model sized its mask
        return super().update(key_states, value_states)

    def extend(self, keys: torch.Tensor, values: torch.Tensor, q_pos: torch.Tensor | None) -> tuple:
        """The slots and latest tokens, then the new ones at positions q_pos (B, T; None: their token indices).
        Returns (keys, values, each key's token index and position (B, S), each new token's index and position
        (B, T)); then keeps what later tokens can see."""
        B, H, T, D = keys.shape
        if self.sink_index is None:
            self.start(keys)
        q_index = torch.arange(self.seen, self.seen + T, device=keys.device).expand(B, T)
        q_pos = q_index if q_pos is None else q_pos
        latest = torch.arange(self.seen - self.keys.shape[2], self.seen, device=keys.device).expand(B, -1)
        slot_pos = torch.arange(self.sink, device=keys.device).expand(B, -1).masked_fill(self.sink_index < 0, -1)
        out = (
            torch.cat([self.sink_keys, self.keys, keys], 2),
            torch.cat([self.sink_values, self.values, values], 2),
            torch.cat([self.sink_index, latest, q_index], 1),
            torch.cat([slot_pos, self.positions, q_pos], 1),
        )
        self.seen += T
        self.fill_slots(keys, values, q_index, q_pos)
        recent = slice(self.sink + max(0, out[0].shape[2] - self.sink - (self.window - 1)), None)
        self.keys, self.values = out[0][:, :, recent], out[1][:, :, recent]
        self.positions = out[3][:, recent].masked_fill(out[3][:, recent] < self.sink, -1)  # in a slot, or padding
        return (*out, q_index, q_pos)

    def start(self, keys: torch.Tensor) -> None:
        B, H, _, D = keys.shape
        self.sink_keys, self.sink_values = keys.new_zeros(B, H, self.sink, D), keys.new_zeros(B, H, self.sink, D)
        self.sink_index = torch.full((B, self.sink), -1, device=keys.device)
        self.keys, self.values, self.positions = keys[:, :, :0], keys[:, :, :0], self.sink_index[:, :0]

    def fill_slots(self, keys, values, q_index, q_pos) -> None:
        """Write the new tokens at positions below `sink` into their slots (at most one per row and slot)."""
        has, column = slot_hits(q_pos, self.sink)
        self.sink_keys = take_slots(has, column, keys, self.sink_keys)
        self.sink_values = take_slots(has, column, values, self.sink_values)
        self.sink_index = torch.where(has, q_index.gather(1, column), self.sink_index)


def slot_hits(q_pos: torch.Tensor, sink: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sink slots, slot p for the token at position p: which of them (B, sink) the new tokens at positions q_pos
    (B, T) fill, and the column of each one's token among the new ones (B, sink)."""
    at = q_pos[:, :, None] == torch.arange(sink, device=q_pos.device)  # (B, T, sink)
    return at.any(1), at.int().argmax(1)


def take_slots(has: torch.Tensor, column: torch.Tensor, new: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """kept (B, H, sink, D) with each slot that `has` (B, sink) replaced by new (B, H, T, D) at its column."""
    B, H, _, D = new.shape
    return torch.where(has[:, None, :, None], new.gather(2, column[:, None, :, None].expand(B, H, -1, D)), kept)


# ---------------------------------------------------------------------------------------------- linear
def value_rms(o: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """o rescaled per head and token to the RMS of v (both (B, H, T, head_dim)): an RMSNorm to the value's units."""
    ratio = (v.square().mean(-1, keepdim=True) + OUT_NORM_EPS) / (o.square().mean(-1, keepdim=True) + OUT_NORM_EPS)
    return o * ratio.sqrt()


class RecurrentAttention(StudentAttention):
    """A student whose mixing is a recurrence over the teacher module's own q, k, v (lolcats': and a window), with a
    state of constant size (a RecurrentLayer when decoding). A subclass sets `head_dim` and `out_gain` (heads * head_dim) and defines
        normalised(module, q, k, v, x, cache, scaling, **kwargs) -> (B, T, H, head_dim) fp32, its output before the
            gain (kwargs: the rest of the attention call's, such as softcap)
        starts() -> [{parameter name: value}, ...], the starts calibration tries.
    The mixing output is normalised times out_gain, then the module's own output projection."""

    def mix(self, module, query, key, value, attention_mask, *, x, cache, scaling=None, **kwargs) -> tuple:
        z = self.normalised(module, query, key, value, x, cache, scaling, **kwargs)
        return (z * self.out_gain.view(z.shape[2:])).to(value.dtype), None

    def decoding_layer(self, cache: Cache | None, module: nn.Module, q: torch.Tensor, k: torch.Tensor):
        """The module's RecurrentLayer in a decoding cache, or None; refuses a transformers KV cache, whose keys
        would be the new tokens' alone."""
        layer = cache_layer(cache, module.layer_idx)
        if not isinstance(layer, RecurrentLayer) and k.shape[2] != q.shape[2]:
            raise ValueError(
                f"a {self.kind} attention student keeps no KV cache: decode with common.generate (its "
                "decoding_cache), or run the whole sequence with use_cache=False"
            )
        return layer if isinstance(layer, RecurrentLayer) else None

    @torch.no_grad()
    def calibrate(self, teacher: nn.Module, batches: Batches, all_reduce: AllReduce, forward: Callable) -> None:
        """A start fit to data: for each of starts(), the output gain that best maps the normalised output z to the
        teacher's (y = W (z * gain) + b is linear in the gain: a least-squares fit from fp64 statistics); keeps the
        start and gain of least error. W and b are the module's own output projection, measured on basis vectors
        (output_map)."""
        w_out, bias = self.output_map(forward, next(iter(batches(targets=False)))[0])
        best = None
        for start in self.starts():
            for name, value in start.items():
                self.get_parameter(name).copy_(value)
            zz = zy = yy = 0
            for x, y in batches():
                z = self.normalised_output(forward, x).flatten(0, 1).double()  # (N, H * head_dim)
                y = y.flatten(0, 1).double() - bias
                zz, zy, yy = zz + z.T @ z, zy + (z * (y @ w_out)).sum(0), yy + y.square().sum()
            for t in (zz, zy, yy):
                all_reduce(t)
            gram = (w_out.T @ w_out) * zz
            gain = ridge_solve(gram, zy[:, None], GAIN_RIDGE)[:, 0]
            error = yy - 2 * gain @ zy + gain @ gram @ gain
            if best is None or error < best[0]:
                best = (error, start, gain)
        for name, value in best[1].items():
            self.get_parameter(name).copy_(value)
        self.out_gain.copy_(best[2])

    def normalised_output(self, forward: Callable, x: torch.Tensor) -> torch.Tensor:
        """z, the normalised mixing output before the gain, (B, T, H * head_dim) fp32, for the block input x."""
        seen = []

        def capture(module, query, key, value, attention_mask, *, x, cache, scaling=None, **kwargs):
            seen.append(self.normalised(module, query, key, value, x, cache, scaling, **kwargs))
            return seen[-1].to(value.dtype), None

        self.mixing_as(capture, forward, x)
        return seen[0].flatten(2)

    def output_map(self, forward: Callable, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(W (d, H * head_dim), b (d,)) in fp64 with the block's output = W (mixing output, heads flattened) + b:
        the module's own output projection (a Linear, GPT-2's Conv1D, ...), measured by running the block on x
        with a mixing function that outputs basis vectors, one per token, and zeros on the last token (for b)."""
        B, T, _ = x.shape
        width, n = self.out_gain.numel(), B * T - 1
        columns = []
        for first in range(0, width, n):
            basis = x.new_zeros(B * T, width)
            count = min(n, width - first)
            basis[torch.arange(count), first + torch.arange(count)] = 1
            out = self.mixing_as(lambda *a, **kw: (basis.view(B, T, -1, self.head_dim), None), forward, x)
            out = out.flatten(0, 1).double()
            columns.append(out[:count] - out[-1])
        return torch.cat(columns).T, out[-1]

    def new_cache(self, shadow: CacheLayerMixin) -> RecurrentLayer:
        return RecurrentLayer(shadow)


@register("attn", "linear")
class LinearAttention(RecurrentAttention):
    """Gated linear attention on the teacher module's own q, k, v.

    - q, k, v are what the teacher's module computes (projections, biases, q/k norms, rotary where the layer
      has it, none on NoPE layers or with absolute positions), k and v repeated to every query head for
      grouped and multi-query attention; scale is the module's own scaling. No feature map: q.k stays the
      teacher's score, and the output norm below does the normalising that softmax did (as in GLA and RADLADS).
    - decay: log decay = -MAX_LOG_DECAY * sigmoid(w0 + up(tanh(down(x)))) per head and key channel, from the
      block's input x; w0 starts at a spread of slow-to-fast rates, equal on each rotary pair (so rotation and
      decay commute), `down` at zero so it starts data-independent.
    - output: per-head RMSNorm, rescaled to the RMS of the token's value (times a learned gain), then the
      module's own output projection. A plain norm (GLA) fixes each head's output at unit RMS: 25-50x the
      teacher's on SmolLM2's first layer (relative MSE 1250 at init, still 3.1 after 100 steps), too far for a
      learned gain to travel in a few hundred steps; the value RMS keeps the teacher's units (relative MSE 0.43
      at init, 0.036 after the same 100 steps).
    chunk_size only sets how the CPU/PyTorch path splits the sequence; results do not depend on it.
    """

    def __init__(self, teacher: nn.Module, config: PreTrainedConfig, decay_rank: int = 32, chunk_size: int = 64):
        check_counts("linear", 1, decay_rank=decay_rank, chunk_size=chunk_size)
        if chunk_size > MAX_CHUNK:
            raise ValueError(
                f"linear student: chunk_size must be at most {MAX_CHUNK} (fp32 range of the decay), got {chunk_size}"
            )
        super().__init__(teacher)
        self.chunk_size = chunk_size
        heads = config.num_attention_heads
        self.head_dim = head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        pair = torch.arange(head_dim) % (head_dim // 2)
        rate = FAST_DECAY * (SLOW_DECAY / FAST_DECAY) ** (pair / max(1, head_dim // 2 - 1))
        self.decay_base = nn.Parameter(torch.logit(rate / MAX_LOG_DECAY).repeat(heads))
        self.decay_down = nn.Linear(config.hidden_size, decay_rank, bias=False)
        self.decay_up = nn.Linear(decay_rank, heads * head_dim, bias=False)
        nn.init.zeros_(self.decay_down.weight)
        nn.init.normal_(self.decay_up.weight, std=0.1 / math.sqrt(decay_rank))
        self.out_gain = nn.Parameter(torch.full((heads * head_dim,), OUT_GAIN_INIT))
        self.to(next(teacher.parameters()).dtype)

    def normalised(self, module, q, k, v, x, cache, scaling, **kwargs) -> torch.Tensor:
        """The recurrence over the new tokens, continuing a decoding cache's state, each head normalised to the
        RMS of its value: (B, T, H, head_dim) in fp32, before the gain."""
        layer = self.decoding_layer(cache, module, q, k)
        groups = q.shape[1] // k.shape[1]
        q, k, v = q.float(), repeat_kv(k, groups).float(), repeat_kv(v, groups).float()
        g = self.log_decay(x)
        scale = q.shape[-1] ** -0.5 if scaling is None else scaling
        if layer is not None:
            positions = new_positions(cache, q.shape[2])
            if positions is not None:  # padding gets zero values: the state, zero until the first real token, stays so
                v = v * (positions >= 0)[:, None, :, None]
            with torch.autocast(q.device.type, enabled=False):
                run = gla_recurrent if q.shape[2] == 1 else functools.partial(gla_chunked, chunk_size=self.chunk_size)
                o, layer.state = run(q, k, v, g, scale, state=layer.state)
        else:
            o = self.recurrence(q, k, v, g, scale)
        return value_rms(o, v).transpose(1, 2)

    def log_decay(self, x: torch.Tensor) -> torch.Tensor:
        """g (B, H, T, head_dim) for the block input x (B, T, d)."""
        w = self.decay_base + self.decay_up(torch.tanh(self.decay_down(x)))
        return (-MAX_LOG_DECAY * torch.sigmoid(w.float())).unflatten(-1, (-1, self.head_dim)).transpose(1, 2)

    def recurrence(self, q, k, v, g, scale) -> torch.Tensor:
        """The recurrence's outputs o (B, H, T, head_dim) over whole sequences: fla's kernel on a GPU when installed."""
        kernel = fla_chunk_gla() if q.is_cuda else None
        if kernel is not None:
            return kernel(*(t.transpose(1, 2).contiguous() for t in (q, k, v, g)), scale=scale)[0].transpose(1, 2)
        with torch.autocast(q.device.type, enabled=False):
            return gla_chunked(q, k, v, g, scale, self.chunk_size)[0]

    def starts(self) -> list[dict[str, torch.Tensor]]:
        """Calibration's starts: the initial decay rates scaled by each of DECAY_SCALES."""
        rate = MAX_LOG_DECAY * torch.sigmoid(self.decay_base.double())
        return [{"decay_base": torch.logit((rate * scale / MAX_LOG_DECAY).clamp(max=0.999))} for scale in DECAY_SCALES]


# ---------------------------------------------------------------------------------------------- window
def window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int, sink: int) -> torch.Tensor:
    """Which keys each query may see by position: within the last `window` positions or among the first `sink`
    (causality is the model's mask's)."""
    return (k_pos > q_pos - window) | (k_pos < sink)


def restricted(mask: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """A mask (bool, or additive float as eager attention takes it) that also requires `allowed` (bool)."""
    if mask.dtype == torch.bool:
        return mask & allowed
    return mask.masked_fill(~allowed, torch.finfo(mask.dtype).min)


def causal(k_index: torch.Tensor, q_index: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, S) bool: keys at or before each query by token index ((B, S), (B, T); -1 = no key)."""
    return (k_index[:, None, None, :] <= q_index[:, None, :, None]) & (k_index >= 0)[:, None, None, :]


def mask_columns(mask: torch.Tensor | None, columns: torch.Tensor, k_index: torch.Tensor, q_index: torch.Tensor):
    """The model's mask (B or 1, heads or 1, T, C) at each key's column (B, S), keys outside it masked out.
    None (sdpa leaves a plain causal mask to is_causal) is causal by token index."""
    if mask is None:
        return causal(k_index, q_index)
    B, S = columns.shape
    inside = (columns >= 0) & (columns < mask.shape[-1]) & (k_index >= 0)
    index = columns.clamp(0, mask.shape[-1] - 1)[:, None, None, :].expand(B, *mask.shape[1:3], S)
    return restricted(mask.expand(B, *mask.shape[1:]).gather(-1, index), inside[:, None, None, :])


@register("attn", "window")
class WindowAttention(StudentAttention):
    """The teacher's own attention function with its mask restricted to the last `window` positions and the
    first `sink` ones. Trained LMs park much of their attention on the first tokens ("attention sinks",
    StreamingLLM, arXiv:2309.17453); a window without them is far off the teacher in middle layers. When the
    window covers every key the model's mask goes through unchanged: the student is then the teacher exactly
    (Gemma 2's softcaps and sliding layers included). Given a decoding cache (common.generate) it keeps only the
    sinks and the last window - 1 tokens (WindowLayer); with a transformers cache it keeps every key, like the
    teacher."""

    def __init__(self, teacher: nn.Module, config: PreTrainedConfig, window: int = 256, sink: int = 4) -> None:
        check_counts("window", 1, window=window)
        check_counts("window", 0, sink=sink)
        super().__init__(teacher)
        self.window, self.sink = window, sink
        self.attention_function = teacher_attention(teacher)

    def mix(self, module, query, key, value, attention_mask, *, x, cache, **kwargs) -> tuple:
        layer = cache_layer(cache, module.layer_idx)
        if isinstance(layer, WindowLayer):
            key, value, mask = self.decoding(layer, key, value, attention_mask, new_positions(cache, query.shape[2]))
        else:
            mask = self.windowed(attention_mask, key, query.shape[2], layer)
        return self.attention_function(module, query, key, value, mask, **kwargs)

    def windowed(self, mask, key: torch.Tensor, queries: int, layer: CacheLayerMixin | None):
        """The model's mask restricted to the window, when the keys are the model's (no cache, or transformers'
        cache layer): the last key.shape[2] tokens, the queries the last of them, a mask column per key."""
        keys = key.shape[2]
        end = keys if layer is None else layer.get_seq_length()  # a sliding layer's keys end at its token count
        k_index = torch.arange(end - keys, end, device=key.device)[None]
        q_index = k_index[:, keys - queries :]
        allowed = window_mask(q_index[:, :, None], k_index[:, None, :], self.window, self.sink)
        if allowed.all():
            return mask  # as it is: the teacher exactly
        return restricted(causal(k_index, q_index) if mask is None else mask, allowed[:, None])

    def decoding(self, layer: WindowLayer, keys, values, mask, positions):
        """The kept keys and values with the new ones, and the model's mask moved onto them (its columns are the
        teacher cache layer's tokens) and restricted to the window by position."""
        keys, values, k_index, k_pos, q_index, q_pos = layer.extend(keys, values, positions)
        mask = mask_columns(mask, k_index - layer.mask_offset, k_index, q_index)
        allowed = (k_pos >= 0)[:, None, :] & window_mask(q_pos[:, :, None], k_pos[:, None, :], self.window, self.sink)
        return keys, values, restricted(mask, allowed[:, None])

    def new_cache(self, shadow: CacheLayerMixin) -> WindowLayer:
        return WindowLayer(shadow, self.window, self.sink)
