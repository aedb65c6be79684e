"""FFN students (target 'mlp'): drop-in replacements for a layer's MLP, called as block(x) on the
latent x (B, T, d) and returning (B, T, d).

  copy       a clone of the teacher's block (the loss is 0 at step 0: a sanity check)
  prototype  two matrices with a chosen activation, fit by calibration on random features
  pruned     the teacher's own FFN class at a fraction of its channels, chosen and refit on data
"""

import copy
import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedConfig

from common.students.fit import AllReduce, Batches, fit_linear
from common.students.registry import register


def _intermediate_size(teacher, config):
    return getattr(teacher, "intermediate_size", None) or config.intermediate_size


@register("mlp", "copy")
class CopyMLP(nn.Module):
    """A clone of the teacher block: the distillation loss is exactly 0 at step 0 (a sanity check)."""

    def __init__(self, teacher: nn.Module, config: PreTrainedConfig) -> None:
        super().__init__()
        self.block = copy.deepcopy(teacher)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


ACTIVATIONS = {"relu2": lambda x: F.relu(x).square(), "gelu": F.gelu, "silu": F.silu}


@register("mlp", "prototype")
class PrototypeMLP(nn.Module):
    """Two matrices: d -> width (x2 when gated) -> d, width = scale x the teacher's intermediate
    size. The output projection starts at zero, so the student starts as the zero function;
    calibration fits it by ridge least squares on the student's random features (an extreme
    learning machine), so that it starts near the teacher."""

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
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation {activation!r} unknown; use {', '.join(ACTIVATIONS)}")
        if ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {ridge}")
        if not scale > 0:
            raise ValueError(f"prototype student: scale must be > 0 (its width over the teacher FFN's), got {scale}")
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

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc_in(x)
        if self.gated:
            g, h = h.chunk(2, dim=-1)
            return ACTIVATIONS[self.activation](g) * h
        return ACTIVATIONS[self.activation](h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.hidden(x))

    @torch.no_grad()
    def calibrate(
        self,
        teacher: nn.Module,
        batches: Batches,
        all_reduce: AllReduce,
        pos_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
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

    def __init__(
        self,
        teacher: nn.Module,
        config: PreTrainedConfig,
        scale: float = 0.5,
        importance: str = "activation",
        refit: bool = True,
        ridge: float = 1e-4,
    ) -> None:
        super().__init__()
        if importance not in ("activation", "weight"):
            raise ValueError(f"importance must be 'activation' or 'weight', got {importance!r}")
        if ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {ridge}")
        if not scale > 0:
            raise ValueError(f"pruned student: scale must be > 0 (the share of channels it keeps), got {scale}")
        self.importance, self.refit, self.ridge = importance, refit, ridge
        full = _intermediate_size(teacher, config)
        width = max(1, min(full, int(round(scale * full))))
        narrow = copy.deepcopy(config)
        narrow.intermediate_size = width
        self.block = type(teacher)(narrow)
        g, u, d = teacher.gate_proj.weight, teacher.up_proj.weight, teacher.down_proj.weight
        self.keep_channels(teacher, g.float().norm(dim=1) * u.float().norm(dim=1) * d.float().norm(dim=0))

    @torch.no_grad()
    def keep_channels(self, teacher: nn.Module, importance: torch.Tensor) -> None:
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
    def calibrate(
        self,
        teacher: nn.Module,
        batches: Batches,
        all_reduce: AllReduce,
        pos_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        if self.importance == "activation":
            square_sum = 0
            for x, _ in batches(targets=False):
                square_sum = square_sum + _swiglu_hidden(teacher, x).flatten(0, -2).double().square().sum(0)
            all_reduce(square_sum)
            self.keep_channels(teacher, square_sum.sqrt() * teacher.down_proj.weight.double().norm(dim=0))
        if self.refit:
            fit_linear(
                self.block.down_proj, functools.partial(_swiglu_hidden, self.block), batches, all_reduce, self.ridge
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


def _swiglu_hidden(mlp, x):
    """The intermediate activations act(gate x) * (up x) of a Llama-family MLP (what down_proj sees)."""
    return mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
