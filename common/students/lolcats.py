"""The `lolcats` attention student: LoLCATs (Zhang et al., arXiv:2410.10254), linear attention with a learned feature
map plus a short sliding window of exact softmax attention, on the teacher module's own q, k, v. Like `linear`
(attention.py) it is a copy of the teacher's attention module whose mixing function alone is replaced.

Per head, for the query at t, with s_j = q_t.k_j * scale (softcapped where the teacher softcaps), the window the last
`window` tokens (t itself included) and m_t the largest s_j in it, one normalised sum over every earlier token:
    y_t = ( gamma sum_{j in window} exp(s_j - m_t) v_j + sum_{j <= t - window} phi_q(q_t).phi_k(k_j) v_j )
          / ( gamma sum_{j in window} exp(s_j - m_t)     + sum_{j <= t - window} phi_q(q_t).phi_k(k_j) )
as LoLCATs' code writes it (its `lolcats_llama_window_sw`): gamma = sigmoid(window_factor) per head, m_t only in the
window's terms. phi is Hedgehog's feature map (arXiv:2402.04347), a learned linear map per head then a softmax over
the features, of both signs: phi(x) = [softmax(x' W), softmax(-x' W)], 2 x feature_dim features. The older tokens
enter one linear state, sum phi_k(k_j) [v_j, 1]^T (its last column the denominator's), so a decoding cache holds
that state and the latest window - 1 keys and values, whatever the context. With `decay` (not in LoLCATs) each
head's state decays by a learned lambda per token, so the linear terms weigh the older tokens by lambda^age. With
`sink` (not in LoLCATs either) the first `sink` tokens of the sequence stay in every later query's softmax terms as
attention sinks (StreamingLLM, arXiv:2309.17453) and never enter the linear state.

`hybrid_chunked` computes it for a block of new queries: the window part banded, chunk by chunk against the chunk
and the window - 1 keys before it (no T x T scores), the linear part as chunked causal linear attention with the
state carried across chunks (tests/test_lolcats.py checks both against a token-by-token loop).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedConfig
from transformers.cache_utils import CacheLayerMixin
from transformers.integrations.sdpa_attention import repeat_kv

from common.students.attention import RecurrentAttention, RecurrentLayer, new_positions, slot_hits, take_slots
from common.students.registry import check_counts, register

# The window's weight gamma (a sigmoid: in (0, 1)) against the linear terms starts at LoLCATs' 0.1 (their
# init_window_factor -2.197 = logit 0.1); calibration tries these, with the output gain fit by least squares for each.
WINDOW_FACTOR_INIT = 0.1
CALIB_WINDOW_FACTORS = (0.03, 0.1, 0.3, 0.9)
# 256 tokens of exact softmax (LoLCATs' is 64): with 4 sinks and decay 4, the 15-layer SmolLM2-135M hybrid read 1.037x
# the teacher's perplexity at 2,048 tokens and 1.104x at 8,192 against 1.065x and 1.188x with 64, and with every
# attention converted 1.149x and 1.269x against 1.562x and 2.057x, for 192 more keys and values per layer to keep.
WINDOW = 256
# The linear state's decay starts at a 4-token memory: the 15-layer SmolLM2-135M hybrid trained on 1,024-token
# sequences read 1.107x the teacher's perplexity at 2,048 tokens and 1.164x at 8,192, against 1.172x and 1.810x
# without decay; 16, 64, 256 and 1,024 fall between, in that order (docs/attention.md#long-contexts-the-decay).
DECAY_INIT = 4
# The first 4 tokens stay in the window's softmax terms as attention sinks: that hybrid read 1.065x at 2,048 tokens
# against 1.107x without them (1.188x against 1.164x at 8,192), and with every attention converted 1.562x against
# 1.862x (2.057x against 2.322x at 8,192; docs/attention.md#attention-sinks).
SINK = 4


def feature_map(x: torch.Tensor, weight: torch.Tensor, scale: float) -> torch.Tensor:
    """Hedgehog's phi per head: x (B, H, T, D), weight (H, D, F) -> (B, H, T, 2F), [softmax(x' W), softmax(-x' W)]
    with x' = x sqrt(scale). With W standard normal these are positive random features of softmax's kernel (FAVOR+
    with antithetic samples, each half normalised): phi(q).phi(k) ~ 2 exp(q.k * scale) / F."""
    z = torch.einsum("bhtd,hdf->bhtf", x * math.sqrt(scale), weight)
    return torch.cat([z.softmax(-1), (-z).softmax(-1)], -1)


def window_sums(q, k, v, real, scale: float, window: int, chunk: int, softcap: float | None, sinks=None):
    """The window's terms, unweighted: (sum exp(s_j - m) v_j (B, H, T, D), sum exp(s_j - m) (B, H, T, 1)) over each
    query's window. q (B, H, T, D); k, v (B, H, window - 1 + T, D), the new queries' keys after the window - 1 before
    them; real (B, window - 1 + T). Each chunk of queries scores against its band of chunk + window - 1 keys alone,
    and against the sinks' keys, values (B, H, S, D) where seen (B, T, S) when `sinks` is (keys, values, seen)."""
    T = q.shape[2]
    pad = -T % chunk
    band = chunk + window - 1
    q = F.pad(q, (0, 0, 0, pad)).unflatten(2, (-1, chunk))  # (B, H, N, C, D)
    k, v = (F.pad(t, (0, 0, 0, pad)).unfold(2, band, chunk) for t in (k, v))  # (B, H, N, D, band)
    real = F.pad(real, (0, pad)).unfold(1, band, chunk)[:, None, :, None, :]  # (B, 1, N, 1, band)
    i, j = torch.arange(chunk, device=q.device)[:, None], torch.arange(band, device=q.device)
    seen = (j >= i) & (j < i + window) & real  # query i of a chunk sees band keys i .. i + window - 1
    if sinks is not None:  # the sinks after each band's keys
        N, (sink_k, sink_v, sink_seen) = q.shape[2], sinks
        k, v = (
            torch.cat([t, s.transpose(-1, -2)[:, :, None].expand(-1, -1, N, -1, -1)], -1)
            for t, s in ((k, sink_k), (v, sink_v))
        )
        sink_seen = F.pad(sink_seen, (0, 0, 0, pad)).unflatten(1, (N, chunk))[:, None]  # (B, 1, N, C, S)
        seen = torch.cat([seen, sink_seen], -1)  # seen is (B, 1, N, C, band) already
    s = q @ k * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~seen, float("-inf"))
    p = (s - s.amax(-1, keepdim=True).clamp_min(torch.finfo(s.dtype).min)).exp()  # a query seeing no key: all 0
    return (p @ v.transpose(-1, -2)).flatten(2, 3)[:, :, :T], p.sum(-1, keepdim=True).flatten(2, 3)[:, :, :T]


