r"""What framework-neutral code may know of a TPP module, and the one table of module types.

The count domain, the spike statistics, the kernels, the calibration and the evaluation work on
networks of either framework. They see a TPP module only through :class:`TPPLayer` — its window,
whether it is running whole sequences, the scale of its spikes, its random stream and its
count-domain forward — never through a framework class's private attributes. Each adapter
implements the protocol on its modules and registers its classes by role
(:func:`register_types`); the torch layer roles below are shared by every adapter.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from .engine.stream import RandomStream

__all__ = [
    "TPPLayer",
    "register_types",
    "types_of",
    "tpp_layers",
    "window_of",
    "runs_sequences",
    "spike_scale",
    "CONVS",
    "LINEARS",
    "WEIGHTED",
    "BATCH_NORMS",
    "AVG_POOLS",
    "MAX_POOLS",
    "DROPOUTS",
    "RESHAPES",
    "PADS",
    "ROLES",
    "register_counter_probe",
    "active_counters",
]


@runtime_checkable
class TPPLayer(Protocol):
    """The contract of every TPP module (neuron or temporal permutation), in either framework.

    * ``window_length``: the window length ``T`` it is set to (``None`` where it takes the
      sequence's length);
    * ``sequence_mode``: whether it is taking whole ``[T, N, ...]`` sequences now (SpikingJelly's
      ``step_mode == 'm'``, snnTorch's ``sequence``);
    * ``spike_scale``: what one spike is worth in its output (1, or snnTorch's
      ``graded_spikes_factor``);
    * ``random_stream``: its :class:`~tpp_plugin.engine.stream.RandomStream`;
    * ``count_forward(x, T, bernoulli)``: the forward of count-domain evaluation — from the mean
      current ``x`` of a window, what its forward returns with every spike train replaced by
      ``count/T`` (a permutation returns ``x``).
    """

    @property
    def window_length(self) -> int | None: ...

    @property
    def sequence_mode(self) -> bool: ...

    @property
    def spike_scale(self) -> Any: ...

    random_stream: RandomStream

    def count_forward(self, x: torch.Tensor, T: int, bernoulli: str) -> Any: ...


# ------------------------------------------------------------------------------------------------
# torch layers by role (every adapter and service uses these)
# ------------------------------------------------------------------------------------------------
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
LINEARS = (nn.Linear,)
WEIGHTED = CONVS + LINEARS
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
AVG_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
             nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d,
             nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
RESHAPES = (nn.Flatten, nn.Unflatten, nn.Identity)
PADS = (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d,
        nn.ConstantPad3d)

# ------------------------------------------------------------------------------------------------
# framework classes by role, registered by the adapters when they are imported
# ------------------------------------------------------------------------------------------------
#: the roles a framework class can have for framework-neutral code
ROLES = {
    "tpp": "TPP neurons (count-domain neurons: they implement TPPLayer)",
    "permutation": "temporal permutations (TPPLayer; the identity on counts)",
    "neuron": "any other spiking or stateful module (refused by the count domain)",
    "spiking": "neurons whose spikes the statistics count (TPP and the frameworks' own)",
    "affine": "framework modules that are affine in their input (scalers, step-mode tensor ops)",
    "eval_affine": "framework modules that are affine in eval mode only (dropout layers)",
    "chain": "containers that call their children in order",
    "time_flatten": "wrappers that run a per-sample layer on a sequence",
    "step_module": "modules with a step_mode",
    "window_driver": "the state of a window-synchronous network (steps aside in count mode)",
}
_REGISTERED: dict = {role: () for role in ROLES}


def register_types(role: str, *classes: type) -> None:
    """Give ``classes`` a role (an adapter calls this when it is imported; idempotent)."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; one of {sorted(ROLES)}")
    _REGISTERED[role] += tuple(c for c in classes if c not in _REGISTERED[role])


def types_of(role: str) -> tuple:
    """The classes registered for ``role`` (an empty tuple if no adapter gave it any)."""
    return _REGISTERED[role]


def tpp_layers(net: nn.Module) -> list:
    """The TPP modules (neurons and permutations) of ``net``, in ``modules()`` order."""
    return [m for m in net.modules() if isinstance(m, TPPLayer)]


def window_of(module: nn.Module) -> int | None:
    """A TPP module's window ``T`` (``None`` if unset or not a TPP module)."""
    return module.window_length if isinstance(module, TPPLayer) else None


def runs_sequences(module: nn.Module) -> bool:
    """Whether a spiking module takes whole sequences ``[T, N, ...]`` now: a TPP module's
    ``sequence_mode``; a framework neuron's public ``step_mode == 'm'`` or ``sequence``."""
    if isinstance(module, TPPLayer):
        return module.sequence_mode
    return getattr(module, "step_mode", None) == "m" or bool(getattr(module, "sequence", False))


def spike_scale(module: nn.Module):
    """What one spike of a spiking module is worth in its output: a TPP module's
    ``spike_scale``; a framework neuron's public ``graded_spikes_factor`` (snnTorch), else 1."""
    scale = module.spike_scale if isinstance(module, TPPLayer) else getattr(
        module, "graded_spikes_factor", 1.0)
    return scale.detach() if isinstance(scale, torch.Tensor) else scale


# ------------------------------------------------------------------------------------------------
# the frameworks' own operation counters (count mode warns when one is watching its pass)
# ------------------------------------------------------------------------------------------------
_COUNTER_PROBES: list = []


def register_counter_probe(probe) -> None:
    """Add ``probe(net) -> [names]``: the framework's operation counters active on ``net`` now
    (an adapter calls this when it is imported; idempotent)."""
    if probe not in _COUNTER_PROBES:
        _COUNTER_PROBES.append(probe)


def active_counters(net: nn.Module) -> list:
    """The names of every framework operation counter watching ``net`` now."""
    return [name for probe in _COUNTER_PROBES for name in probe(net)]
