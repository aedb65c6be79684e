"""The `delta` attention student: Gated DeltaNet (Yang et al., arXiv:2412.06464), the delta rule of RWKV-7 and of
RADLADS' RAD-RWKV7 (arXiv:2505.03005), on the teacher module's own q, k, v. Like `linear` (attention.py) it is a
copy of the teacher's attention module whose mixing function alone is replaced.

The recurrence, per head, with S the (K x V) state, q_t and k_t L2-normalised, and per head and token a write
strength beta_t in (0, 1) and a log decay g_t <= 0:
    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,     o_t = scale * S_t^T q_t
(the paper writes S_{t-1} (I - beta_t k_t k_t^T) with S as (V x K)). Each step decays the state, then moves the
value it holds at k_t a fraction beta_t of the way to v_t: an associative memory that overwrites, where linear
attention only adds. `delta_step` is one token, `delta_recurrent` the naive loop (the reference), `delta_chunked`
the same numbers chunk-parallel in pure PyTorch (the WY / UT-transform form of fla's naive chunk_gated_delta_rule),
and on a GPU with flash-linear-attention installed its Triton `chunk_gated_delta_rule` is used instead.
"""

import functools
import inspect
import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedConfig
from transformers.integrations.sdpa_attention import repeat_kv

from common.students.attention import (
    MAX_LOG_DECAY,
    OUT_GAIN_INIT,
    SLOW_DECAY,
    RecurrentAttention,
    new_positions,
    value_rms,
)
from common.students.registry import check_counts, register

# Initial decay rates (-log decay per token), one per head, log-spaced at the centres of FAST_DELTA_DECAY..SLOW_DECAY
# (half-lives ~7 to ~700 tokens; a single head gets ~70). Slower than linear's fastest channels: the delta rule
# also forgets by overwriting what a key held, so no head needs to forget everything within two tokens.
FAST_DELTA_DECAY = 0.1
BETA_INIT = 0.5  # the write strength's start: halfway between keeping what a key held and replacing it
# Calibration (RecurrentAttention.calibrate) tries each pair of the initial decay rates times one of
# CALIB_DECAY_SCALES and a write strength of CALIB_BETAS, with the output gain fit by least squares for each.
CALIB_DECAY_SCALES = (0.25, 1.0, 4.0)
CALIB_BETAS = (0.1, 0.5, 0.9)


def delta_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of the recurrence. q, k: (B, H, K); v: (B, H, V); g, beta: (B, H); state: (B, H, K, V)."""
    state = state * g.exp()[..., None, None]
    write = beta[..., None] * (v - torch.einsum("bhk,bhkv->bhv", k, state))  # toward v from what S holds at k
    state = state + k[..., None] * write[..., None, :]
    return scale * torch.einsum("bhk,bhkv->bhv", q, state), state


def delta_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The naive recurrence, token by token. q, k: (B, H, T, K); v: (B, H, T, V); g, beta: (B, H, T); state:
    (B, H, K, V) or None for zeros. Returns (o (B, H, T, V), final state)."""
    B, H, _, K = q.shape
    if state is None:
        state = q.new_zeros(B, H, K, v.shape[-1])
    out = []
    for q_t, k_t, v_t, g_t, beta_t in zip(*(x.unbind(2) for x in (q, k, v, g, beta))):
        o, state = delta_step(q_t, k_t, v_t, g_t, beta_t, state, scale)
        out.append(o)
    return torch.stack(out, 2), state