def linear_sums(fq, fk, u, chunk: int, state: torch.Tensor | None, log_decay: torch.Tensor | None = None):
    """Causal linear attention, strictly earlier keys: o_t = fq_t^T (state + sum_{j < t} fk_j u_j^T), chunk by chunk
    (within a chunk masked, across chunks through the summed state). fq, fk (B, H, T, F); u (B, H, T, V); state
    (B, H, F, V) or None (zeros). With log_decay (H,), log lambda per head, the state decays by lambda each token:
    o_t = fq_t^T (lambda^t state + sum_{j < t} lambda^(t - 1 - j) fk_j u_j^T). Returns (o (B, H, T, V), the state
    after all T)."""
    B, H, T, _ = fq.shape
    pad = -T % chunk
    fq, fk, u = (F.pad(t, (0, 0, 0, pad)).unflatten(2, (-1, chunk)) for t in (fq, fk, u))  # (B, H, N, C, .)
    earlier = torch.ones(chunk, chunk, dtype=torch.bool, device=fq.device).tril(-1)
    state = fq.new_zeros(B, H, fq.shape[-1], u.shape[-1]) if state is None else state
    if log_decay is None:
        o = (fq @ fk.transpose(-1, -2)).masked_fill(~earlier, 0) @ u
        after = state[:, :, None] + (fk.transpose(-1, -2) @ u).cumsum(2)  # the state after each chunk
        o = o + fq @ torch.cat([state[:, :, None], after[:, :, :-1]], 2)  # from every earlier chunk
        return o.flatten(2, 3)[:, :, :T], after[:, :, -1]
    # decayed: lambda^(i - 1 - j) within a chunk; the state, carried chunk by chunk, reaches query i as lambda^i
    i = torch.arange(chunk, device=fq.device, dtype=fq.dtype)
    g = log_decay.to(fq.dtype)[:, None]  # (H, 1)
    # (H, C, C); the exponent is clamped at 0 where masked, so a strong decay there never overflows (0 x inf in backward)
    within = ((i[:, None] - 1 - i).clamp_min(0) * g[..., None]).exp().masked_fill(~earlier, 0)
    o = ((fq @ fk.transpose(-1, -2)) * within[:, None]) @ u
    n_real = (T - torch.arange(0, T + pad, chunk, device=fq.device)).clamp(max=chunk).to(fq.dtype)  # (N,)
    to_end = ((n_real[:, None] - 1 - i).clamp_min(0) * g[..., None]).exp()  # (H, N, C): key m to its chunk's end
    added = (fk * to_end[..., None]).transpose(-1, -2) @ u  # (B, H, N, F, V): each chunk's keys at its end
    across = (n_real * g).exp()  # (H, N): the decay over each chunk's tokens
    starts = []
    for c in range(fq.shape[2]):
        starts.append(state)
        state = across[:, c, None, None] * state + added[:, :, c]
    o = o + (i * g).exp()[:, None, :, None] * (fq @ torch.stack(starts, 2))
    return o.flatten(2, 3)[:, :, :T], state


