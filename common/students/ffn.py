"""FFN students (target 'mlp'): drop-in replacements for a layer's FFN block (a dense MLP or a mixture of
experts), called as the teacher's block is, block(x) on the latent x (B, T, d), returning (B, T, d).

  copy       a clone of the teacher's block (the loss is 0 at step 0: a sanity check)
  prototype  two matrices with a chosen activation, fit by calibration on random features
  pruned     the teacher's own block at a fraction of its intermediate channels, chosen and refit on data

An FFN's shape is read from its children, with no per-family code (`ffn_layout`). A dense FFN has one
output projection, the Linear (or GPT-2's Conv1D) child that maps the intermediate size I back to the
hidden size d, and input projections mapping d to I (gate and up of SwiGLU/GeGLU, or a plain MLP's one)
or to 2I (a fused gate_up: gate half, then up half, as Phi-3's). A mixture of experts holds its experts in
one child with 3D weights gate_up_proj (E, 2I, d) and down_proj (E, d, I), the layout of Mixtral, Qwen-MoE
and most MoE models in transformers; its router and anything else in the block is kept as it is.
"""

import copy
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedConfig
from transformers.pytorch_utils import Conv1D

from common.students.fit import AllReduce, Batches, Forward, fit_linear, linear_weight, ridge_solve, ridged
from common.students.registry import register


@dataclass(frozen=True)
class FFNLayout:
    """Where an FFN block keeps its intermediate channels."""

    width: int  # the intermediate size I (of each expert, in a mixture of experts)
    # dense: (child, role), role 'in' (d -> I) or 'fused' (d -> 2I) for the inputs, then the output's 'out' (I -> d)
    projections: tuple[tuple[str, str], ...] = ()
    experts: str | None = None  # mixture of experts: the child holding the experts' 3D weights

    @property
    def output(self) -> str | None:
        return self.projections[-1][0] if self.projections else None


def _in_out(module):
    """(in, out) features of a Linear or a transformers Conv1D, else None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return module.nx, module.nf
    return None


def _experts_layout(name, experts, hidden_size):
    """The layout of an experts child with 3D gate_up_proj (E, 2I, d) and down_proj (E, d, I); ValueError for
    another layout of expert weights (transposed, interleaved gate/up, biases)."""
    gate_up, down = experts.gate_up_proj, getattr(experts, "down_proj", None)
    n, width = gate_up.shape[0], gate_up.shape[1] // 2
    if (
        not isinstance(down, nn.Parameter)
        or gate_up.shape != (n, 2 * width, hidden_size)
        or down.shape != (n, hidden_size, width)
        or getattr(experts, "is_transposed", False)
        or not getattr(experts, "is_concatenated", True)
        or getattr(experts, "has_bias", False)
    ):
        raise ValueError(
            f"{type(experts).__name__}: only experts stored as gate_up_proj (E, 2I, d) [gate; up] and down_proj "
            f"(E, d, I) without biases (Mixtral, Qwen-MoE) can be pruned; use another student kind"
        )
    return FFNLayout(width, experts=name)


def ffn_layout(block: nn.Module, hidden_size: int) -> FFNLayout:
    """The FFN's layout, read from the shapes of its children; ValueError when it has none of the shapes above."""
    for name, child in block.named_children():
        if isinstance(getattr(child, "gate_up_proj", None), nn.Parameter):
            return _experts_layout(name, child, hidden_size)
    dims = {name: _in_out(child) for name, child in block.named_children() if _in_out(child)}
    outputs = [name for name, (n_in, n_out) in dims.items() if n_out == hidden_size != n_in]
    if len(outputs) == 1:
        width = dims[outputs[0]][0]
        roles = {width: "in", 2 * width: "fused"}
        inputs = tuple((name, roles[o]) for name, (i, o) in dims.items() if i == hidden_size and o in roles)
        if inputs and len(inputs) == len(dims) - 1:  # every projection is an input or the output
            return FFNLayout(width, (*inputs, (outputs[0], "out")))
    raise ValueError(
        f"{type(block).__name__} is no FFN of a known shape (Linear/Conv1D children mapping {hidden_size} to I "
        f"or 2I and one mapping I != {hidden_size} back, or experts with 3D gate_up_proj and down_proj); use "
        f"another student kind"
    )


