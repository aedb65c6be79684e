"""Quality on fixed val batches: cross-entropy and perplexity of models and, against a teacher, KL(teacher ||
model) and top-1 agreement, in one pass with the teacher run once per batch. What train.py and distill.py validate
with and what the common.evaluate CLI reports; a light import (no plotting, no generation)."""

import contextlib
import math
from collections.abc import Callable

import torch
import torch.nn as nn
from tqdm import tqdm

from common.kd import final_hidden, kd_metrics, lm_head
from common.runtime import Runtime


@torch.no_grad()
def evaluate_models(
    models: dict[str, nn.Module],
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    teacher: nn.Module | Callable | None = None,
    rt: Runtime | None = None,
    progress: bool = False,
) -> tuple[dict[str, dict], dict | None]:
    """Evaluate {name: model} on `batches` ((x, y) pairs) in one pass, the teacher once per batch.
    `teacher` is a model, or a function ids -> final hidden states whose logits use each model's
    own LM head (the logits phase with decoders only, where teacher and student share a backbone).
    Returns ({name: {'ce', 'ppl'[, 'kl', 'agreement']}}, the teacher's {'ce', 'ppl'} or None);
    with `rt` the numbers are means over the ranks and bf16 autocast is used where rt uses it."""
    teacher_model = teacher if isinstance(teacher, torch.nn.Module) else None
    if teacher is not None and teacher_model is None and not models:
        raise ValueError("a teacher given as a function needs at least one model (its LM head scores the teacher)")
    modules = list(models.values()) + ([teacher_model] if teacher_model is not None else [])
    if not modules:
        raise ValueError("nothing to evaluate: give at least one model or a teacher model")
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    device = next(modules[0].parameters()).device
    sums = {name: {} for name in models}
    teacher_sums = {}
    try:
        for x, y in tqdm(batches, desc="eval", disable=not progress, leave=False):
            x, y = x.to(device), y.to(device)
            with rt.autocast() if rt else contextlib.nullcontext():
                ht = None
                if teacher_model is not None:
                    ht = final_hidden(teacher_model, x)
                    if not models:
                        _add(teacher_sums, kd_metrics(ht, lm_head(teacher_model), y))
                elif teacher is not None:
                    ht = teacher(x)
                for k, (name, model) in enumerate(models.items()):
                    m = kd_metrics(
                        final_hidden(model, x),
                        lm_head(model),
                        y,
                        ht,
                        None if teacher_model is None else lm_head(teacher_model),
                    )
                    teacher_ce = m.pop("teacher_ce", None)
                    if teacher_ce is not None and k == 0:
                        _add(teacher_sums, {"tokens": m["tokens"], "ce": teacher_ce})
                    _add(sums[name], m)
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)
    results = {name: _finish(s, rt) for name, s in sums.items()}
    return results, (_finish(teacher_sums, rt) if teacher_sums else None)


def evaluate(
    model: nn.Module,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    teacher: nn.Module | Callable | None = None,
    rt: Runtime | None = None,
) -> dict[str, float]:
    """One model's {'ce', 'ppl'} and, with a teacher, 'kl', 'agreement', 'teacher_ce', 'teacher_ppl'."""
    results, t = evaluate_models({"model": model}, batches, teacher, rt)
    out = results["model"]
    if t:
        out.update(teacher_ce=t["ce"], teacher_ppl=t["ppl"])
    return out


def _add(sums, m):
    for k, v in m.items():
        sums[k] = sums.get(k, 0) + v


def _finish(sums, rt):
    """Per-token means (rank means under DDP: every rank has the same number of tokens)."""
    mean = {k: float(v) / float(sums["tokens"]) for k, v in sums.items() if k != "tokens"}
    if rt:
        mean = {k: rt.all_mean(v) for k, v in mean.items()}
    out = {"ce": mean["ce"], "ppl": math.exp(mean["ce"])}
    if "kl" in mean:
        out.update(kl=mean["kl"], agreement=mean["agree"])
    return out
