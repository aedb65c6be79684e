"""Device memory per GPU of each phase, estimated from the model's shape and the run's plan.

distill.py prints its phase's estimate at the start and refuses a plan that cannot fit the device it sees;
tests/bench_memory.py measures every phase on CPU, fits ACTIVATION_BYTES to the measurements and projects the
estimate to large teachers on 1 and 8 GPUs. A phase's estimate is a dict {term: bytes on one GPU}, its sum the
total; each term is commented where it is computed. What it leaves out: the CUDA context and allocator slack
(mem_get_info's free memory is after the context), and transients smaller than one layer's activations.
"""

import os
from typing import NamedTuple

import torch
import torch.nn as nn

from common.checkpoint import add_students, read_config
from common.kd import CHUNK_TOKENS
from common.swap import transformer_layers

ADAMW_BYTES = 16  # per trained parameter: its fp32 weight, gradient and AdamW's two moments
KD_BUFFERS = 5  # fp32 CHUNK_TOKENS x vocabulary buffers alive at once in the chunked KD loss and its validation
CE_BUFFERS = 3  # the same in a validation of the cross-entropy alone (logits, log-softmax, a temporary)
LOGITS_BUFFERS = 3  # fp32 tokens x vocabulary buffers of train.py's plain cross-entropy: logits, log-softmax, gradient
ACTIVATION_BYTES = 66  # per token, hidden unit and layer, kept for backward (fp32; fitted by tests/bench_memory.py)
GiB = 2**30


class Shape(NamedTuple):
    """What the estimate reads of a model."""

    params: int  # every parameter (a tied embedding and head once)
    layer_params: int  # the largest transformer layer's
    hidden: int
    layers: int
    vocab: int

    def outside_layers(self) -> int:
        """Parameters outside the transformer layers (embeddings, final norm, head), taking every layer as large as
        the largest: exact for a teacher's identical layers."""
        return self.params - self.layers * self.layer_params


class Plan(NamedTuple):
    """What a run does with the model, per GPU."""

    tokens: int  # tokens per micro-batch on one GPU: BATCH_SIZE x SEQ_LEN
    trained: int  # parameters that train at once (fp32, AdamW)
    frozen_bytes: int = 4  # bytes of a frozen weight, and of a weight FSDP gathers: 2 in bf16 on GPUs, 4 in fp32
    world_size: int = 1
    parallel: str = "ddp"  # ddp: every GPU holds the whole models; fsdp: weights and their states split over GPUs
    checkpointing: bool = False  # activation checkpointing: a layer keeps its input alone, and recomputes in backward

    def shards(self) -> int:
        return self.world_size if self.parallel == "fsdp" else 1


def shape_of(model: nn.Module) -> Shape:
    """The Shape of a model, real or on the meta device."""
    layers = transformer_layers(model)
    return Shape(
        params=sum(p.numel() for p in model.parameters()),
        layer_params=max(sum(p.numel() for p in layer.parameters()) for layer in layers),
        hidden=model.config.hidden_size,
        layers=len(layers),
        vocab=model.config.vocab_size,
    )


