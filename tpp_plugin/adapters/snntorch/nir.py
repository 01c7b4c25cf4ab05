r"""``snntorch.export_nir`` refuses the plugin's modules with a clear error (NIR has no
primitive for a neuron that fires at random from a whole window)."""

from __future__ import annotations

import importlib
import importlib.util
import sys

from torch import nn

from .permutation import TemporalPermutation
from .time import TimeFlatten
from .tpp import TPP

__all__ = ["export_nir_module", "wrap_export_to_nir", "wrap_extract_module"]


def _type_name(module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def _nir_problem(module: nn.Module) -> str | None:
    """Why ``module`` cannot be exported to NIR, or None."""
    if isinstance(module, TPP):
        return ("has no NIR primitive: NIR's neurons (LIF, CubaLIF, IF, ...) fire "
                "deterministically step by step, a TPP neuron fires at random once it has "
                "integrated a whole window")
    if isinstance(module, TemporalPermutation):
        return "has no NIR primitive: it shuffles whole spike trains along time"
    if isinstance(module, TimeFlatten):
        return ("is a sequence-mode wrapper with no NIR primitive: export a time-loop net "
                "(convert(..., sequence=False)) instead")
    return None


def _check_nir_exportable(net: nn.Module) -> None:
    modules = list(net.named_modules())  # neurons first: they are the real obstacle
    modules.sort(key=lambda item: not isinstance(item[1], (TPP, TemporalPermutation)))
    for name, module in modules:
        problem = _nir_problem(module)
        if problem:
            raise TypeError(
                f"snntorch.export_nir: cannot export module {name or '<root>'!r} "
                f"({_type_name(module)}): it {problem}"
            )


def wrap_export_to_nir(original):
    def export_to_nir(module, sample_data, *args, **kwargs):
        _check_nir_exportable(module)
        return original(module, sample_data, *args, **kwargs)

    return export_to_nir


def wrap_extract_module(original):
    # also covers an export_to_nir imported before the plugin was registered
    def _extract_snntorch_module(module):
        problem = _nir_problem(module)
        if problem:
            raise TypeError(
                f"snntorch.export_nir: cannot export {_type_name(module)}: it {problem}"
            )
        return original(module)

    return _extract_snntorch_module


def export_nir_module():
    """``snntorch.export_nir`` if it can be imported (it needs the ``nir`` and ``nirtorch``
    packages), else None."""
    if "snntorch.export_nir" in sys.modules:
        return sys.modules["snntorch.export_nir"]
    try:
        if importlib.util.find_spec("nir") is None or importlib.util.find_spec("nirtorch") is None:
            return None
        return importlib.import_module("snntorch.export_nir")
    except Exception:  # noqa: BLE001 - a broken optional exporter must not break registration
        return None
