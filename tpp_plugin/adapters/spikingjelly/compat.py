"""What differs between SpikingJelly's lines (2.x and 0.0.0.0.14), in one place."""

from __future__ import annotations

import torch
from spikingjelly.activation_based import ann2snn
from spikingjelly.activation_based import functional as sj_functional
from torch import nn

__all__ = ["IS_LEGACY", "invalidate_reset_cache", "scaler_types", "active_counters",
           "adapt_step_modes"]

#: ``True`` on the ``0.0.0.0.14`` line (``ann2snn.Converter(dataloader, ...)``, no recipes)
IS_LEGACY = not hasattr(ann2snn, "RateCodingRecipe")


def invalidate_reset_cache(net: nn.Module) -> None:
    """After graph surgery: SpikingJelly 2.x caches the module list ``reset_net`` walks."""
    invalidate = getattr(sj_functional, "invalidate_reset_cache", None)
    if invalidate is not None:
        invalidate(net)


def scaler_types() -> tuple:
    """The converters' scalers (``VoltageScaler``, and ``ChannelVoltageScaler`` on 2.x)."""
    from spikingjelly.activation_based.ann2snn import modules as ann2snn_modules

    names = ("VoltageScaler", "ChannelVoltageScaler")
    return tuple(getattr(ann2snn_modules, n) for n in names if hasattr(ann2snn_modules, n))


def active_counters(net: nn.Module) -> list:
    """SpikingJelly 2.x ``op_counter`` modes active on ``net`` now: dispatch and function modes on
    torch's mode stacks, and module counters through their forward hooks (0.0.0.0.14: none)."""
    try:
        from spikingjelly.activation_based.op_counter.base import _CounterMode
    except ImportError:
        return []
    from torch.overrides import _get_current_function_mode_stack
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    found = [m for m in (*_get_current_dispatch_mode_stack(), *_get_current_function_mode_stack())
             if isinstance(m, _CounterMode)]
    for module in net.modules():
        for hook in module._forward_hooks.values():
            owner = getattr(hook, "__self__", None)
            if isinstance(owner, _CounterMode) and owner not in found:
                found.append(owner)
    return [type(m).__name__ for m in found]


def adapt_step_modes(fx_model, recipe: str, device):
    """SpikingJelly 2.x's step-mode adaptation of a converted graph, as its own recipes do (the
    plugin's 2.x recipes call it; 0.0.0.0.14 has no recipes)."""
    from spikingjelly.activation_based.ann2snn.recipes.step_mode_adapters import (  # 2.x only
        _RATE_CODING_SAFE_MODULE_TYPES,
        _RATE_CODING_STATELESS_MODULE_TYPES,
        adapt_step_mode_graph,
    )

    return adapt_step_mode_graph(
        fx_model,
        context=f"{recipe} step-mode backend",
        wrap_module_types=_RATE_CODING_STATELESS_MODULE_TYPES,
        safe_module_types=_RATE_CODING_SAFE_MODULE_TYPES,
        safe_call_functions=(torch.nn.functional.dropout,),
    ).to(device)