def model_bytes(module: nn.Module) -> int:
    """Bytes a module's parameters and buffers take."""
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def meta_model(folder: str) -> nn.Module:
    """The model a model or checkpoint folder holds, its students in place, built on the meta device from its
    config.json and students.json: every shape, no weights read, no memory taken."""
    from transformers import AutoModelForCausalLM

    config = read_config(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        students = os.path.join(folder, "students.json")
        if os.path.exists(students):
            add_students(model, students)
    return model


def activations(shape: Shape, plan: Plan, layers: int) -> int:
    """What `layers` layers keep for backward over one micro-batch; with activation checkpointing each keeps its
    input (fp32 at most) and one layer at a time holds the rest, recomputed."""
    if plan.checkpointing:
        return 4 * plan.tokens * shape.hidden * layers + ACTIVATION_BYTES * plan.tokens * shape.hidden
    return ACTIVATION_BYTES * plan.tokens * shape.hidden * layers


def head_chunks(shape: Shape, plan: Plan, buffers: int) -> int:
    """`buffers` fp32 chunk-by-vocabulary buffers of the chunked KD loss or validation (common/kd.py)."""
    return buffers * min(plan.tokens, CHUNK_TOKENS) * shape.vocab * 4


def gathered(plan: Plan, *models: Shape) -> int:
    """FSDP: whole weights in flight on a GPU: two layers (the one computing and the one prefetched) and the root of
    each model (embeddings, final norm, head), which FSDP keeps whole after the root's forward (until its backward;
    a frozen teacher's, which has none, until a checkpoint reshards it). Nothing under ddp."""
    if plan.parallel != "fsdp":
        return 0
    return plan.frozen_bytes * (2 * max(m.layer_params for m in models) + sum(m.outside_layers() for m in models))


def layerwise(
    teacher: Shape, plan: Plan, students: int, teacher_on: str, cache_bytes: int, whole_model: bool = False
) -> dict[str, int]:
    """The layer-wise phase: the teacher frozen, `students` parameters of students on the device in fp32 (all of
    them, or streamed one at a time: see distill.layerwise_memory), plan.trained of them training (one student in a
    rotation, all of them in the parallel schedule), one layer computing at a time; with `whole_model`
    (DECODER_LOSS=kl) every step runs the whole model to the head and back, as the logits phase does."""
    on_device = teacher.layers if teacher_on == "device" else 2  # streamed: the layer distilled and the one the
    return {  # cache advances through
        "teacher": plan.frozen_bytes * (teacher.outside_layers() + on_device * teacher.layer_params),
        "students": 4 * max(0, students - plan.trained),  # fp32 weights of the students not training now
        "trained": ADAMW_BYTES * plan.trained,
        "latent cache": cache_bytes,  # the part of it on the device
        "activations": activations(teacher, plan, teacher.layers if whole_model else 1),  # one layer's blocks
        "head chunks": head_chunks(teacher, plan, KD_BUFFERS if whole_model else CE_BUFFERS),  # or the KD loss
    }


def logits(teacher: Shape, student: Shape, plan: Plan, shared_backbone: bool, kept_fp32: int = 0) -> dict[str, int]:
    """The logits phase: the frozen teacher and the student model, whose plan.trained parameters train (the
    students, all of it, or all but its embeddings) and the rest is frozen (none of it when it is the teacher's own
    backbone, shared); kept_fp32 of the frozen ones stay in fp32 (frozen embeddings beside trained layers)."""
    frozen = teacher.params + (0 if shared_backbone else student.params - plan.trained)
    return {
        "frozen": (plan.frozen_bytes * (frozen - kept_fp32) + 4 * kept_fp32) // plan.shards(),
        "trained": ADAMW_BYTES * plan.trained // plan.shards(),
        "gathered": gathered(plan, teacher, student),
        "activations": activations(student, plan, student.layers),  # the student's forward and backward
        "head chunks": head_chunks(student, plan, KD_BUFFERS),
    }


def train(shape: Shape, plan: Plan) -> dict[str, int]:
    """train.py: every parameter trains; the loss is a plain cross-entropy over the whole logits."""
    return {
        "trained": ADAMW_BYTES * shape.params // plan.shards(),
        "gathered": gathered(plan, shape),
        "activations": activations(shape, plan, shape.layers),
        "logits": LOGITS_BUFFERS * plan.tokens * shape.vocab * 4,
    }


def describe(terms: dict[str, int]) -> str:
    """'12.30 GiB per GPU = teacher 5.10 + trained 0.20 + ...' (MiB under 1 GiB), the terms that are not 0."""
    total = sum(terms.values())
    unit, name = (GiB, "GiB") if total >= GiB else (2**20, "MiB")
    parts = " + ".join(f"{term} {b / unit:.2f}" for term, b in terms.items() if b)
    return f"{total / unit:.2f} {name} per GPU = {parts}"


def size(nbytes: int) -> str:
    """'3.2 GiB', or '410.5 MiB' under 1 GiB."""
    return f"{nbytes / GiB:.1f} GiB" if nbytes >= GiB else f"{nbytes / 2**20:.1f} MiB"