def hybrid_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor,
    fk: torch.Tensor,
    real: torch.Tensor,
    factor: torch.Tensor,
    scale: float,
    window: int,
    chunk_size: int = 64,
    state: torch.Tensor | None = None,
    softcap: float | None = None,
    log_decay: torch.Tensor | None = None,
    sinks: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    q_pos: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoLCATs' attention for T new queries q (B, H, T, D), their features fq (B, H, T, F). k, v (B, H, P + T, D):
    the keys and values of the P = window - 1 tokens before the new ones, then the new ones'; real (B, P + T) which
    of those are tokens (False: padding, or before the sequence). fk (B, H, T, F): the features of the first T of
    those keys, the ones that leave the window here. factor (H,): gamma; state (B, H, F, D + 1) or None (zeros):
    sum fk [v, 1]^T over the tokens before all those. log_decay (H,) or None: the linear terms decay (linear_sums).
    sinks (keys, values (B, H, S, D), filled (B, S)), slot p the token at position p, with q_pos (B, T) the new
    queries' positions: the window's softmax also covers each filled sink out of a query's window, and a sink's key
    never enters the linear state. Returns (y (B, H, T, D), the state after the first T keys)."""
    T, D = q.shape[2:]
    chunk = min(chunk_size, T)
    enters = real[:, :T]  # the first T keys, which leave the window here, enter the linear terms
    if sinks is not None:
        sink_pos = torch.arange(sinks[0].shape[2], device=q.device)
        sinks = (*sinks[:2], sinks[2][:, None, :] & (sink_pos <= q_pos[:, :, None] - window))  # (B, T, S)
        enters = enters & (q_pos - (window - 1) >= len(sink_pos))  # key t's position: query t's - (window - 1)
    num, den = window_sums(q, k, v, real, scale, window, chunk, softcap, sinks)
    u = torch.cat([v[:, :, :T], torch.ones_like(v[:, :, :T, :1])], -1) * enters[:, None, :, None]
    linear, state = linear_sums(fq, fk, u, chunk, state, log_decay)
    gamma = factor[:, None, None]
    den = gamma * den + linear[..., D:]  # >= gamma for a real query: its own key is in its window
    return (gamma * num + linear[..., :D]) / den.clamp_min(torch.finfo(den.dtype).tiny), state


def no_past(k: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The keys, values (B, kv_heads, window - 1, D) and real (B, window - 1) before a sequence's first token: none."""
    B, H, _, D = k.shape
    zeros = k.new_zeros(B, H, window - 1, D)
    return zeros, zeros, torch.zeros(B, window - 1, dtype=torch.bool, device=k.device)


