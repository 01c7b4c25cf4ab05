r"""tpp_plugin — the two-phase probabilistic (TPP) spiking neuron for ANN→SNN conversion.

``import tpp_plugin`` registers the neuron into every installed framework (SpikingJelly,
snnTorch); :func:`unregister` undoes it. See :mod:`tpp_plugin.functional` for the math.
"""

from . import functional
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
    "evaluate",
    "QCFS",
    "qcfs_levels",
    "replace_relu",
    "register",
    "registered",
    "unregister",
    "default_neuron",
    "reset",
    "__version__",
]



def reset(net) -> None:
    """Reset the state of every spiking module in ``net``, for each registered framework
    (SpikingJelly's ``reset_net``, snnTorch's ``utils.reset`` including plugin neurons)."""
    import importlib

    for framework in registered():
        importlib.import_module(ADAPTERS[framework]).reset(net)


register()
