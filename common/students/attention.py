"""Attention students (target 'attn'): drop-in replacements for a layer's self-attention.

Each is called like the Hugging Face attention module it replaces,
    forward(hidden_states, position_embeddings=(cos, sin), attention_mask=None, past_key_values=None, **kw)
and returns (output, None). Students are causal by construction and ignore attention_mask (the
distillation path passes None).

  linear  gated linear attention (GLA / RWKV-6 style) with a per-head, per-channel, data-dependent
          decay, initialised from the teacher's projections (RADLADS, arXiv:2505.03005). A
          recurrent state of (head_dim x head_dim) per head replaces the KV cache.
  window  sliding-window softmax attention with the teacher's own weights, plus the first few
          tokens (attention sinks): a cheap baseline.

The GLA recurrence, per head, with S the (K x V) state and g_t <= 0 the log decay per key channel:
    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,     o_t = scale * q_t^T S_t.
`gla_step` is one step of it, `gla_recurrent` the naive loop over steps, `gla_chunked` the same
numbers computed chunk-parallel (pure PyTorch, any device), and on a GPU with
flash-linear-attention installed its Triton `chunk_gla` (same recurrence) is used instead.

Incremental decoding (common/generate.py): each student makes its own layer of the decoding cache
(`new_cache`): a `RecurrentState` for `linear` (the (head_dim x head_dim) state per head, whatever the
context), a `WindowCache` for `window` (keys and values of the sinks and the last window - 1 tokens).
Given such a cache, forward continues it over the new tokens; tokens at negative `position_ids` are
left padding (several prompts of different lengths in one batch), which no state or later token sees.
"""

import copy
import functools
import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedConfig
from transformers.cache_utils import Cache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from common.students.fit import AllReduce, Batches, ridge_solve
from common.students.registry import register

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


def _expand_heads(proj, groups, head_dim):
    """A copy of a k/v projection with each of its heads repeated `groups` times (as repeat_kv does)."""
    out = nn.Linear(proj.in_features, proj.out_features * groups, bias=proj.bias is not None)
    with torch.no_grad():
        out.weight.copy_(proj.weight.unflatten(0, (-1, head_dim)).repeat_interleave(groups, 0).flatten(0, 1))
        if proj.bias is not None:
            out.bias.copy_(proj.bias.unflatten(0, (-1, head_dim)).repeat_interleave(groups, 0).flatten())
    return out.to(proj.weight.dtype)


def _heads(teacher):
    head_dim = teacher.head_dim
    return teacher.q_proj.out_features // head_dim, head_dim


def _refuse_incremental(student, past_key_values):
    """Students keep nothing in the KV cache, so a second call with the same cache object is
    incremental decoding that would see only the new tokens: fail loudly instead."""
    if past_key_values is None:
        return
    seen = vars(past_key_values).setdefault("_attention_students_seen", set())
    if id(student) in seen:
        raise RuntimeError(
            f"{type(student).__name__} keeps no KV cache: decode with common.generate (it gives "
            f"students their own decoding cache), or re-run the whole sequence with use_cache=False"
        )
    seen.add(id(student))


def _decoding_cache(past_key_values, layer_idx):
    """This layer's entry of a decoding cache (common.generate.decoding_cache), or None."""
    layers = getattr(past_key_values, "layers", None)
    return layers[layer_idx] if layers is not None and layer_idx < len(layers) else None


def window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int, sink: int) -> torch.Tensor:
    """Which keys each query sees: causal, within the last `window` positions or among the first `sink`."""
    return (k_pos <= q_pos) & ((k_pos > q_pos - window) | (k_pos < sink))


class RecurrentState:
    """A linear student's decoding cache (one entry of a transformers Cache's `layers`): the recurrent
    state (B, H, head_dim, head_dim) in fp32, None before the first token."""

    def __init__(self) -> None:
        self.state = None