def with_sinks(slots: tuple | None, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, sink: int) -> tuple:
    """The sink slots (keys, values (B, kv_heads, sink, D), filled (B, sink)), slot p for the token at position p
    (None or Nones: all empty), with the new tokens' k, v (B, kv_heads, T, D) at positions q_pos (B, T) written in."""
    B, H, _, D = k.shape
    if slots is None or slots[0] is None:
        slots = (k.new_zeros(B, H, sink, D), k.new_zeros(B, H, sink, D), q_pos.new_zeros(B, sink, dtype=torch.bool))
    has, column = slot_hits(q_pos, sink)
    return take_slots(has, column, k, slots[0]), take_slots(has, column, v, slots[1]), slots[2] | has


def after(past: tuple, k: torch.Tensor, v: torch.Tensor, real: torch.Tensor) -> tuple:
    """The past (keys, values, real) with the new tokens' k, v (B, kv_heads, T, D) and real (B, T) after them."""
    return torch.cat([past[0], k], 2), torch.cat([past[1], v], 2), torch.cat([past[2], real], 1)


class LolcatsLayer(RecurrentLayer):
    """A lolcats student's decoding cache, bounded whatever the context: the linear state (B, H, 2F, head_dim + 1) in
    fp32 (`state`, None before the first token) over the tokens that left the window, the latest window - 1
    tokens' keys and values (B, kv_heads, window - 1, head_dim), in the model's dtype, with `real` (B, window - 1),
    False for padding and before the first token, and the sinks' keys and values."""

    def __init__(self, shadow: CacheLayerMixin, window: int) -> None:
        super().__init__(shadow)
        self.window = window
        self.keys = self.values = self.real = None
        self.sink_keys = self.sink_values = self.sink_filled = None  # (B, kv_heads, sink, head_dim) and (B, sink)

    def extend(self, k: torch.Tensor, v: torch.Tensor, real: torch.Tensor) -> tuple:
        """The kept keys, values and real, then the new ones (T of them); keeps the latest window - 1."""
        if self.keys is None:
            self.keys, self.values, self.real = no_past(k, self.window)
        k, v, real = after((self.keys, self.values, self.real), k, v, real)
        T = real.shape[1] - (self.window - 1)
        self.keys, self.values, self.real = k[:, :, T:], v[:, :, T:], real[:, T:]
        return k, v, real


