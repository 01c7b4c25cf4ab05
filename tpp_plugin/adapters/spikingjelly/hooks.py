r"""The SpikingJelly converters' ``neuron=`` hooks and the registration (:func:`install`).

``import tpp_plugin`` wraps SpikingJelly 2.x's ``RateCodingRecipe`` and
``LocalThresholdBalancingRecipe`` (``neuron=``, ``neuron_kwargs=``, ``calibrate=``) and
``FXConverter.convert``, warns about the recipes of ``ModuleConverter`` (their neurons are
their own; under the calibration switch it refuses them), and on 0.0.0.0.14 wraps
``Converter(dataloader, ...)``; :func:`tpp_plugin.unregister` undoes it all. What
``calibrate=`` does is :mod:`.recalibrate`.
"""

from __future__ import annotations

import functools
import inspect

from spikingjelly.activation_based import ann2snn, base, layer
from spikingjelly.activation_based import neuron as sj_neuron
from torch import nn

from ...convert import (
    batch_inputs,
    check_calibration_mode,
    check_momentum,
    named_modules_of_type,
    set_submodule,
)
from ...registry import _warn_once, current_default_calibration, current_default_neuron
from .building import IF_TYPES, NeuronFactory, is_half_threshold, make_neuron, neuron_kind
from .calibrated import TPPCalibrationRecipe
from .compat import IS_LEGACY
from .graph import finish, make_step_mode_capable
from .neurons import TemporalPermutation, TPPNode
from .qcfs import QCFSRecipe
from .recalibrate import (
    convert_by_calibration,
    convert_legacy_by_calibration,
    recipe_calibration,
    refuse_unreplaceable,
    report_kept,
)
from .streaming import steps_needed, tpp_modules

__all__ = ["install", "reset", "check_calibration_arguments", "run_calibration"]


def _neuron_hook_kwargs(neuron, neuron_kwargs, neuron_factory):
    """The :class:`NeuronFactory` a converter hook installs, or ``None`` (the framework's own
    neuron): ``neuron=``/``neuron_kwargs=`` if given, else the active
    :func:`tpp_plugin.registry.default_neuron` unless the caller passed its own factory."""
    if neuron is None:
        if neuron_kwargs:
            raise TypeError("neuron_kwargs needs neuron= (e.g. neuron='tpp')")
        default = current_default_neuron()
        if default is None or neuron_factory is not None:
            return None
        name, default_kwargs = default
        return NeuronFactory(name, **default_kwargs)
    if neuron_factory is not None:
        raise TypeError("pass either neuron= or neuron_factory=, not both")
    return NeuronFactory(neuron, **dict(neuron_kwargs or {}))


def _wrap_recipe_init(original):
    """``neuron=``/``neuron_kwargs=``/``calibrate=`` for a SpikingJelly 2.x recipe that builds
    IF neurons: remembered on the recipe and applied by the converter hook."""

    def __init__(self, *args, neuron=None, neuron_kwargs=None, calibrate=None, **kwargs):
        self._tpp_factory = _neuron_hook_kwargs(neuron, neuron_kwargs, kwargs.get("neuron_factory"))
        self._tpp_calibrate = recipe_calibration(self, self._tpp_factory, neuron, calibrate,
                                                 kwargs.get("neuron_factory"))
        if self._tpp_factory is not None:
            check_calibration_arguments(original, self, args, kwargs)
        original(self, *args, **kwargs)

    return __init__


def check_calibration_arguments(init, owner, args, kwargs) -> None:
    """Refuse, before the framework sees them, what SpikingJelly would refuse late, obscurely or
    not at all (for a recipe or 0.0.0.0.14 converter the plugin switches): a bad
    ``mode``/``momentum``, an empty calibration loader."""
    try:
        bound = inspect.signature(init).bind(owner, *args, **kwargs)
    except TypeError:
        return  # the framework's own error says which argument is wrong
    bound.apply_defaults()
    values = bound.arguments
    if "mode" in values:
        check_calibration_mode(values["mode"])
    if "momentum" in values:
        check_momentum(values["momentum"])
    loader = values.get("dataloader")
    if loader is not None and hasattr(loader, "__len__") and len(loader) == 0:
        raise ValueError(
            f"{type(owner).__name__}: the calibration dataloader is empty; thresholds come from "
            "its batches"
        )


def run_calibration(convert, owner, ann):
    """``convert(ann)`` with a model error during calibration named as the data's fault it is."""
    try:
        return convert(ann)
    except RuntimeError as exc:
        loader = getattr(owner, "dataloader", None)
        first = next(iter(loader), None) if loader is not None else None
        if first is None:
            raise
        shape = tuple(batch_inputs(first).shape)
        raise ValueError(
            f"{type(owner).__name__}: running the model on the calibration batches failed "
            f"(first batch of shape {shape}; the model's error: {exc}); calibrate with batches "
            "shaped like the model's input"
        ) from exc


def _swap_recipe_neurons(net: nn.Module, factory: NeuronFactory) -> None:
    """Replace the IF neurons a recipe built (threshold 1 inside its scaler pair) by the
    factory's, in graph order."""
    kind = neuron_kind(factory.neuron)
    for name, old in list(named_modules_of_type(net, IF_TYPES, exact=True)):
        new = factory.create()
        if kind == "if" and is_half_threshold(old) and "v_init" not in factory.kwargs:
            new = make_neuron("if", factory.v_threshold, **{**factory.kwargs, "v_init": 0.5})
        new.step_mode = old.step_mode
        set_submodule(net, name, new)