def _channel_weights(block, layout):
    """The block's weights that carry its intermediate channels, as [(role, weight (E, out, in), bias (E, out)
    or None)] with an expert axis first (1 for a dense FFN); role 'in' (rows are channels), 'fused' (rows are
    the gate channels, then the up ones) or 'out' (columns are channels). Views: writing them writes the block."""
    if layout.experts:
        experts = getattr(block, layout.experts)
        return [("fused", experts.gate_up_proj, None), ("out", experts.down_proj, None)]
    weights = []
    for name, role in layout.projections:
        proj = getattr(block, name)
        weights.append((role, linear_weight(proj)[None], None if proj.bias is None else proj.bias[None]))
    return weights


def weight_importance(weights: list) -> torch.Tensor:
    """||row j|| of every input projection (the gate and up halves of a fused one) times ||column j|| of the
    output projection, per expert: (E, I). Data-blind."""
    rows, columns = [], None
    for role, w, _ in weights:
        if role == "out":
            columns = w.float().norm(dim=1)
        else:
            rows += w.float().norm(dim=2).chunk(2 if role == "fused" else 1, dim=1)
    return math.prod(rows) * columns


def _narrow(block, layout, width):
    """Resize the block's channel weights to `width` channels (their values are left to keep_channels) and the
    sizes it stores: in/out_features (Conv1D: nx/nf), and intermediate_size or intermediate_dim."""
    holders = [block]  # the modules that may store the intermediate size
    if layout.experts:
        experts = getattr(block, layout.experts)
        n, _, d = experts.gate_up_proj.shape
        experts.gate_up_proj = nn.Parameter(experts.gate_up_proj.new_empty(n, 2 * width, d))
        experts.down_proj = nn.Parameter(experts.down_proj.new_empty(n, d, width))
        holders.append(experts)
    for name, role in layout.projections:
        proj = getattr(block, name)
        n_in, n_out = _in_out(proj)
        n_in, n_out = (width, n_out) if role == "out" else (n_in, width * (2 if role == "fused" else 1))
        proj.weight = nn.Parameter(proj.weight.new_empty((n_in, n_out) if isinstance(proj, Conv1D) else (n_out, n_in)))
        if proj.bias is not None:
            proj.bias = nn.Parameter(proj.bias.new_empty(n_out))
        if isinstance(proj, Conv1D):
            proj.nx, proj.nf = n_in, n_out
        else:
            proj.in_features, proj.out_features = n_in, n_out
    for module in holders:
        for key, value in list(vars(module).items()):
            if "intermediate" in key and isinstance(value, int) and value == layout.width:
                setattr(module, key, width)


class _Stop(Exception):
    """Raised by a pre-hook to end a forward once it has seen what it came for."""


def _call_args(module, run):
    """The positional arguments `module` is called with when run() runs; run stops there."""
    seen = []

    def stop(m, args):
        seen.append(args)
        raise _Stop

    handle = module.register_forward_pre_hook(stop)
    try:
        run()
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen[0]


def _projection_input(block, name, forward, x):
    """What the block's child `name` sees when the block runs on latent x as its layer calls it."""
    return _call_args(getattr(block, name), functools.partial(forward, block, x))[0]


@register("mlp", "copy")
class CopyMLP(nn.Module):
    """A clone of the teacher block: the distillation loss is exactly 0 at step 0 (a sanity check)."""

    def __init__(self, teacher: nn.Module, config: PreTrainedConfig) -> None:
        super().__init__()
        self.block = copy.deepcopy(teacher)
        self.width = ffn_layout(teacher, config.hidden_size).width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)

    def as_teacher_ffn(self) -> tuple[int, str | None, dict[str, torch.Tensor]]:
        """How common/export.py writes it: (width, activation, or None for the teacher's, the weights under the
        teacher FFN's keys)."""
        return self.width, None, self.block.state_dict()


ACTIVATIONS = {"relu2": lambda x: F.relu(x).square(), "gelu": F.gelu, "silu": F.silu}
_HF_ACTIVATION = {"silu": "silu", "gelu": "gelu", "relu2": "relu2"}  # prototype activation -> transformers' name


