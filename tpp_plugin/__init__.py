r"""tpp_plugin — the two-phase probabilistic (TPP) spiking neuron for ANN→SNN conversion.

``import tpp_plugin`` registers the neuron into every installed framework (SpikingJelly,
snnTorch); :func:`unregister` undoes it. See :mod:`tpp_plugin.functional` for the math.
"""

# _legacy_evaluate registers the deprecated module path tpp_plugin.evaluate (an alias)
from . import _legacy_evaluate, functional  # noqa: F401
from .calibration import calibrate_for_T
from .calibration.finetune import finetune as finetune_calibration
from .count_domain import count_mode
from .evaluation import evaluate
from .qcfs import QCFS, qcfs_levels, replace_relu
from .registry import default_neuron, register, registered, unregister
from .state import reseed, reset
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


register()
