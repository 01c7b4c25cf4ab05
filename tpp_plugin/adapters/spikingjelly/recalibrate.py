r"""The calibration switch on SpikingJelly: a threshold recipe's conversion done by the calibration
for ``T`` instead (``calibrate=`` of ``RateCodingRecipe``/``LocalThresholdBalancingRecipe`` and of
0.0.0.0.14's ``Converter``; :func:`tpp_plugin.default_neuron` ``(..., calibrate=...)``;
``python -m tpp_plugin run --calibrate``).

The replacement is exactly :class:`~.calibrated.TPPCalibrationRecipe` (2.x) or
:func:`~.calibrated.convert_calibrated` (0.0.0.0.14) on the recipe's own data loader, with the
recipe's ``fuse_flag`` (and its ``channel_dim`` where it has one), on the converter's device. The
recipe's threshold statistic (``mode``, ``momentum``, ``channel_wise``, ``half_threshold``,
``pre_spike_maxpool``, ``eps``) does not apply; each replaced conversion prints one line on
stderr that names the recipe, ``T``, the counting rule, the calibration images, the seconds and
the ignored options.
"""

from __future__ import annotations

import copy
import inspect
import sys
import time

from spikingjelly.activation_based import ann2snn

from ...calibration.switch import CalibrationRequest, calibration_request
from ...registry import current_default_calibration
from .calibrated import TPPCalibrationRecipe, convert_calibrated

__all__ = ["recipe_calibration", "convert_by_calibration", "convert_legacy_by_calibration",
           "refuse_unreplaceable", "report_kept"]

#: per threshold recipe: its options that the calibration for T does not use
_NOT_USED = {
    "RateCodingRecipe": ("mode", "momentum", "channel_wise", "channel_dim", "pre_spike_maxpool",
                         "half_threshold", "eps"),
    "LocalThresholdBalancingRecipe": ("eps",),
    "Converter": ("mode", "momentum"),  # SpikingJelly 0.0.0.0.14
}
#: reported as ignored whatever their value: the threshold statistic the script chose
_ALWAYS_REPORTED = ("mode", "momentum")


def _recipe_name(recipe) -> str:
    for cls in type(recipe).__mro__:
        if cls.__name__ in _NOT_USED:
            return cls.__name__
    return type(recipe).__name__


def recipe_calibration(owner, factory, neuron, calibrate, neuron_factory=None):
    """The :class:`CalibrationRequest` a threshold recipe (or 0.0.0.0.14 ``Converter``) being
    built carries, or ``None``: its own ``calibrate=``, else the active
    ``default_neuron(..., calibrate=...)`` when that block chose its neuron.

    :param owner: the recipe or converter (for its name)
    :param factory: the :class:`~.building.NeuronFactory` the hook installs, or ``None``
    :param neuron: the ``neuron=`` the caller passed (``None``: the default neuron's)
    :param calibrate: the ``calibrate=`` the caller passed
    :param neuron_factory: SpikingJelly's ``neuron_factory=`` the caller passed
    :raises ValueError: ``calibrate`` with a ``neuron_factory`` (its neurons are the caller's),
        or an active calibration switch meeting a ``neuron_factory``
    :raises TypeError: ``calibrate`` without any neuron to build
    """
    name = type(owner).__name__
    if calibrate is not None and calibrate is not False:
        if neuron_factory is not None:
            raise ValueError(f"{name}(calibrate=...) cannot take neuron_factory=: the calibration "
                             "for T builds the neurons (choose them with neuron=, neuron_kwargs=)")
        if factory is None:
            raise TypeError(f"{name}(calibrate=...) needs neuron= (e.g. neuron='tpp', "
                            "neuron_kwargs={'T': 8}) or an active tpp_plugin.default_neuron")
        return calibration_request(calibrate, factory.neuron, factory.kwargs,
                                   f"{name}(calibrate=)")
    ambient = current_default_calibration()
    if ambient is None:
        return None
    if neuron_factory is not None:
        raise refuse_unreplaceable(owner, "it was given a neuron_factory= of the script's own")
    if neuron is not None:
        owner._tpp_calibration_kept = "the script chose neuron= itself"
        return None
    return ambient


def refuse_unreplaceable(recipe, why: str | None = None) -> ValueError:
    """The error of the calibration switch meeting a conversion it cannot replace."""
    why = why or ("it builds neurons and thresholds of its own (only RateCodingRecipe, "
                  "LocalThresholdBalancingRecipe and 0.0.0.0.14's Converter are replaced)")
    return ValueError(
        f"tpp_plugin --calibrate: cannot replace {type(recipe).__name__} by the calibration for "
        f"T: {why}; run without --calibrate (calibrate=) to keep the recipe as it is"
    )