class WindowCache:
    """A window student's decoding cache: keys and values (B, kv_heads, S, head_dim) and their positions
    (B, S; -1 = empty). Slot p < sink holds position p (an attention sink); the last window - 1 columns
    hold the latest tokens, so S <= sink + window - 1 whatever the context."""

    def __init__(self, window: int, sink: int) -> None:
        self.window, self.sink = window, sink
        self.keys = self.values = self.positions = None

    def update(
        self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Add the new tokens' keys and values at `positions` (B, T; negative = left padding). Returns the
        keys and values to attend over and the mask (B, 1, T, S) of what each new token sees; then keeps
        only what later tokens can see."""
        q_pos = positions
        if self.keys is not None:
            keys, values = torch.cat([self.keys, keys], 2), torch.cat([self.values, values], 2)
            positions = torch.cat([self.positions, positions], 1)
        mask = (positions >= 0)[:, None, None] & window_mask(
            q_pos[:, None, :, None], positions[:, None, None], self.window, self.sink
        )
        mask = mask | ~mask.any(-1, keepdim=True)  # padding sees no key: let it see all (never used) rather than NaN
        (B, H, S, D), keep = keys.shape, max(0, keys.shape[2] - (self.window - 1))
        is_sink = (positions >= 0) & (positions < self.sink)
        slot = torch.where(is_sink, positions, self.sink)  # slot `sink` takes everything else and is dropped
        sink_pos = positions.new_full((B, self.sink + 1), -1).scatter(1, slot, torch.where(is_sink, positions, -1))
        index = slot[:, None, :, None].expand(B, H, S, D)
        sinks = [t.new_zeros(B, H, self.sink + 1, D).scatter(2, index, t)[:, :, : self.sink] for t in (keys, values)]
        recent = positions[:, keep:]
        self.keys, self.values = (torch.cat([s, t[:, :, keep:]], 2) for s, t in zip(sinks, (keys, values)))
        self.positions = torch.cat([sink_pos[:, : self.sink], recent.masked_fill(recent < self.sink, -1)], 1)
        return keys, values, mask


@register("attn", "linear")
class LinearAttention(nn.Module):
    """Gated linear attention initialised from a teacher attention module.

    - q, k, v, o projections are the teacher's (k, v expanded to every query head for GQA), and so
      are Qwen3's per-head q/k norms. No feature map: q.k stays the teacher's score, and the output
      norm below does the normalising that softmax did (as in GLA and RADLADS).
    - rope=True rotates q and k with the model's rotary embedding: the copied q/k weights were
      trained on rotated vectors, so the student's initial scores are the teacher's logits.
      (RADLADS' reference code makes this a switch, use_pos_emb; the decay alone also encodes
      position.) The decay is initialised equal on each rotary pair, so rotation and decay commute.
    - decay: log decay = -MAX_LOG_DECAY * sigmoid(w0 + up(tanh(down(x)))), per head and key channel;
      w0 starts at a spread of slow-to-fast rates, `down` at zero so it starts data-independent.
    - output: per-head RMSNorm, rescaled to the RMS of the token's value (times a learned gain),
      then o_proj. A plain norm (GLA) fixes each head's output at unit RMS: 25-50x the teacher's on
      SmolLM2's first layer (relative MSE 1250 at init, still 3.1 after 100 steps), too far for a
      learned gain to travel in a few hundred steps; the value RMS keeps the teacher's units
      (relative MSE 0.43 at init, 0.036 after the same 100 steps).
    chunk_size only sets how the CPU/PyTorch path splits the sequence; results do not depend on it.
    """

    def __init__(
        self,
        teacher: nn.Module,
        config: PreTrainedConfig,
        rope: bool = True,
        decay_rank: int = 32,
        chunk_size: int = 64,
    ) -> None:
        super().__init__()
        if not 1 <= chunk_size <= MAX_CHUNK:
            raise ValueError(f"chunk_size must be in 1..{MAX_CHUNK} (fp32 range of the decay), got {chunk_size}")
        self.heads, self.head_dim = _heads(teacher)
        groups = self.heads * self.head_dim // teacher.k_proj.out_features
        self.rope, self.chunk_size = rope, chunk_size
        self.scale = getattr(teacher, "scaling", self.head_dim**-0.5)
        self.q_proj, self.o_proj = copy.deepcopy(teacher.q_proj), copy.deepcopy(teacher.o_proj)
        self.k_proj = _expand_heads(teacher.k_proj, groups, self.head_dim)
        self.v_proj = _expand_heads(teacher.v_proj, groups, self.head_dim)
        self.q_norm = copy.deepcopy(teacher.q_norm) if hasattr(teacher, "q_norm") else nn.Identity()
        self.k_norm = copy.deepcopy(teacher.k_norm) if hasattr(teacher, "k_norm") else nn.Identity()
        width, d = self.heads * self.head_dim, config.hidden_size
        pair = torch.arange(self.head_dim) % (self.head_dim // 2)
        rate = FAST_DECAY * (SLOW_DECAY / FAST_DECAY) ** (pair / max(1, self.head_dim // 2 - 1))
        self.decay_base = nn.Parameter(torch.logit(rate / MAX_LOG_DECAY).repeat(self.heads))
        self.decay_down = nn.Linear(d, decay_rank, bias=False)
        self.decay_up = nn.Linear(decay_rank, width, bias=False)
        nn.init.zeros_(self.decay_down.weight)
        nn.init.normal_(self.decay_up.weight, std=0.1 / math.sqrt(decay_rank))
        self.out_gain = nn.Parameter(torch.full((width,), OUT_GAIN_INIT))
        self.layer_idx = teacher.layer_idx  # its entry in a decoding cache
        self.to(teacher.q_proj.weight.dtype)

    def features(
        self, x: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v, log decay g for hidden states x (B, T, d), each (B, H, T, head_dim)."""
        shape = (*x.shape[:2], self.heads, self.head_dim)
        q = self.q_norm(self.q_proj(x).view(shape)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(shape)).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        if self.rope:
            q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
        w = self.decay_base + self.decay_up(torch.tanh(self.decay_down(x)))
        g = -MAX_LOG_DECAY * torch.sigmoid(w.float())
        return q, k, v, g.view(shape).transpose(1, 2)

    @staticmethod
    def normalised(o: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """o normalised per head to the RMS of v, heads flattened: (B, H, T, head_dim) -> (B, T, H * head_dim)."""
        o, v = o.float(), v.float()
        o = (
            o
            * (
                (v.pow(2).mean(-1, keepdim=True) + OUT_NORM_EPS) / (o.pow(2).mean(-1, keepdim=True) + OUT_NORM_EPS)
            ).sqrt()
        )
        return o.transpose(1, 2).flatten(2)

    def output(self, o: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The normalised o times the gain, then o_proj; o, v: (B, H, T, head_dim)."""
        return self.o_proj((self.normalised(o, v) * self.out_gain).to(self.o_proj.weight.dtype))

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """The recurrence's outputs o (B, H, T, head_dim) over whole sequences."""
        kernel = fla_chunk_gla() if q.is_cuda else None
        if kernel is not None:
            return kernel(*(t.transpose(1, 2).contiguous() for t in (q, k, v, g)), scale=self.scale)[0].transpose(1, 2)
        with torch.autocast(q.device.type, enabled=False):
            f32 = torch.promote_types(q.dtype, torch.float32)
            return gla_chunked(q.to(f32), k.to(f32), v.to(f32), g.to(f32), self.scale, self.chunk_size)[0]

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        cache = _decoding_cache(past_key_values, self.layer_idx)
        if isinstance(cache, RecurrentState):
            return self.decode(hidden_states, position_embeddings, cache, kwargs["position_ids"]), None
        _refuse_incremental(self, past_key_values)
        q, k, v, g = self.features(hidden_states, position_embeddings)
        return self.output(self.mix(q, k, v, g), v), None

    @torch.no_grad()
    def calibrate(
        self,
        teacher: nn.Module,
        batches: Batches,
        all_reduce: AllReduce,
        pos_emb: tuple[torch.Tensor, torch.Tensor],
    ) -> None:
        """A start fit to data: the initial decay rates scaled by each of DECAY_SCALES, each with the
        output gain that best maps the normalised output z to the teacher's (y = o_proj(z * gain) is
        linear in the gain: a least-squares fit from fp64 statistics); keeps the pair of least error."""
        rate = MAX_LOG_DECAY * torch.sigmoid(self.decay_base.double())
        w_out = self.o_proj.weight.double()  # (d, width)
        best = None
        for decay_scale in DECAY_SCALES:
            self.decay_base.copy_(torch.logit((rate * decay_scale / MAX_LOG_DECAY).clamp(max=0.999)))
            zz = zy = yy = 0
            for x, y in batches():
                q, k, v, g = self.features(x, pos_emb)
                z = self.normalised(self.mix(q, k, v, g), v).flatten(0, 1).double()
                y = y.flatten(0, 1).double() - (0 if self.o_proj.bias is None else self.o_proj.bias.double())
                zz, zy, yy = zz + z.T @ z, zy + (z * (y @ w_out)).sum(0), yy + y.square().sum()
            for t in (zz, zy, yy):
                all_reduce(t)
            gram = (w_out.T @ w_out) * zz
            gain = ridge_solve(gram, zy[:, None], GAIN_RIDGE)[:, 0]
            error = yy - 2 * gain @ zy + gain @ gram @ gain
            if best is None or error < best[0]:
                best = (error, self.decay_base.clone(), gain)
        self.decay_base.copy_(best[1])
        self.out_gain.copy_(best[2])

    def step(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        state: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The recurrent path: continue from `state` (None at the start) over the given tokens, one
        at a time. Returns (output, new state); the state is (B, H, head_dim, head_dim) in fp32."""
        q, k, v, g = (t.float() for t in self.features(hidden_states, position_embeddings))
        o, state = gla_recurrent(q, k, v, g, self.scale, state)
        return self.output(o, v), state

    def new_cache(self) -> RecurrentState:
        return RecurrentState()

    def decode(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        cache: RecurrentState,
        position_ids: torch.Tensor,
    ) -> torch.Tensor:
        """Incremental decoding: continue cache.state over the new tokens, one token by the recurrence
        (as `step`), a prompt chunk-parallel (the same numbers). Left padding (negative positions) gets
        zero values, so the state, which starts at zero, never sees it."""
        q, k, v, g = (t.float() for t in self.features(hidden_states, position_embeddings))
        v = v * (position_ids >= 0)[:, None, :, None]
        with torch.autocast(q.device.type, enabled=False):
            if q.shape[2] == 1:
                o, cache.state = gla_recurrent(q, k, v, g, self.scale, cache.state)
            else:
                o, cache.state = gla_chunked(q, k, v, g, self.scale, self.chunk_size, cache.state)
        return self.output(o, v)


@register("attn", "window")
class WindowAttention(nn.Module):
    """The teacher's attention (a copy of its weights) restricted to the last `window` positions and
    the first `sink` ones: causal softmax attention through SDPA with an explicit boolean mask.
    Trained LMs park much of their attention on the first tokens ("attention sinks", StreamingLLM,
    arXiv:2309.17453); a window without them is far off the teacher in middle layers. Equal to the
    teacher when window >= sequence length. With a transformers KV cache it keeps every key, like the
    teacher; common.generate gives it a WindowCache instead, bounded by the window."""

    def __init__(self, teacher: nn.Module, config: PreTrainedConfig, window: int = 256, sink: int = 4) -> None:
        super().__init__()
        if window < 1 or sink < 0:
            raise ValueError(f"window must be >= 1 and sink >= 0, got window={window}, sink={sink}")
        self.attn, self.window, self.sink = copy.deepcopy(teacher), window, sink
        self.heads, self.head_dim = _heads(teacher)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        a, (B, T, _) = self.attn, hidden_states.shape
        shape = (B, T, -1, self.head_dim)
        q = a.q_proj(hidden_states).view(shape)
        k = a.k_proj(hidden_states).view(shape)
        if hasattr(a, "q_norm"):
            q, k = a.q_norm(q), a.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), a.v_proj(hidden_states).view(shape).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
        cache = _decoding_cache(past_key_values, a.layer_idx)
        if isinstance(cache, WindowCache):
            k, v, mask = cache.update(k, v, kwargs["position_ids"])
        else:
            if past_key_values is not None:
                k, v = past_key_values.update(k, v, a.layer_idx)
            L = k.shape[2]
            q_pos = torch.arange(L - T, L, device=q.device)[:, None]
            k_pos = torch.arange(L, device=q.device)[None]
            mask = window_mask(q_pos, k_pos, self.window, self.sink)
        groups = self.heads // k.shape[1]
        o = F.scaled_dot_product_attention(
            q,
            repeat_kv(k, groups),
            repeat_kv(v, groups),
            attn_mask=mask,
            scale=getattr(a, "scaling", self.head_dim**-0.5),
        )
        return a.o_proj(o.transpose(1, 2).reshape(B, T, -1)), None

    def new_cache(self) -> WindowCache:
        return WindowCache(self.window, self.sink)
