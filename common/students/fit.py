"""Least squares for calibration: ridge solves from fp64 Gram statistics accumulated batch by batch,
so their memory does not grow with the number of tokens."""

from collections.abc import Callable, Iterable

import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

# The calibration interface (see common/students/__init__.py): batches() yields (latent x, teacher output y),
# batches(targets=False) yields (x, None); all_reduce(t) sums t over ranks in place; forward(module, x) runs a
# block module on latent x as its layer calls it and returns the output tensor.
Batches = Callable[..., Iterable[tuple[torch.Tensor, torch.Tensor | None]]]
AllReduce = Callable[[torch.Tensor], object]
Forward = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def linear_weight(linear: nn.Module) -> torch.Tensor:
    """The weight of a Linear, or of a transformers Conv1D (GPT-2's, stored (in, out)), as (out, in): a view,
    so writing it writes the module's weight."""
    return linear.weight.T if isinstance(linear, Conv1D) else linear.weight


def ridge_solve(gram: torch.Tensor, cross: torch.Tensor, ridge: float) -> torch.Tensor:
    """argmin_W ||A W - Y||^2 + lam ||W||^2 from gram = A^T A (n, n) and cross = A^T Y (n, d), in fp64,
    with lam = ridge x the mean of gram's diagonal (so `ridge` does not depend on scale or token count)."""
    return torch.linalg.solve(ridged(gram, ridge), cross)


def ridged(gram: torch.Tensor, ridge: float) -> torch.Tensor:
    """gram + lam I, lam = ridge x the mean of gram's diagonal: a new matrix, and no other of its size."""
    out = gram.clone()
    out.diagonal().add_(ridge * gram.diagonal().mean().clamp_min(1e-30))
    return out


def fit_linear(
    linear: nn.Module,
    features: Callable[[torch.Tensor], torch.Tensor],
    batches: Batches,
    all_reduce: AllReduce,
    ridge: float,
) -> None:
    """Refit `linear` (a Linear or Conv1D; weight and bias) by ridge least squares so that linear(features(x)) matches y,
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
    linear_weight(linear).copy_(w)
