r"""The state of a converted network: reset every spiking module, restart every random stream.

Both functions work across frameworks (SpikingJelly, snnTorch) and are re-exported as
:func:`tpp_plugin.reset` and :func:`tpp_plugin.reseed`.
"""

from __future__ import annotations

import importlib

from . import functional
from .registry import ADAPTERS, registered

__all__ = ["reset", "reseed"]


def reset(net) -> None:
    """Reset the state of every spiking module in ``net``, for each registered framework
    (SpikingJelly's ``reset_net``, snnTorch's ``utils.reset`` including plugin neurons)."""
    for framework in registered():
        importlib.import_module(ADAPTERS[framework]).reset(net)


def reseed(net, seed=None) -> None:
    """Restart the random stream of every stochastic plugin module in ``net`` (both frameworks),
    through each module's public ``manual_seed``.

    :param net: a network (or a single module)
    :param seed: ``None`` — every seeded module restarts from its own ``seed``, as when it was
        built (modules without a seed are left alone); an int ``s`` — the ``i``-th stochastic
        module (in ``net.modules()`` order) gets ``functional.spawn_seeds(s, n)[i]``

    Example::

        >>> import torch
        >>> from tpp_plugin.adapters.snntorch import TPP
        >>> net = torch.nn.Sequential(TPP(num_steps=4, sequence=True, init_hidden=True, seed=3))
        >>> x = torch.full((4, 2), 0.4)
        >>> a = net(x); reseed(net); b = net(x)
        >>> torch.equal(a, b)
        True
    """
    modules = [m for m in net.modules() if callable(getattr(m, "manual_seed", None))]
    if seed is None:
        for module in modules:
            if getattr(module, "seed", None) is not None:
                module.manual_seed(module.seed)
        return
    for module, child in zip(modules, functional.spawn_seeds(seed, len(modules))):
        module.manual_seed(child)
