"""Students: the modules that replace a teacher's decoder (the swappable block of a layer).

  registry.py   register(target, kind) and make_student: a kind is one nn.Module class, built by name
  ffn.py        target 'mlp' (the FFN): copy, prototype, pruned
  attention.py  target 'attn' (self-attention): linear (gated linear attention), window
  delta.py      target 'attn': delta (Gated DeltaNet, the delta rule)
  lolcats.py    target 'attn': lolcats (sliding-window softmax + learned-feature linear attention, LoLCATs)
  fit.py        ridge least squares from fp64 Gram statistics, for calibration

A student's constructor takes (teacher_block, config, **kwargs) and starts from the teacher block it
replaces (a copy, a pruned copy, or fresh weights). A kind may also define
    calibrate(teacher_block, batches, all_reduce, forward)
to fit itself to data before training: batches() iterates (latent x, teacher output y) pairs of
shape (B, T, d), batches(targets=False) the latents alone (y is None: no teacher forward);
all_reduce(t) sums a tensor over ranks in place; forward(module, x) runs a block module on latent x
as the layer calls it (with the masks and position embeddings the model gives that layer). Calibration accumulates fixed-size
statistics in fp64 (Gram matrices, second moments) over the batches, never all activations, so its
memory does not grow with the number of tokens.
"""

from common.students import attention, delta, ffn, lolcats  # noqa: F401  (importing a kind's module registers it)
from common.students.registry import STUDENTS, make_student, register

__all__ = ["STUDENTS", "make_student", "register"]
