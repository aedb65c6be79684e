"""Data parallelism over torchrun's ranks for train.py and distill.py's logits phase, with PyTorch's own engines.

PARALLEL=ddp replicates the model on every rank (DistributedDataParallel in train.py, common.optim.sync_grads in
distill.py). PARALLEL=fsdp shards it (FSDP2, torch.distributed.fsdp.fully_shard): every transformer layer and the
root (embeddings, final norm, head) are units whose weights, gradients and AdamW state are split over the ranks;
a unit's weights are gathered whole only while it computes, and its gradients are reduce-scattered after its
backward. On GPUs computing in bf16 the gathered weights are bf16 and gradients are reduced in fp32 (a mixed
precision policy); on CPU everything stays fp32.

Checkpoints do not change with sharding: full_state_dict gathers the whole model to rank 0's host, which writes
the same model.safetensors folder as an unsharded run, and optimizer_state / load_optimizer_state turn the sharded
AdamW state into the whole state keyed by parameter name and back, so that a resume is exact.
"""

import torch
import torch.nn as nn
from torch.distributed._composable import checkpoint
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from common.runtime import Runtime
from common.swap import transformer_layers

MODES = ("ddp", "fsdp")
_WHOLE = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered whole, on rank 0's host


def check(parallel: str, world_size: int) -> None:
    """Raise ValueError in one line unless PARALLEL is known and, for fsdp, there are ranks to shard over."""
    if parallel not in MODES:
        raise ValueError(f"PARALLEL must be ddp or fsdp, got {parallel!r}")
    if parallel == "fsdp" and world_size < 2:
        raise ValueError(
            "PARALLEL=fsdp shards the model over torchrun's ranks, and this run has one process; launch it with "
            "torchrun --nproc-per-node 2 or more (or several nodes), or use --parallel ddp"
        )


def load_device(rt: Runtime, parallel: str) -> torch.device:
    """Where a model is loaded: the device, or for fsdp the host, since fully_shard moves each unit to the device
    as it shards it, so that no rank holds the whole model on its device at any time."""
    return torch.device("cpu") if parallel == "fsdp" else rt.device


def checkpoint_layers(model: nn.Module) -> None:
    """Activation checkpointing of every transformer layer: a layer keeps only its input for backward and computes
    its forward again there (memory for long sequences, at about a third more compute). Composable (hooks on the
    layer), so module names, checkpoint keys and the decoder swap are unchanged; apply it before shard()."""
    for layer in transformer_layers(model):
        checkpoint(layer)


def shard(model: nn.Module, rt: Runtime) -> nn.Module:
    """FSDP2 over all ranks: each transformer layer, then the root. Returns the model itself, now an FSDPModule
    (parameters are DTensors: build its optimizer after this)."""
    mesh = init_device_mesh(rt.device.type, (rt.world_size,))
    mixed = rt.dtype != torch.float32  # gathered weights in the compute dtype, gradients reduced in fp32
    policy = MixedPrecisionPolicy(param_dtype=rt.dtype, reduce_dtype=torch.float32) if mixed else MixedPrecisionPolicy()
    for layer in transformer_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def is_sharded(model: nn.Module | None) -> bool:
    return isinstance(model, FSDPModule)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The sharded model's whole state dict on rank 0's host ({} on the other ranks; a collective, every rank calls
    it). Tied weights (an embedding shared with the head) are one tensor under both names, as in an unsharded
    model's state_dict(), so that safetensors writes them once."""
    model.reshard()  # a forward without backward (validation) leaves the root's weights gathered
    weights = get_model_state_dict(model, options=_WHOLE)
    if weights:
        first = {}  # parameter -> the first name it has
        for name, tensor in model.state_dict(keep_vars=True).items():
            weights[name] = weights[first.setdefault(id(tensor), name)]
    return weights


def optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module | None = None) -> dict:
    """What a checkpoint keeps of the optimizer: its state_dict(), or for a sharded model (FSDP) the whole state
    keyed by parameter name on rank 0's host ({} elsewhere; a collective)."""
    if not is_sharded(model):
        return optimizer.state_dict()
    model.reshard()  # the optimizer steps the shards: a root gathered by a forward (validation) would not match
    return get_optimizer_state_dict(model, optimizer, options=_WHOLE)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict, model: nn.Module | None = None) -> None:
    """Put back what optimizer_state returned (for a sharded model every rank reads the whole state and keeps its
    own shards)."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
    else:
        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