def _wrap_converter_convert(original):
    """SpikingJelly 2.x ``Converter.convert``: apply the recipe's ``neuron=`` (or the active
    :func:`~tpp_plugin.registry.default_neuron`), then :func:`absorb_max_pools` and
    :func:`window_synchronous`. A recipe the plugin cannot switch is named in a warning."""

    def convert(self, ann):
        recipe = self.recipe
        request = getattr(recipe, "_tpp_calibrate", None)
        if request is not None:  # calibrate=: the calibration for T converts instead
            return convert_by_calibration(self, ann, request)
        report_kept(recipe)
        if not (hasattr(recipe, "_tpp_factory") or getattr(recipe, "_tpp_switchable", False)):
            _warn_unswitchable(recipe)
        factory = getattr(recipe, "_tpp_factory", None)
        if factory is None:
            snn = original(self, ann)
        else:
            snn = run_calibration(functools.partial(original, self), recipe, ann)
            _swap_recipe_neurons(snn, factory)
        return finish(snn)

    return convert


def _warn_unswitchable(recipe) -> None:
    """Under an active :func:`~tpp_plugin.registry.default_neuron` (``python -m tpp_plugin run
    --neuron ...``), say once that ``recipe`` keeps its own neurons; with its ``calibrate=``
    (``run --calibrate``), refuse it by name."""
    if current_default_calibration() is not None:
        raise refuse_unreplaceable(recipe)
    default = current_default_neuron()
    if default is not None:
        _warn_once(
            f"tpp_plugin: {type(recipe).__name__} builds its own neurons and takes no "
            f"neuron=; its result keeps them (the default neuron {default[0]!r} applies to "
            "RateCodingRecipe, LocalThresholdBalancingRecipe and QCFSRecipe)"
        )


def _wrap_module_converter_convert(original):
    """SpikingJelly 2.x ``ModuleConverter.convert`` (SpikeZIP, Qwen2 recipes: their own
    neurons): unchanged, but named in a warning when a default neuron is active."""

    def convert(self, *args, **kwargs):
        _warn_unswitchable(getattr(self, "recipe", self))
        return original(self, *args, **kwargs)

    return convert


def _wrap_estimate_delay_start(original):
    """SpikingJelly 2.x ``ann2snn.estimate_delay_start`` (the read-out delay its scripts compute
    from the IF neurons' charge-up) on a network with TPP layers: ``0`` when they are
    window-synchronous (their output is valid from the first step), ``L·T`` for ``L`` delayed
    TPP layers on the longest path; other networks go to SpikingJelly's estimate."""

    def estimate_delay_start(model, dataloader, device, time_steps, num_batches=1):
        layers = tpp_modules(model)
        others = [m for m in model.modules()
                  if isinstance(m, sj_neuron.BaseNode) and not isinstance(m, TPPNode)]
        if not layers or others:
            return original(model, dataloader, device, time_steps, num_batches)
        T = layers[0].T or time_steps
        return steps_needed(model, T) - T

    return estimate_delay_start


def _wrap_legacy_converter_init(original):
    def __init__(self, *args, neuron=None, neuron_kwargs=None, calibrate=None, **kwargs):
        factory = _neuron_hook_kwargs(neuron, neuron_kwargs, None)
        request = recipe_calibration(self, factory, neuron, calibrate)
        if factory is not None:
            check_calibration_arguments(original, self, args, kwargs)
        original(self, *args, **kwargs)
        self.neuron_factory = factory
        self._tpp_calibrate = request

    return __init__


def _wrap_legacy_converter_forward(original):
    def forward(self, ann):
        request = getattr(self, "_tpp_calibrate", None)
        if request is not None:  # calibrate=: the calibration for T converts instead
            return convert_legacy_by_calibration(self, ann, request)
        report_kept(self)
        factory = getattr(self, "neuron_factory", None)
        if factory is None:
            return original(self, ann)
        snn = run_calibration(functools.partial(original, self), self, ann)
        _swap_recipe_neurons(snn, factory)
        return finish(make_step_mode_capable(snn))

    return forward


#: SpikingJelly 2.x recipes that build IF neurons and get ``neuron=``/``neuron_kwargs=``
_SWITCHABLE_RECIPES = tuple(
    name for name in ("RateCodingRecipe", "LocalThresholdBalancingRecipe") if hasattr(ann2snn, name)
)


def reset(net: nn.Module) -> None:
    """Reset every SpikingJelly ``MemoryModule`` in ``net`` (used by :func:`tpp_plugin.reset`)."""
    for module in net.modules():
        if isinstance(module, base.MemoryModule):
            module.reset()


def install(patcher) -> None:
    """Register into SpikingJelly (called by :func:`tpp_plugin.register`)."""
    patcher.add(sj_neuron, "TPPNode", TPPNode)
    patcher.add(layer, "TemporalPermutation", TemporalPermutation)
    if IS_LEGACY:
        patcher.wrap(ann2snn.Converter, "__init__", _wrap_legacy_converter_init)
        patcher.wrap(ann2snn.Converter, "forward", _wrap_legacy_converter_forward)
    else:
        for recipe in _SWITCHABLE_RECIPES:
            patcher.wrap(getattr(ann2snn, recipe), "__init__", _wrap_recipe_init)
        patcher.wrap(ann2snn.FXConverter, "convert", _wrap_converter_convert)
        if callable(getattr(ann2snn, "estimate_delay_start", None)):
            patcher.wrap(ann2snn, "estimate_delay_start", _wrap_estimate_delay_start)
        if hasattr(ann2snn, "ModuleConverter"):
            patcher.wrap(ann2snn.ModuleConverter, "convert", _wrap_module_converter_convert)
        patcher.add(ann2snn, "QCFSRecipe", QCFSRecipe)
        patcher.add(ann2snn, "TPPCalibrationRecipe", TPPCalibrationRecipe)