def report_kept(recipe) -> None:
    """One stderr line for a threshold recipe the active switch leaves as it is."""
    why = getattr(recipe, "_tpp_calibration_kept", None)
    if why:
        print(f"tpp_plugin: {_recipe_name(recipe)} kept its own thresholds under --calibrate: "
              f"{why}", file=sys.stderr, flush=True)


def _ignored(owner, init) -> str:
    """``"mode='99.9%', momentum=0.1"``: the recipe's options the calibration does not use,
    those the script may have chosen (the statistic always, others when not their default)."""
    try:
        defaults = {k: p.default for k, p in inspect.signature(init).parameters.items()}
    except (TypeError, ValueError):
        defaults = {}
    channel_wise = bool(getattr(owner, "channel_wise", False))
    items = []
    for key in _NOT_USED.get(_recipe_name(owner), ()):
        if not hasattr(owner, key) or (key == "channel_dim" and channel_wise):
            continue
        value = getattr(owner, key)
        if key in _ALWAYS_REPORTED or defaults.get(key, inspect.Parameter.empty) != value:
            items.append(f"{key}={value!r}")
    return ", ".join(items)


def _report(owner, request: CalibrationRequest, result, neuron, seconds: float,
            kept: str) -> None:
    settings = result.settings if result is not None else {}
    count = settings.get("count", request.options.get("count", "exact"))
    extra = ""
    tuned = settings.get("finetune")
    epochs = request.options.get("finetune_epochs")
    if epochs:
        epoch = tuned.get("epoch") if isinstance(tuned, dict) else None
        extra = (f", fine-tuned for {epochs} epoch{'s' if epochs != 1 else ''} on every image of "
                 f"the loader (kept epoch {epoch})")
    ignored = _ignored(owner, type(owner).__init__)
    request.replaced.append(_recipe_name(owner))
    print(f"tpp_plugin: {_recipe_name(owner)} replaced by the calibration for T={request.T} "
          f"(neuron {neuron!r}, count={count!r}): {settings.get('samples', '?')} calibration "
          f"images{extra}, {seconds:.1f} s; kept: {kept}"
          + (f"; ignored: {ignored}" if ignored else ""), file=sys.stderr, flush=True)


def _options(owner, request: CalibrationRequest) -> dict:
    """The calibration options: the request's, and the recipe's ``channel_dim`` where it means
    the activations' channel dimension (LTB; RateCoding with ``channel_wise=True``)."""
    options = dict(request.options)
    channel_wise = _recipe_name(owner) == "LocalThresholdBalancingRecipe" or bool(
        getattr(owner, "channel_wise", False))
    if channel_wise and hasattr(owner, "channel_dim"):
        options.setdefault("channel_dim", owner.channel_dim)
    return options


def _kept(fuse_flag, device) -> str:
    where = "the model's" if device is None else repr(str(device))
    return f"fuse_flag={fuse_flag!r}, device={where}"


def convert_by_calibration(converter, ann, request: CalibrationRequest):
    """SpikingJelly 2.x: ``converter.convert(ann)`` for a threshold recipe, done as
    ``FXConverter(TPPCalibrationRecipe(recipe.dataloader, T, ...), device).convert(ann)``."""
    recipe = converter.recipe
    factory = recipe._tpp_factory
    start = time.perf_counter()
    options = _options(recipe, request)
    calibrated = TPPCalibrationRecipe(recipe.dataloader, request.T, neuron=factory.neuron,
                                      neuron_kwargs=dict(factory.kwargs),
                                      fuse_flag=recipe.fuse_flag, **options)
    snn = ann2snn.FXConverter(calibrated, device=converter.device).convert(ann)
    kept = _kept(recipe.fuse_flag, converter.device)
    if "channel_dim" in options and "channel_dim" not in request.options:
        kept += f", channel_dim={options['channel_dim']!r}"
    _report(recipe, request, calibrated.result, factory.neuron, time.perf_counter() - start, kept)
    return snn


def convert_legacy_by_calibration(converter, ann, request: CalibrationRequest):
    """SpikingJelly 0.0.0.0.14: ``converter(ann)`` done as ``convert_calibrated(ann,
    converter.dataloader, T, ...)`` on the converter's device."""
    factory = converter.neuron_factory
    start = time.perf_counter()
    model = ann
    if converter.device is not None:
        model = copy.deepcopy(ann).to(converter.device)
    snn, result = convert_calibrated(model, converter.dataloader, request.T, factory.neuron,
                                     dict(factory.kwargs), fuse_flag=converter.fuse_flag,
                                     return_result=True, **request.options)
    kept = _kept(converter.fuse_flag, converter.device)
    _report(converter, request, result, factory.neuron, time.perf_counter() - start, kept)
    return snn
