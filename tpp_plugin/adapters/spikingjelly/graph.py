r"""Graph passes on SpikingJelly converted networks: max-pools into TPP neurons
(:func:`absorb_max_pools`), multi-step support on 0.0.0.0.14 (:func:`make_step_mode_capable`)
and what every conversion ends with (:func:`finish`)."""

from __future__ import annotations

import warnings

import torch
from spikingjelly.activation_based import base, layer
from torch import fx, nn

from ... import contract
from ...convert import set_submodule
from ...engine import graph
from .compat import IS_LEGACY, invalidate_reset_cache, scaler_types
from .neurons import TPPNode
from .streaming import align_delays, window_synchronous

__all__ = ["absorb_max_pools", "make_step_mode_capable", "finish", "unwrapped"]


def unwrapped(module):
    """The module inside a one-module step-mode container, else ``module``."""
    if isinstance(module, nn.Sequential) and len(module) == 1:
        return module[0]
    return module


def _plain_max_pool(module: nn.Module) -> nn.Module:
    """A plain torch copy of a (possibly SpikingJelly step-mode) max-pool module."""
    if getattr(module, "return_indices", False):
        raise ValueError(f"a max-pool with return_indices=True cannot be converted: {module}")
    for cls in contract.MAX_POOLS:
        if isinstance(module, cls):
            if "Adaptive" in cls.__name__:
                return cls(module.output_size)
            return cls(module.kernel_size, module.stride, module.padding, module.dilation,
                       ceil_mode=module.ceil_mode)
    raise TypeError(f"not a max-pool: {module!r}")


def absorb_max_pools(gm: nn.Module) -> nn.Module:
    r"""Move every max-pool next to a :class:`TPPNode` into the neuron (in place).

    A TPP neuron has its whole window before it fires, so it can max-pool *window potentials*:
    ``ReLU → MaxPool`` (as ``neuron → scaler → MaxPool``) and ``MaxPool → ReLU`` (as
    ``MaxPool → scaler → neuron``, SpikingJelly's channel-wise recipes) both become the neuron
    with ``pool=MaxPool`` (both at once: ``pool=Sequential(before, after)``), paired by
    :func:`tpp_plugin.engine.pair_max_pools`. An exact-count network then computes the ANN with
    max-pooling and T-level rounding exactly (a monotone rounding commutes with max); IF neurons
    can only pool per-step currents or spikes, an approximation.

    :param gm: a converted network (``fx.GraphModule``; other modules are returned as they are)
    :return: ``gm``
    :raises ValueError: for a max-pool that acts on spikes but has no TPP neuron right before or
        after it (one whose output feeds nothing else), naming the graph node
    """
    if not isinstance(gm, fx.GraphModule) or not any(
            isinstance(m, TPPNode) for m in gm.modules()):
        return gm
    modules = dict(gm.named_modules())
    scalers = scaler_types()

    def module_of(node):
        return unwrapped(modules.get(node.target)) if node.op == "call_module" else None

    def is_max_pool(node) -> bool:
        return isinstance(module_of(node), contract.MAX_POOLS)

    def spiking(node, seen=None) -> bool:  # does the node's value depend on a spiking neuron?
        seen = set() if seen is None else seen
        for arg in node.all_input_nodes:
            if arg in seen:
                continue
            seen.add(arg)
            if isinstance(module_of(arg), base.MemoryModule) or spiking(arg, seen):
                return True
        return False

    neurons = [n for n in gm.graph.nodes if isinstance(module_of(n), TPPNode)
               and module_of(n).pool is None]
    paired = graph.pair_max_pools(neurons, is_max_pool,
                                  lambda node: isinstance(module_of(node), scalers))
    absorbed = {p for pools in paired.values() for p in pools}
    for node in gm.graph.nodes:
        if is_max_pool(node) and node not in absorbed and spiking(node):
            raise ValueError(
                f"max-pool {node.target!r} acts on spikes, and no TPP neuron sits right "
                "before or after it (with nothing else using its output), so it cannot pool "
                "window potentials: put it directly after a ReLU (ReLU → MaxPool) or use "
                "average pooling"
            )
    for neuron_node, pools in paired.items():
        plain = [_plain_max_pool(module_of(p)) for p in pools]
        module_of(neuron_node).pool = plain[0] if len(plain) == 1 else nn.Sequential(*plain)
        for pool in pools:
            pool.replace_all_uses_with(pool.args[0])
            gm.graph.erase_node(pool)
    if paired:
        gm.graph.lint()
        gm.delete_all_unused_submodules()
        gm.recompile()
        invalidate_reset_cache(gm)
    return gm