@register("attn", "lolcats")
class LolcatsAttention(RecurrentAttention):
    """LoLCATs on the teacher module's own q, k, v: softmax attention over the last `window` tokens and Hedgehog
    linear attention over the older ones, in one normalised sum.

    - q, k, v are what the teacher's module computes (projections, biases, q/k norms, rotary where the layer has
      it), scale its own scaling and the window's scores softcapped as its own (Gemma 2): a window that covers the
      sequence is the teacher's attention. k and v are repeated to every query head for grouped and multi-query
      attention, and each query head has its own feature maps and state, as in LoLCATs. The model's mask is not
      read (as `linear`'s): the student is causal, and a sliding teacher layer's window becomes this window plus
      the linear terms; left padding (common.generate) never enters the window or the state.
    - feature maps: phi_q and phi_k, one (head_dim x feature_dim) map per head each (LoLCATs' untied_head_einsum,
      no bias), applied to q and k times sqrt(scale). LoLCATs starts them at small uniform weights (phi about
      constant: the old tokens averaged); here both start at the same standard normal weights, the random features
      of softmax's kernel, so the linear terms start as a (noisy) softmax over the older tokens.
    - window: WINDOW tokens by default (LoLCATs' is 64); WINDOW's measurement is the default's reason.
    - gamma = sigmoid(window_factor) per head weights the window against the linear terms, from
      WINDOW_FACTOR_INIT; the output is a convex combination of values, in the teacher's units, times a learned
      per-channel gain from 1 (a gain of 1 is LoLCATs exactly), then the module's own output projection.
    - calibration (RecurrentAttention.calibrate): for gamma at each of CALIB_WINDOW_FACTORS, the output gain by
      least squares; the pair of least error is kept. The feature maps have no closed form: training fits them.
    - decay: the linear terms' memory at the start, in tokens (None: no decay, LoLCATs' own): each head's linear
      state decays by lambda = 1 - 1 / decay per token (lambda learned per head), so an older token's weight there
      falls as lambda^age and the linear sum stays bounded at any context; without decay it grows with the context
      and the window's share of the output shrinks as it does. DECAY_INIT's measurement is the default's reason.
    - sink: the first `sink` tokens of the sequence (positions, left padding not counted) join the window's softmax
      terms of every query whose window has passed them, and their keys never enter the linear state: trained LMs
      park much attention on the first tokens, which neither a short window nor a decayed state holds. A decoding
      cache keeps their keys and values (slot p the token at position p). SINK's measurement is the default's reason.
    feature_dim None is head_dim / 2: 2 x feature_dim = head_dim features, LoLCATs' 64 on head_dim 128. chunk_size
    only sets how a sequence is split; results do not depend on it.
    """

    # the arguments added after the first checkpoints, as those were built (common.checkpoint.add_students)
    ADDED_KWARGS = {"decay": None, "sink": 0}

    def __init__(
        self,
        teacher: nn.Module,
        config: PreTrainedConfig,
        window: int = WINDOW,
        feature_dim: int | None = None,
        chunk_size: int = 64,
        decay: float | None = DECAY_INIT,
        sink: int = SINK,
    ):
        check_counts(
            "lolcats",
            1,
            window=window,
            chunk_size=chunk_size,
            **({} if feature_dim is None else {"feature_dim": feature_dim}),
        )
        check_counts("lolcats", 0, sink=sink)
        if decay is not None and not decay > 1:
            raise ValueError(f"lolcats student: decay must be > 1 (tokens of memory) or null (none), got {decay}")
        super().__init__(teacher)
        self.window, self.chunk_size, self.sink = window, chunk_size, sink
        heads = config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        weight = torch.randn(heads, self.head_dim, feature_dim or max(1, self.head_dim // 2))
        self.feature_q, self.feature_k = nn.Parameter(weight), nn.Parameter(weight.clone())
        self.window_factor = nn.Parameter(torch.full((heads,), math.log(WINDOW_FACTOR_INIT / (1 - WINDOW_FACTOR_INIT))))
        self.out_gain = nn.Parameter(torch.ones(heads * self.head_dim))
        self.decay_logit = None  # lambda = sigmoid(decay_logit) per head: 1 - 1 / decay at the start
        if decay is not None:
            self.decay_logit = nn.Parameter(torch.full((heads,), math.log(decay - 1)))
        self.to(next(teacher.parameters()).dtype)

    def normalised(self, module, q, k, v, x, cache, scaling, softcap=None, **kwargs) -> torch.Tensor:
        """The hybrid attention of the new tokens, continuing a decoding cache's window and state: (B, T, H,
        head_dim) in fp32, before the gain."""
        layer = self.decoding_layer(cache, module, q, k)
        positions = new_positions(cache, q.shape[2]) if layer is not None else None
        B, T = q.shape[0], q.shape[2]
        q_pos = torch.arange(T, device=q.device).expand(B, T) if positions is None else positions
        if T == 1 and layer is not None and layer.state is not None:
            return self.next_token(layer, q, k, v, q_pos, scaling, softcap)
        real = q_pos >= 0
        groups, sinks = q.shape[1] // k.shape[1], None
        if self.sink:
            kept = None if layer is None else (layer.sink_keys, layer.sink_values, layer.sink_filled)
            sinks = with_sinks(kept, k, v, q_pos, self.sink)
            if layer is not None:
                layer.sink_keys, layer.sink_values, layer.sink_filled = sinks
            sinks = (repeat_kv(sinks[0], groups).float(), repeat_kv(sinks[1], groups).float(), sinks[2])
        window = self.window
        k, v, real = after(no_past(k, window), k, v, real) if layer is None else layer.extend(k, v, real)
        q, k, v = q.float(), repeat_kv(k, groups).float(), repeat_kv(v, groups).float()
        scale = q.shape[-1] ** -0.5 if scaling is None else scaling
        state = None if layer is None else layer.state
        with torch.autocast(q.device.type, enabled=False):
            fq = feature_map(q, self.feature_q.float(), scale)
            fk = feature_map(k[:, :, :T], self.feature_k.float(), scale)  # the keys that leave the window
            gamma = torch.sigmoid(self.window_factor.float())
            log_decay = None if self.decay_logit is None else F.logsigmoid(self.decay_logit.float())
            o, state = hybrid_chunked(
                q, k, v, fq, fk, real, gamma, scale, window, self.chunk_size, state, softcap, log_decay, sinks, q_pos
            )
        if layer is not None:
            layer.state = state
        return o.transpose(1, 2)

    def next_token(self, layer: LolcatsLayer, q, k, v, q_pos, scaling, softcap) -> torch.Tensor:
        """normalised for one new token after the first ones (decoding's step): hybrid_chunked's sums for T = 1 in a
        few operations, each query head scored against its kv head's window and sinks (no repeated keys)."""
        B, H, _, D = q.shape
        G, window = H // k.shape[1], self.window
        keys, values, real = layer.extend(k, v, q_pos >= 0)  # (B, kv_heads, window, D): the oldest leaves the window
        leaving_k, leaving_v = repeat_kv(keys[:, :, :1], G).float(), repeat_kv(values[:, :, :1], G).float()
        enters = real[:, :1, None, None] & (q_pos - (window - 1) >= self.sink)[:, :, None, None]  # (B, 1, 1, 1)
        if self.sink:
            kept = (layer.sink_keys, layer.sink_values, layer.sink_filled)
            layer.sink_keys, layer.sink_values, layer.sink_filled = with_sinks(kept, k, v, q_pos, self.sink)
            past_window = torch.arange(self.sink, device=q.device) <= q_pos - window
            keys, values = torch.cat([layer.sink_keys, keys], 2), torch.cat([layer.sink_values, values], 2)
            real = torch.cat([layer.sink_filled & past_window, real], 1)
        scale = D**-0.5 if scaling is None else scaling
        with torch.autocast(q.device.type, enabled=False):
            q = q.float()
            s = q.reshape(B, -1, G, D) @ keys.float().transpose(-1, -2) * scale  # (B, kv_heads, G, window [+ sink])
            if softcap is not None:
                s = softcap * torch.tanh(s / softcap)
            s = s.masked_fill(~real[:, None, None], float("-inf"))
            p = (s - s.amax(-1, keepdim=True).clamp_min(torch.finfo(s.dtype).min)).exp()
            num, den = (p @ values.float()).view(B, H, 1, D), p.sum(-1).view(B, H, 1, 1)
            fq = feature_map(q, self.feature_q.float(), scale)
            fk = feature_map(leaving_k, self.feature_k.float(), scale)
            u = torch.cat([leaving_v, torch.ones_like(leaving_v[..., :1])], -1) * enters  # (B, H, 1, D + 1)
            linear = fq @ layer.state  # strictly earlier keys: the state before this step's
            decay = 1 if self.decay_logit is None else torch.sigmoid(self.decay_logit.float())[:, None, None]
            layer.state = decay * layer.state + fk.transpose(-1, -2) @ u
            gamma = torch.sigmoid(self.window_factor.float())[:, None, None]
            den = (gamma * den + linear[..., D:]).clamp_min(torch.finfo(den.dtype).tiny)
            return ((gamma * num + linear[..., :D]) / den).transpose(1, 2)

    def starts(self) -> list[dict[str, torch.Tensor]]:
        """Calibration's starts: gamma at each of CALIB_WINDOW_FACTORS in every head."""
        return [{"window_factor": torch.logit(torch.full_like(self.window_factor, g))} for g in CALIB_WINDOW_FACTORS]

    def new_cache(self, shadow: CacheLayerMixin) -> LolcatsLayer:
        return LolcatsLayer(shadow, self.window)