@register("mlp", "prototype")
class PrototypeMLP(nn.Module):
    """Two matrices: d -> width (x2 when gated) -> d, width = scale x the teacher's intermediate size (of
    one expert, for a mixture of experts). The output projection starts at zero, so the student starts as
    the zero function; calibration fits it by ridge least squares on the student's random features (an
    extreme learning machine), so that it starts near the teacher."""

    def __init__(
        self,
        teacher: nn.Module,
        config: PreTrainedConfig,
        scale: float = 1.0,
        activation: str = "relu2",
        gated: bool = False,
        bias: bool = False,
        ridge: float = 1e-3,
    ) -> None:
        super().__init__()
        if not 0 < scale < math.inf:
            raise ValueError(f"prototype student: scale must be > 0 (its width over the teacher FFN's), got {scale}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation {activation!r} unknown; use {', '.join(ACTIVATIONS)}")
        if ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {ridge}")
        self.ridge = ridge
        d = config.hidden_size
        self.width = max(1, int(round(scale * ffn_layout(teacher, d).width)))
        self.activation, self.gated = activation, gated
        self.fc_in = nn.Linear(d, self.width * (2 if gated else 1), bias=bias)
        self.fc_out = nn.Linear(self.width, d, bias=bias)
        nn.init.normal_(self.fc_in.weight, std=1 / math.sqrt(d))
        nn.init.zeros_(self.fc_out.weight)
        if bias:
            nn.init.zeros_(self.fc_in.bias)
            nn.init.zeros_(self.fc_out.bias)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc_in(x)
        if self.gated:
            g, h = h.chunk(2, dim=-1)
            return ACTIVATIONS[self.activation](g) * h
        return ACTIVATIONS[self.activation](h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.hidden(x))

    @torch.no_grad()
    def calibrate(self, teacher: nn.Module, batches: Batches, all_reduce: AllReduce, forward: Forward) -> None:
        fit_linear(self.fc_out, self.hidden, batches, all_reduce, self.ridge)

    def as_teacher_ffn(self) -> tuple[int, str | None, dict[str, torch.Tensor]]:
        """As CopyMLP's: a gated prototype without biases is a gate_proj/up_proj/down_proj FFN with its activation;
        ValueError for the others, which no standard transformers FFN holds."""
        if not self.gated or self.fc_in.bias is not None or self.activation not in _HF_ACTIVATION:
            raise ValueError("prototype FFN students (ungated or with biases) have no standard transformers class")
        gate, up = self.fc_in.weight.chunk(2)
        weights = {"gate_proj.weight": gate, "up_proj.weight": up, "down_proj.weight": self.fc_out.weight}
        return self.width, _HF_ACTIVATION[self.activation], weights


