r"""tpp_plugin — the two-phase probabilistic (TPP) spiking neuron for ANN→SNN conversion.

``import tpp_plugin`` registers the neuron into every installed framework (SpikingJelly,
snnTorch); :func:`unregister` undoes it. See :mod:`tpp_plugin.functional` for the math.
"""

from . import functional
from .calibration import calibrate_for_T
from .calibration.finetune import finetune as finetune_calibration
from .count_domain import count_mode
from .evaluate import evaluate
from .qcfs import QCFS, qcfs_levels, replace_relu
from .registry import ADAPTERS, default_neuron, register, registered, unregister
from .stats import spike_stats

__version__ = "0.1.0"

__all__ = [
    "functional",
    "count_mode",
    "spike_stats",
    "calibrate_for_T",
    "finetune_calibration",
    "evaluate",
    "QCFS",
    "qcfs_levels",
    "replace_relu",
    "register",
    "registered",
    "unregister",
    "default_neuron",
    "reset",
    "reseed",
    "__version__",
]



def reset(net) -> None:
    """Reset the state of every spiking module in ``net``, for each registered framework
    (SpikingJelly's ``reset_net``, snnTorch's ``utils.reset`` including plugin neurons)."""
    import importlib

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


register()
