"""The student registry: a kind is one nn.Module class registered with `@register(target, kind)`;
`make_student` builds one by name, and a checkpoint rebuilds its students from their names and arguments."""

import inspect
from collections.abc import Callable

import torch.nn as nn
from transformers import PreTrainedConfig

STUDENTS = {}  # (target, kind) -> class


def check_counts(kind: str, least: int, **counts: object) -> None:
    """ValueError in one line unless each of `counts` (a student's argument: tokens, ranks, features) is a whole
    number >= least (an int; a bool or 2.5 would run as something else or crash mid-run)."""
    for name, value in counts.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ValueError(f"{kind} student: {name} must be a whole number >= {least}, got {value!r}")


def register(target: str, kind: str) -> Callable[[type], type]:
    """Class decorator: make the class the student `kind` for `target` ('mlp' or 'attn')."""

    def add(cls):
        cls.target, cls.kind = target, kind
        STUDENTS[(target, kind)] = cls
        return cls

    return add


def make_student(
    target: str, kind: str, teacher_block: nn.Module, config: PreTrainedConfig, **kwargs: object
) -> nn.Module:
    """A new student of `kind` for `teacher_block`, on its device; it records every argument (defaults too)
    in `.kwargs`, so that a checkpoint says what was used. Raises ValueError for an unknown kind or bad kwargs."""
    cls = STUDENTS.get((target, kind))
    if cls is None:
        known = ", ".join(k for t, k in STUDENTS if t == target)
        raise ValueError(f"unknown student kind {kind!r} for target {target!r}; known: {known}")
    try:
        student = cls(teacher_block, config, **kwargs)
    except TypeError as e:
        raise ValueError(f"arguments {kwargs} do not fit student {kind!r}: {e}") from None
    defaults = {n: p.default for n, p in inspect.signature(cls).parameters.items() if p.default is not p.empty}
    student.kwargs = {**defaults, **kwargs}  # every argument, defaults too: the checkpoint says what was used
    return student.to(next(teacher_block.parameters()).device)
