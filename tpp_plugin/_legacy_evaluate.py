r"""The module path ``tpp_plugin.evaluate`` of earlier versions, kept importable.

The functions of the old module ``tpp_plugin/evaluate.py`` now live in
:mod:`tpp_plugin.distributed` (process group, sharding, seeds, collectives, SpikingJelly
observers, threshold broadcasting) and :mod:`tpp_plugin.evaluation` (:func:`evaluate`); the
threshold calibration is :func:`tpp_plugin.convert.calibrate_thresholds`. A module file named
``evaluate`` next to the function ``tpp_plugin.evaluate`` made the package attribute depend on
import order, so the old path is an alias in ``sys.modules`` only: ``from tpp_plugin.evaluate
import init_distributed`` works (with a ``DeprecationWarning`` naming the new path), while the
attribute ``tpp_plugin.evaluate`` stays the function.
"""

from __future__ import annotations

import importlib.machinery
import sys
import types
import warnings

from . import convert, distributed, evaluation

__all__ = ["ALIAS", "calibrate_thresholds"]


def calibrate_thresholds(model, batches, modules: list, mode="max", momentum: float = 0.1,
                         group=None) -> list[float]:
    """The old ``tpp_plugin.evaluate.calibrate_thresholds``: sharded over ``group``, by default
    the default process group when one exists (one process otherwise) — now
    :func:`tpp_plugin.convert.calibrate_thresholds` with ``group=default_group()``."""
    group = distributed.default_group() if group is None else group
    return convert.calibrate_thresholds(model, batches, modules, mode, momentum, group=group)


#: old name -> (new module path, object)
_MOVED = {
    **{name: ("tpp_plugin.distributed", getattr(distributed, name))
       for name in distributed.__all__},
    "evaluate": ("tpp_plugin.evaluation", evaluation.evaluate),
    "calibrate_thresholds": (
        "tpp_plugin.convert (with group=tpp_plugin.distributed.default_group())",
        calibrate_thresholds),
}


class _MovedModule(types.ModuleType):
    """A module whose every attribute is looked up in :data:`_MOVED`, with a warning."""

    def __getattr__(self, name: str):
        if name not in _MOVED:
            raise AttributeError(f"module 'tpp_plugin.evaluate' has no attribute {name!r}")
        where, value = _MOVED[name]
        warnings.warn(
            f"tpp_plugin.evaluate.{name} moved: import it from {where}; the module path "
            "tpp_plugin.evaluate is deprecated",
            DeprecationWarning,
            stacklevel=2,
        )
        return value

    def __dir__(self):
        return sorted({*super().__dir__(), *_MOVED})


#: the ``sys.modules`` entry of ``tpp_plugin.evaluate``
ALIAS = _MovedModule("tpp_plugin.evaluate", __doc__)
ALIAS.__all__ = sorted(_MOVED)
ALIAS.__package__ = "tpp_plugin"
ALIAS.__spec__ = importlib.machinery.ModuleSpec("tpp_plugin.evaluate", None, origin=__file__)
sys.modules.setdefault("tpp_plugin.evaluate", ALIAS)