@register("mlp", "pruned")
class PrunedMLP(nn.Module):
    """The teacher's own FFN block at the `scale` fraction of its intermediate channels, copied from it: a
    deep copy whose projections are cut to the kept channels, so it runs the teacher's own forward (its
    activation, its gating, its routing) and its state_dict has the teacher block's keys (under `block.`).
    Every FFN shape of ffn_layout: gated with separate or fused gate/up, plain two-layer MLPs (Linear or
    Conv1D, with biases), and mixtures of experts, where each expert keeps the same number of its own
    channels and the router is kept as it is.

    importance  which channels to keep (default: 'obs' for a dense FFN that refits, else 'activation'). 'weight': the largest ||gate_j|| * ||up_j|| * ||out_:,j|| (||in_j||
                * ||out_:,j|| for a plain MLP; per expert; data-blind, and the choice before calibration).
                'activation': the largest RMS over calibration tokens of what the output projection sees
                (channel j's activation, hooked from the teacher's own forward) times ||out_:,j||: the size of
                channel j's contribution to the output on real latents. For a mixture of experts, each
                expert's activations are its own gate (transformers' _apply_gate) of its gate_up projection
                on the tokens the teacher's router sends it, times their routing weights (0 elsewhere).
                'obs': the channels whose removal, with the output projection refit on the rest, costs the least
                output error, removed one at a time by Optimal Brain Surgeon (obs_importance): a channel that
                another can stand in for goes first. Dense FFNs with refit.
    refit       calibration refits the output projection (weight and bias) by ridge least squares on the
                kept channels' activations against the teacher's output (ridge: lam = ridge x mean diagonal
                of the Gram matrix), which takes over much of the dropped channels' work. Dense FFNs only:
                experts keep the teacher's output weights on their kept channels (no refit).
    With importance='weight' and refit=False calibration changes nothing."""

    def __init__(
        self,
        teacher: nn.Module,
        config: PreTrainedConfig,
        scale: float = 0.5,
        importance: str | None = None,
        refit: bool = True,
        ridge: float = 1e-4,
    ) -> None:
        super().__init__()
        if not 0 < scale <= 1:
            raise ValueError(f"pruned student: scale must be in (0, 1] (the share of channels it keeps), got {scale}")
        if importance not in (None, "activation", "weight", "obs"):
            raise ValueError(f"importance must be 'activation', 'weight' or 'obs', got {importance!r}")
        if ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {ridge}")
        self.layout = ffn_layout(teacher, config.hidden_size)
        importance = importance or ("activation" if self.layout.experts or not refit else "obs")
        self.importance, self.refit, self.ridge = importance, refit, ridge
        if importance == "obs" and (self.layout.experts or not refit):
            raise ValueError("importance='obs' chooses channels for a refit dense FFN; use 'activation' here")
        if self.layout.experts and importance == "activation":
            if not hasattr(getattr(teacher, self.layout.experts), "_apply_gate"):
                raise ValueError(
                    f"importance='activation' needs the experts' own gate (_apply_gate of transformers' experts "
                    f"interface), which {type(teacher).__name__} lacks; use importance='weight'"
                )
        self.width = max(1, round(scale * self.layout.width))
        self.block = copy.deepcopy(teacher)
        _narrow(self.block, self.layout, self.width)
        self.keep_channels(teacher, weight_importance(_channel_weights(teacher, self.layout)))

    @torch.no_grad()
    def keep_channels(self, teacher: nn.Module, importance: torch.Tensor) -> torch.Tensor:
        """Copy the teacher's channels of largest importance (E, I), each expert's own, in the teacher's order;
        returns their indices (E, width)."""
        keep = importance.topk(self.width, dim=-1).indices.sort(dim=-1).values
        pairs = zip(_channel_weights(self.block, self.layout), _channel_weights(teacher, self.layout))
        for (role, mine, my_bias), (_, theirs, their_bias) in pairs:
            if role == "out":
                mine.copy_(theirs.gather(2, keep[:, None, :].expand(-1, theirs.shape[1], -1)))
                if my_bias is not None:
                    my_bias.copy_(their_bias)
                continue
            rows = keep if role == "in" else torch.cat([keep, keep + self.layout.width], dim=1)
            mine.copy_(theirs.gather(1, rows[:, :, None].expand(-1, -1, theirs.shape[2])))
            if my_bias is not None:
                my_bias.copy_(their_bias.gather(1, rows))
        return keep

    @torch.no_grad()
    def calibrate(self, teacher: nn.Module, batches: Batches, all_reduce: AllReduce, forward: Forward) -> None:
        importance = None
        if self.importance == "activation":
            importance = (expert_importance if self.layout.experts else activation_importance)(
                teacher, self.layout, batches, all_reduce, forward
            )
        refit = self.refit and self.layout.output is not None
        if refit:  # one pass over the data: OBS and the refit both read its statistics
            gram, cross = output_statistics(teacher, self.layout, batches, all_reduce, forward)
            if self.importance == "obs":
                importance = obs_importance(gram, cross, self.layout.width, self.width, self.ridge)
        if importance is None:  # 'weight': the choice made before calibration, kept
            importance = weight_importance(_channel_weights(teacher, self.layout))
        keep = self.keep_channels(teacher, importance)[0]
        if refit:  # the output projection's ridge fit on the kept channels (and the bias channel, last)
            rows = torch.cat([keep.to(gram.device), torch.arange(self.layout.width, len(gram), device=gram.device)])
            w = ridge_solve(gram[rows][:, rows], cross[rows], self.ridge).T
            output = getattr(self.block, self.layout.output)
            linear_weight(output).copy_(w[:, : self.width])
            if output.bias is not None:
                output.bias.copy_(w[:, -1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)

    def as_teacher_ffn(self) -> tuple[int, str | None, dict[str, torch.Tensor]]:
        """As CopyMLP's; its width is its own (it may equal the hidden size, which ffn_layout cannot tell)."""
        return self.width, None, self.block.state_dict()


def activation_importance(
    teacher: nn.Module, layout: FFNLayout, batches: Batches, all_reduce: AllReduce, forward: Forward
) -> torch.Tensor:
    """A dense FFN's channel importance (1, I): the RMS over the batches' tokens of what its output projection
    sees, times the projection's column norms."""
    square_sum = 0
    for x, _ in batches(targets=False):
        a = _projection_input(teacher, layout.output, forward, x)
        square_sum = square_sum + a.flatten(0, -2).double().square().sum(0)
    all_reduce(square_sum)
    return (square_sum.sqrt() * linear_weight(getattr(teacher, layout.output)).double().norm(dim=0))[None]


def output_statistics(
    teacher: nn.Module, layout: FFNLayout, batches: Batches, all_reduce: AllReduce, forward: Forward
) -> tuple[torch.Tensor, torch.Tensor]:
    """A dense FFN's refit statistics, from one pass over the batches: (G, C) = (A^T A, A^T Y) in fp64, summed
    over ranks, where A (tokens, n) is what the teacher's output projection sees (I channels, then a column of
    ones for its bias, if any) and Y the target. Each batch's products run in fp32 and are summed in fp64: the
    Gram is the calibration's largest matmul, fp64 runs it at half speed on CPUs (at 1/32 or less on consumer
    GPUs), and a batch's sums in fp32 leave the kept channels and the fit as they were (docs/distill.md)."""
    output = getattr(teacher, layout.output)
    gram = cross = None
    for x, y in batches():
        a = _projection_input(teacher, layout.output, forward, x).flatten(0, -2).float()
        if output.bias is not None:
            a = torch.cat([a, torch.ones_like(a[:, :1])], 1)
        g, c = a.T @ a, a.T @ y.flatten(0, -2).float()
        gram, cross = (g.double(), c.double()) if gram is None else (gram.add_(g), cross.add_(c))
    all_reduce(gram)
    all_reduce(cross)
    return gram, cross


def obs_importance(gram: torch.Tensor, cross: torch.Tensor, channels: int, width: int, ridge: float) -> torch.Tensor:
    """A dense FFN's channels ranked (1, I) by Optimal Brain Surgeon (Hassibi & Stork 1993; ZipLM's structured
    form), from output_statistics' (G, C) over `channels` = I channels (then the bias's, which never goes): with
    H = G plus the refit's ridge and W = H^-1 C the ridge fit on every channel, removing channel j and refitting
    on the rest raises the refit's objective by exactly ||W_j||^2 / (H^-1)_jj, whatever the target. The
    cheapest channel goes, W and H^-1 are updated to the refit, and again, until `width` remain; a channel's
    rank is the step it went at (those kept rank last). Unlike 'activation', which scores each channel alone,
    this sees that two channels that move together can be one."""
    n = len(gram)
    inverse = torch.linalg.inv(ridged(gram, ridge))
    w = cross.T @ inverse  # (d, n): the ridge fit on every channel, transposed (H^-1 is symmetric)
    rank = torch.full((channels,), float(channels), dtype=torch.float64, device=gram.device)
    gone = torch.zeros(n, dtype=torch.bool, device=gram.device)
    gone[channels:] = True  # the bias channel is never a candidate
    for step in range(channels - width):
        cost = w.square().sum(0) / inverse.diagonal().clamp_min(1e-30)
        j = int(cost.masked_fill(gone, float("inf")).argmin())
        row = inverse[j] / inverse[j, j]
        w.addr_(w[:, j].clone(), row, alpha=-1)  # in place, without an (n, n) outer product: 6x faster on a CPU
        inverse.addr_(inverse[:, j].clone(), row, alpha=-1)
        gone[j], rank[j] = True, step
    return rank[None]


def expert_importance(
    teacher: nn.Module, layout: FFNLayout, batches: Batches, all_reduce: AllReduce, forward: Forward
) -> torch.Tensor:
    """A mixture of experts' channel importance (E, I): per expert, the RMS over the batches' tokens of its
    routing weight times its gated activations (0 on tokens not routed to it), times its down projection's
    column norms. The routing is the teacher's own: the arguments its router's output gives the experts."""
    experts = getattr(teacher, layout.experts)
    n, _, width = experts.down_proj.shape
    square_sum = experts.down_proj.new_zeros(n, width, dtype=torch.float64)
    for x, _ in batches(targets=False):
        # experts(hidden_states (N, d), top_k_index (N, k), top_k_weights (N, k)), as every MoE block calls them
        h, index, weight = _call_args(experts, functools.partial(forward, teacher, x))[:3]
        for e in range(n):
            token, slot = torch.where(index == e)
            a = experts._apply_gate(F.linear(h[token], experts.gate_up_proj[e])) * weight[token, slot, None]
            square_sum[e] += a.double().square().sum(0)
    all_reduce(square_sum)
    return square_sum.sqrt() * experts.down_proj.double().norm(dim=1)
