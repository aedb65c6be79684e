"""A teacher whose decoder layers live in host memory and visit the device one at a time (TEACHER_ON=host).

The layer-wise phase only ever computes one teacher layer at a time (the latent cache advances layer by layer, a
layer's student trains against that layer's block), so its device memory need not grow with the depth of the
teacher: `offload_layers(model, device)` keeps everything but the decoder layers on the device and each layer in
(pinned) host memory, and hooks every layer and every block in it so that a forward moves the module to the
device first and back to the host after. The teacher's own weights are frozen: their host copy stays, so leaving
the device costs no copy back; a student swapped into the layer moves with it, and back. `resident(layer,
student)` keeps a layer, and the modules that live on the host beside it (its student), on the device for a whole
stretch of work (a layer's turn in a rotation), where moving them for every call would cost a transfer per step.
Moving tensors is exact, so results do not change; on a CPU (device = host) it changes nothing at all.
"""

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn

from common.swap import transformer_layers


class _LayerHome:
    """Where one decoder layer lives between uses, and how many uses want it on the device now."""

    def __init__(self, layer: nn.Module, device: torch.device) -> None:
        self.layer, self.device, self.users = layer, device, 0
        pin = device.type == "cuda"  # pinned host memory: faster, asynchronous host-to-device copies
        # (module, '_parameters' or '_buffers', name, host copy) of each of the layer's own (frozen) tensors
        self.host = []
        for module in layer.modules():
            for kind in ("_parameters", "_buffers"):
                for name, t in getattr(module, kind).items():
                    if t is not None:
                        assert not t.requires_grad, f"an offloaded layer's {name} trains: its host copy would go stale"
                        host = t.data.to("cpu")
                        self.host.append((module, kind, name, host.pin_memory() if pin else host))
        self._place(lambda host: host)

    def _place(self, new) -> None:
        """Point each of the layer's own tensors at new(its host copy)."""
        for module, kind, name, host in self.host:
            t = getattr(module, kind)[name]
            if kind == "_parameters":
                t.data = new(host)
            else:
                getattr(module, kind)[name] = new(host)

    def enter(self) -> None:
        if self.users == 0:
            self._place(lambda host: host.to(self.device, non_blocking=True))
            self.layer.to(self.device)  # a student swapped into the layer
        self.users += 1

    def leave(self) -> None:
        self.users -= 1
        if self.users == 0:
            self._place(lambda host: host)  # frozen: the host copy is still right
            self.layer.to("cpu")  # a student swapped into the layer, which trains: copied back


def offload_layers(model: nn.Module, device: torch.device) -> nn.Module:
    """Put the model on `device` except its decoder layers, which stay on the host and move to the device for
    each forward of the layer or of any module inside it (a block called alone). Returns the model."""
    layers = transformer_layers(model)
    in_layers = {id(t) for t in [*layers.parameters(), *layers.buffers()]}
    for t in [*model.parameters(), *model.buffers()]:  # everything but the layers' own weights and buffers
        if id(t) not in in_layers:
            t.data = t.data.to(device)
    for layer in layers:
        home = _LayerHome(layer, device)
        layer._home = home  # noqa: SLF001  (read by resident() and home_device())
        for module in layer.modules():
            module.register_forward_pre_hook(lambda m, args, home=home: home.enter())
            # always_call: a forward cut short by an exception (common.swap's hooks stop forwards) still leaves
            module.register_forward_hook(lambda m, args, out, home=home: home.leave(), always_call=True)
    return model


def home_device(layer: nn.Module, device: torch.device) -> torch.device:
    """Where a module that goes with this layer (its student) lives between uses: the host for an offloaded layer,
    else `device`."""
    return torch.device("cpu") if hasattr(layer, "_home") else device


@contextlib.contextmanager
def resident(layer: nn.Module, *companions: nn.Module) -> Iterator[None]:
    """Keep an offloaded layer, and those of `companions` that live on the host beside it (its student), on the
    device for the length of a `with` block; nothing for a layer that is not offloaded."""
    home = getattr(layer, "_home", None)
    if home is None:
        yield
        return
    visiting = [m for m in companions if any(p.device != home.device for p in m.parameters())]
    home.enter()
    for module in visiting:
        module.to(home.device)
    try:
        yield
    finally:
        for module in visiting:
            module.to("cpu")
        home.leave()
