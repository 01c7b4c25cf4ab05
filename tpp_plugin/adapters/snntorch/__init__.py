r"""snnTorch adapter: :class:`TPP`, :class:`TemporalPermutation`, reset integration, converter.

Registering the plugin (``import tpp_plugin``, or ``tpp_plugin.registry.register('snntorch')``)
adds ``snntorch.TPP`` and ``snntorch.TemporalPermutation`` and wraps ``snntorch.utils.reset`` so
that it also resets the plugin's neurons anywhere in a network;
``tpp_plugin.registry.unregister('snntorch')`` undoes all three.

Three ways to run a TPP neuron, all drawing the same random numbers for the same seed:

* **sequence**, a whole ``[T, B, ...]`` input in one call (``TPP(..., sequence=True)``,
  :meth:`TPP.forward_sequence`, ``convert(...)``);
* **time loop, window-synchronous** (default; snnTorch's tutorial pattern ``for step in
  range(num_steps)``): one step ``[B, ...]`` per call, the same input at every step of a window;
  step ``t`` returns step ``t`` of sequence mode, with no delay (``convert(..., sequence=False)``
  wraps the network in a :class:`TimeLoop`);
* **time loop, delayed** (``streaming='delayed'``): causal, for input that changes; each TPP
  layer delays by one window, a network needs :func:`steps_needed` ``= (L+1)·num_steps`` calls.

The package: :mod:`.tpp` (:class:`TPP`), :mod:`.if_neuron` (:class:`IF`), :mod:`.permutation`
(:class:`TemporalPermutation`), :mod:`.time` (sequence wrappers, :class:`TimeLoop`, delays,
:func:`reset`, :func:`steps_needed`), :mod:`.converter` (:func:`convert`), :mod:`.nir`. All firing
math is :mod:`tpp_plugin.functional`'s (``backend='torch'``) or the CUDA kernels' of
:mod:`tpp_plugin.kernels.cupy` (``backend='cupy'``); windows are :mod:`tpp_plugin.engine`'s.
"""

import snntorch
import snntorch.utils

from ... import contract
from .common import BACKENDS
from .converter import convert
from .if_neuron import IF
from .nir import export_nir_module, wrap_export_to_nir, wrap_extract_module
from .permutation import TemporalPermutation
from .time import TimeFlatten, TimeLoop, WindowDelay, reset, steps_needed, wrap_reset
from .tpp import TPP

__all__ = [
    "TPP",
    "IF",
    "TemporalPermutation",
    "TimeFlatten",
    "TimeLoop",
    "WindowDelay",
    "BACKENDS",
    "convert",
    "reset",
    "steps_needed",
    "install",
]

#: the old private names of the NIR wrappers and the branch delay (kept for existing code)
_wrap_export_to_nir, _wrap_extract_module, _WindowDelay = (
    wrap_export_to_nir, wrap_extract_module, WindowDelay)

contract.register_types("tpp", TPP)
contract.register_types("permutation", TemporalPermutation)
contract.register_types("spiking", snntorch.SpikingNeuron)
contract.register_types("neuron", snntorch.SpikingNeuron)
contract.register_types("time_flatten", TimeFlatten)
contract.register_types("step_module", TimeLoop)
contract.register_types("window_driver", TimeLoop)


def install(patcher) -> None:
    """Add ``snntorch.TPP`` and ``snntorch.TemporalPermutation``; wrap ``snntorch.utils.reset``
    so it also resets plugin neurons anywhere in a net; make ``snntorch.export_nir`` (when
    ``nir`` is installed) refuse plugin modules with a clear ``TypeError``. Undone by
    ``patcher.undo()``."""
    if not callable(getattr(snntorch.utils, "reset", None)):
        raise RuntimeError("this snnTorch has no snntorch.utils.reset; tpp_plugin needs >= 0.7")
    patcher.add(snntorch, "TPP", TPP)
    patcher.add(snntorch, "TemporalPermutation", TemporalPermutation)
    patcher.wrap(snntorch.utils, "reset", wrap_reset)
    export_nir = export_nir_module()
    if export_nir is not None:
        for name, make in (("export_to_nir", wrap_export_to_nir),
                           ("_extract_snntorch_module", wrap_extract_module)):
            if callable(getattr(export_nir, name, None)):
                patcher.wrap(export_nir, name, make)
