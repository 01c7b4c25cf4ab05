r"""SpikingJelly glue: :class:`TPPNode`, :class:`TemporalPermutation` and the converter hooks.

Works on PyPI ``spikingjelly==2.0.0`` (``ann2snn.RateCodingRecipe``) and
``spikingjelly==0.0.0.0.14`` (``ann2snn.Converter(dataloader, ...)``). All firing math is in
:mod:`tpp_plugin.functional`, the window machinery in :mod:`tpp_plugin.engine`; this package
adapts them to SpikingJelly's conventions:

* :mod:`.neurons` — :class:`TPPNode` (a ``neuron.BaseNode``), :class:`TemporalPermutation`;
* :mod:`.building` — :func:`make_neuron`, :class:`NeuronFactory`, :func:`swap_neurons`,
  :func:`insert_permutation`;
* :mod:`.streaming` — window-synchronous and delayed single-step networks;
* :mod:`.graph` — max-pools into neurons, multi-step support on 0.0.0.0.14;
* :mod:`.qcfs`, :mod:`.calibrated` — the plugin's recipes;
* :mod:`.hooks` — ``neuron=`` in SpikingJelly's own converters, :func:`install`.

After ``import tpp_plugin``::

    from spikingjelly.activation_based import ann2snn, functional
    converter = ann2snn.Converter(
        ann2snn.RateCodingRecipe(loader, mode='99.9%', neuron='tpp'))   # 2.0.0
    # converter = ann2snn.Converter(loader, mode='99.9%', neuron='tpp')  # 0.0.0.0.14
    snn = converter.convert(ann)                       # 0.0.0.0.14: converter(ann)
    functional.set_step_mode(snn, 'm')
    out = snn(x.unsqueeze(0).repeat(T, 1, 1, 1, 1)).mean(0)
"""

from spikingjelly.activation_based import base, layer
from spikingjelly.activation_based import neuron as sj_neuron
from spikingjelly.activation_based.ann2snn.modules import VoltageScaler

from ... import contract
from ...engine.window import STREAMING_MODES
from .building import NeuronFactory, insert_permutation, make_neuron, swap_neurons
from .calibrated import (
    ChannelScaler,
    TPPCalibrationRecipe,
    calibrated_thresholds,
    convert_calibrated,
)
from .compat import IS_LEGACY, active_counters, scaler_types
from .graph import StepFlatten, absorb_max_pools, make_step_mode_capable
from .hooks import install, reset
from .neurons import TemporalPermutation, TPPNode
from .qcfs import QCFSRecipe, convert_qcfs
from .streaming import (
    WindowDelay,
    WindowSynchronizer,
    align_delays,
    steps_needed,
    window_synchronous,
)

__all__ = [
    "TPPNode",
    "TemporalPermutation",
    "NeuronFactory",
    "make_neuron",
    "swap_neurons",
    "insert_permutation",
    "convert_qcfs",
    "QCFSRecipe",
    "TPPCalibrationRecipe",
    "convert_calibrated",
    "calibrated_thresholds",
    "ChannelScaler",
    "WindowSynchronizer",
    "window_synchronous",
    "absorb_max_pools",
    "align_delays",
    "WindowDelay",
    "steps_needed",
    "make_step_mode_capable",
    "STREAMING_MODES",
    "IS_LEGACY",
    "reset",
    "install",
]


def _sj_affine_types() -> tuple:
    """SpikingJelly 2.x's step-mode tensor ops (flatten, reshape, mean, cat, ...) of its
    step-mode graph adapter: affine."""
    try:
        from spikingjelly.activation_based.ann2snn.recipes import step_mode_adapters

        return (step_mode_adapters._StepModeTensorOp,)
    except (ImportError, AttributeError):
        return ()


contract.register_types("tpp", TPPNode)
contract.register_types("permutation", TemporalPermutation)
contract.register_types("spiking", TPPNode, sj_neuron.BaseNode)
contract.register_types("neuron", base.MemoryModule)  # IF and every other stateful module
contract.register_types("affine", VoltageScaler, StepFlatten, *scaler_types(),
                        *_sj_affine_types())
contract.register_types("eval_affine", *(getattr(layer, name) for name in ("Dropout", "Dropout2d")
                                         if hasattr(layer, name)))
contract.register_types("chain", *(getattr(layer, name) for name in (
    "StepModeContainer", "SeqToANNContainer", "MultiStepContainer") if hasattr(layer, name)))
contract.register_types("step_module", base.StepModule)
contract.register_types("window_driver", WindowSynchronizer)
contract.register_counter_probe(active_counters)