def finish(net: nn.Module) -> nn.Module:
    """What every conversion or swap ends with: max-pools into TPP neurons, aligned delayed
    branches, window-synchronous single steps (and, on 0.0.0.0.14, multi-step support, which
    the synchronous window uses)."""
    if IS_LEGACY and isinstance(net, fx.GraphModule):
        make_step_mode_capable(net)
    invalidate_reset_cache(net)
    return window_synchronous(align_delays(absorb_max_pools(net)))


# ------------------------------------------------------------------------------------------------
# 0.0.0.0.14: make converted graphs run in multi-step mode
# ------------------------------------------------------------------------------------------------
_STATELESS_TYPES = (contract.WEIGHTED + contract.BATCH_NORMS + contract.MAX_POOLS[:3]
                    + contract.AVG_POOLS + (nn.Flatten, nn.Dropout, nn.Dropout2d, nn.Identity))


class StepFlatten(nn.Module, base.StepModule):
    """``torch.flatten(x, start_dim, end_dim)`` that skips the time dimension in multi-step mode."""

    def __init__(self, start_dim: int = 0, end_dim: int = -1):
        super().__init__()
        self.start_dim, self.end_dim = start_dim, end_dim
        self.step_mode = "s"

    def forward(self, x):
        if self.step_mode == "s":
            return torch.flatten(x, self.start_dim, self.end_dim)
        flat = torch.flatten(x.flatten(0, 1), self.start_dim, self.end_dim)
        return flat.unflatten(0, x.shape[:2])


def make_step_mode_capable(gm: fx.GraphModule) -> fx.GraphModule:
    """Wrap the stateless torch layers of a converted graph in ``layer.StepModeContainer`` and
    rewrite ``torch.flatten`` calls, so ``functional.set_step_mode(gm, 'm')`` works (in place).

    Nodes that cannot be made time-aware (e.g. ``x.view(x.size(0), -1)``) are reported with a
    warning: the graph still runs in single-step mode.
    """
    wrapped = {id(inner) for outer in gm.modules() if isinstance(outer, base.StepModule)
               for inner in outer.modules() if inner is not outer}  # idempotent
    for name, module in list(gm.named_modules()):
        if (type(module) in _STATELESS_TYPES and not isinstance(module, base.StepModule)
                and id(module) not in wrapped):
            set_submodule(gm, name, layer.StepModeContainer(False, module))
    unsupported = []
    for node in list(gm.graph.nodes):
        is_flatten = (node.op == "call_function" and node.target is torch.flatten) or (
            node.op == "call_method" and node.target == "flatten"
        )
        if is_flatten:
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            target = f"step_flatten_{len(unsupported)}_{id(node)}"
            gm.add_submodule(target, StepFlatten(start, end))
            with gm.graph.inserting_after(node):
                new = gm.graph.call_module(target, args=(node.args[0],))
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
        elif node.op in ("call_method",) and node.target in ("view", "reshape", "size"):
            unsupported.append(node.format_node())
    gm.graph.lint()
    gm.recompile()
    if unsupported:
        warnings.warn(
            "these graph nodes do not know the time dimension and fail in multi-step mode "
            f"(use nn.Flatten instead): {unsupported}",
            RuntimeWarning,
            stacklevel=2,
        )
    return gm