def delta_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    chunk_size: int = 64,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence chunk by chunk. Within a chunk, the values each step writes, u_i = beta_i (v_i - what the
    decayed state holds at k_i), depend on the chunk's earlier writes through a unit lower-triangular system (the
    UT transform), solved for all positions at once; the state enters linearly (the WY form: u = u0 - w S). Across
    chunks the state carries. Same arguments and results as delta_recurrent. Only decays between positions in order
    (exp of sums of g <= 0) are formed, so no chunk size overflows."""
    B, H, T, K = q.shape
    V, C = v.shape[-1], chunk_size
    pad = -T % C  # padded steps have beta = g = 0: they change neither outputs nor state
    q, k, v = (F.pad(x, (0, 0, 0, pad)).unflatten(2, (-1, C)) for x in (q, k, v))  # (B, H, N, C, .)
    g, beta = (F.pad(x, (0, pad)).unflatten(2, (-1, C)) for x in (g, beta))  # (B, H, N, C)
    G = g.cumsum(-1)  # log decay from the chunk start to each position (inclusive)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    decay = (G[..., :, None] - G[..., None, :]).masked_fill(~causal, float("-inf")).exp()  # from step j to i >= j
    # (I + A) u = beta v - beta exp(G) k S_0, with A_ij = beta_i (k_i . k_j) decay_ij for j < i
    A = (beta[..., None] * (k @ k.transpose(-1, -2)) * decay).tril(-1) + torch.eye(C, device=q.device)
    rhs = torch.cat([beta[..., None] * v, (beta * G.exp())[..., None] * k], -1)
    u0, w = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True).split([V, K], -1)
    scores = (q @ k.transpose(-1, -2)) * decay * scale  # reads of this chunk's writes
    q_in = q * G.exp()[..., None] * scale  # queries read the entering state decayed to their position
    k_end = k * (G[..., -1:] - G).exp()[..., None]  # keys as they stand at the chunk's end
    S = q.new_zeros(B, H, K, V) if state is None else state
    out = []
    for n in range(q.shape[2]):
        u = u0[:, :, n] - w[:, :, n] @ S
        out.append(q_in[:, :, n] @ S + scores[:, :, n] @ u)
        S = S * G[:, :, n, -1, None, None].exp() + k_end[:, :, n].transpose(-1, -2) @ u
    return torch.stack(out, 2).flatten(2, 3)[:, :, :T], S


@functools.cache
def fla_chunk_gated_delta_rule() -> Callable[..., tuple[torch.Tensor, torch.Tensor | None]] | None:
    """flash-linear-attention's Triton chunk_gated_delta_rule ((B, T, H, K) layout, g and beta (B, T, H)) when
    installed, else None."""
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except ImportError:
        return None
    if "head_first" in inspect.signature(chunk_gated_delta_rule).parameters:  # fla < 0.3 has a layout switch
        return functools.partial(chunk_gated_delta_rule, head_first=False)
    return chunk_gated_delta_rule


@register("attn", "delta")
class DeltaAttention(RecurrentAttention):
    """Gated DeltaNet on the teacher module's own q, k, v.

    - q, k, v are what the teacher's module computes (projections, biases, q/k norms, rotary where the layer has
      it, none on NoPE layers or with absolute positions); scale is the module's own scaling. k is L2-normalised per
      head, which makes each step a contraction (eigenvalues exp(g) (1 - beta) along k, exp(g) elsewhere); q too, as
      Gated DeltaNet does: o is linear in q, so the output norm below cancels q's length and the scale anyway, and
      unit q keeps o within the state's range for bf16 and fla's kernel.
    - grouped and multi-query attention: k and v are repeated to every query head, and each query head keeps its own
      state with its own beta and decay (as `linear` does, and RWKV-7 conversions with repeat_kv). A state per kv
      head read by its group's queries is the special case of equal beta and decay across the group, which this
      contains; it costs heads (not kv_heads) x K x V of state.
    - beta = sigmoid(beta_proj(x)) and g = -MAX_LOG_DECAY * sigmoid(decay_proj(x)), per head from the block's input
      x. Both projections start at zero weight (data-independent) with biases at BETA_INIT and at a spread of decay
      rates across heads.
    - output: per-head RMSNorm rescaled to the RMS of the token's value, as `linear` (the delta rule's output is a
      read-out of values too: with beta 1 the first token's is its own value, as softmax's), times an output gate
      sigmoid(up(tanh(down(x)))) per channel, low-rank from x (RWKV-7's), times a learned gain, then the module's own
      output projection. The gate starts at 0.5 (`up` at zero: sigmoid's steepest point, free to open or close) and
      the gain at 2 x OUT_GAIN_INIT, so gate x gain starts where linear's gain does. A plain per-head norm with a
      gain (RAD-RWKV7's GroupNorm) starts at unit RMS: for `linear` that was 25-50x the teacher's output on SmolLM2's
      first layer (see LinearAttention).
    chunk_size only sets how the CPU/PyTorch path splits the sequence; results do not depend on it.
    """

    def __init__(self, teacher: nn.Module, config: PreTrainedConfig, gate_rank: int = 32, chunk_size: int = 64):
        check_counts("delta", 1, gate_rank=gate_rank, chunk_size=chunk_size)
        super().__init__(teacher)
        self.chunk_size = chunk_size
        heads, d = config.num_attention_heads, config.hidden_size
        self.head_dim = getattr(config, "head_dim", None) or d // heads
        rate = FAST_DELTA_DECAY * (SLOW_DECAY / FAST_DELTA_DECAY) ** ((torch.arange(heads) + 0.5) / heads)
        self.decay_proj, self.beta_proj = nn.Linear(d, heads), nn.Linear(d, heads)
        self.gate_down = nn.Linear(d, gate_rank, bias=False)
        self.gate_up = nn.Linear(gate_rank, heads * self.head_dim, bias=False)
        for weight in (self.decay_proj.weight, self.beta_proj.weight, self.gate_up.weight):
            nn.init.zeros_(weight)
        with torch.no_grad():
            self.decay_proj.bias.copy_(torch.logit(rate / MAX_LOG_DECAY))
            self.beta_proj.bias.fill_(math.log(BETA_INIT / (1 - BETA_INIT)))  # sigmoid's inverse
        self.out_gain = nn.Parameter(torch.full((heads * self.head_dim,), 2 * OUT_GAIN_INIT))
        self.to(next(teacher.parameters()).dtype)

    def normalised(self, module, q, k, v, x, cache, scaling, **kwargs) -> torch.Tensor:
        """The recurrence over the new tokens, continuing a decoding cache's state, each head normalised to the
        RMS of its value and gated: (B, T, H, head_dim) in fp32, before the gain."""
        layer = self.decoding_layer(cache, module, q, k)
        groups = q.shape[1] // k.shape[1]
        q, k = F.normalize(q.float(), dim=-1), F.normalize(repeat_kv(k, groups).float(), dim=-1)
        v = repeat_kv(v, groups).float()
        g, beta = self.log_decay(x), self.write_strength(x)
        scale = q.shape[-1] ** -0.5 if scaling is None else scaling
        if layer is not None:
            positions = new_positions(cache, q.shape[2])
            if positions is not None:  # padding writes nothing: the state, zero until the first real token, stays so
                beta = beta * (positions >= 0)[:, None]
            run = delta_recurrent if q.shape[2] == 1 else functools.partial(delta_chunked, chunk_size=self.chunk_size)
            with torch.autocast(q.device.type, enabled=False):
                o, layer.state = run(q, k, v, g, beta, scale, state=layer.state)
        else:
            o = self.recurrence(q, k, v, g, beta, scale)
        gate = torch.sigmoid(self.gate_up(torch.tanh(self.gate_down(x))).float())
        return value_rms(o, v).transpose(1, 2) * gate.unflatten(-1, (-1, self.head_dim))

    def log_decay(self, x: torch.Tensor) -> torch.Tensor:
        """g (B, H, T) for the block input x (B, T, d)."""
        return (-MAX_LOG_DECAY * torch.sigmoid(self.decay_proj(x).float())).transpose(1, 2)

    def write_strength(self, x: torch.Tensor) -> torch.Tensor:
        """beta (B, H, T) for the block input x (B, T, d)."""
        return torch.sigmoid(self.beta_proj(x).float()).transpose(1, 2)

    def recurrence(self, q, k, v, g, beta, scale) -> torch.Tensor:
        """The recurrence's outputs o (B, H, T, head_dim) over whole sequences: fla's kernel on a GPU when installed."""
        kernel = fla_chunk_gated_delta_rule() if q.is_cuda else None
        if kernel is not None:
            q, k, v, g, beta = (t.transpose(1, 2).contiguous() for t in (q, k, v, g, beta))
            return kernel(q, k, v, g, beta, scale=scale)[0].transpose(1, 2)
        with torch.autocast(q.device.type, enabled=False):
            return delta_chunked(q, k, v, g, beta, scale, self.chunk_size)[0]

    def starts(self) -> list[dict[str, torch.Tensor]]:
        """Calibration's starts: each pair of the initial decay rates scaled by one of CALIB_DECAY_SCALES and a
        write strength of CALIB_BETAS (the projections' biases: their data-independent parts)."""
        rate = MAX_LOG_DECAY * torch.sigmoid(self.decay_proj.bias.double())
        return [
            {
                "decay_proj.bias": torch.logit((rate * scale / MAX_LOG_DECAY).clamp(max=0.999)),
                "beta_proj.bias": torch.logit(torch.full_like(rate, beta)),
            }
            for scale in CALIB_DECAY_SCALES
            for beta in CALIB_BETAS
        ]
