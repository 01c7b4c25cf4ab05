r"""Register the plugin into installed SNN frameworks, reversibly.

Each adapter module exposes ``install(patcher)``, which adds or wraps framework attributes only
through the :class:`Patcher` it is given. The patcher never overwrites a name it did not add
itself (it warns once and leaves the name alone), marks what it wraps so a second registration
is a no-op, and undoes everything in reverse order on :func:`unregister`.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import importlib.util
import warnings

from .calibration.switch import calibration_request
from .functional import check_seed_value

__all__ = [
    "ADAPTERS",
    "NEURON_NAMES",
    "Patcher",
    "register",
    "unregister",
    "registered",
    "default_neuron",
    "current_default_neuron",
    "current_default_calibration",
    "check_neuron_name",
]

#: framework import name -> adapter module
ADAPTERS = {
    "spikingjelly": "tpp_plugin.adapters.spikingjelly",
    "snntorch": "tpp_plugin.adapters.snntorch",
}

#: neuron names every adapter's converter hook understands
NEURON_NAMES = ("tpp", "if")

_MISSING = object()
_ACTIVE: dict = {}
_WARNED: set = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _raw_attr(owner, name):
    # classes: take the raw __dict__ entry so staticmethod/classmethod wrappers survive a restore
    if isinstance(owner, type):
        return vars(owner).get(name, _MISSING)
    return getattr(owner, name, _MISSING)


class Patcher:
    """Records the attributes an adapter adds to or wraps on a framework, to undo them later."""

    def __init__(self, framework: str):
        self.framework = framework
        self._records: list = []

    def add(self, owner, name: str, value) -> bool:
        """Set ``owner.name = value`` unless the name is already taken by something else.

        :return: whether ``owner.name`` is now ``value``
        """
        current = getattr(owner, name, _MISSING)
        if current is value:
            return True
        if current is not _MISSING:
            _warn_once(
                f"tpp_plugin: {getattr(owner, '__name__', owner)}.{name} already exists and is not "
                "tpp_plugin's; leaving it alone"
            )
            return False
        setattr(owner, name, value)
        self._records.append((owner, name, _MISSING, value))
        return True

    def wrap(self, owner, name: str, make_wrapper):
        """Replace function ``owner.name`` by ``make_wrapper(original)`` (once; idempotent).

        :return: the installed wrapper
        """
        original = _raw_attr(owner, name)
        if original is _MISSING:
            raise AttributeError(f"{owner!r} has no attribute {name!r} to wrap")
        if getattr(original, "__tpp_plugin_wrapper__", False):
            return original
        wrapper = make_wrapper(original)
        functools.update_wrapper(wrapper, original)
        wrapper.__tpp_plugin_wrapper__ = True
        setattr(owner, name, wrapper)
        self._records.append((owner, name, original, wrapper))
        return wrapper

    def undo(self) -> None:
        """Restore everything this patcher changed, newest first.

        Only what is still the plugin's is restored: if something else was installed on top of
        a patched attribute after registration (a third-party wrapper, say), it is left in place
        and a ``RuntimeWarning`` says so (removing it would silently discard the other package's
        change; it may still call the plugin's wrapper, which keeps working).
        """
        while self._records:
            owner, name, original, installed = self._records.pop()
            current = _raw_attr(owner, name)
            if current is not installed:
                if current is not _MISSING:
                    warnings.warn(
                        f"tpp_plugin: {getattr(owner, '__name__', owner)}.{name} was replaced "
                        "after tpp_plugin patched it; leaving the newer value in place",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                continue
            if original is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, original)


def _installed(framework: str) -> bool:
    try:
        return importlib.util.find_spec(framework) is not None
    except (ImportError, ValueError):
        return False


def register(frameworks=None) -> tuple:
    """Register ``tpp_plugin`` into the installed frameworks (all known ones by default).

    Idempotent; frameworks that are not installed are skipped silently unless named explicitly.
    An adapter that fails to install is rolled back and reported with a warning, so
    ``import tpp_plugin`` never fails because of a framework.

    :return: the names of the frameworks now registered
    """
    explicit = frameworks is not None
    names = [frameworks] if isinstance(frameworks, str) else list(frameworks or ADAPTERS)
    for name in names:
        if name not in ADAPTERS:
            raise ValueError(f"unknown framework {name!r}; known: {sorted(ADAPTERS)}")
        if name in _ACTIVE:
            continue
        if not _installed(name):
            if explicit:
                raise ImportError(f"cannot register into {name}: it is not installed")
            continue
        patcher = Patcher(name)
        try:
            importlib.import_module(ADAPTERS[name]).install(patcher)
        except Exception as exc:  # never let a framework break `import tpp_plugin`
            patcher.undo()
            if explicit:
                raise
            _warn_once(f"tpp_plugin: could not register into {name}: {exc!r}")
            continue
        _ACTIVE[name] = patcher
    return registered()


def unregister(frameworks=None) -> None:
    """Undo :func:`register` for the given frameworks (all by default).

    :raises ValueError: for a name that is not a known framework (as :func:`register` does)
    """
    names = [frameworks] if isinstance(frameworks, str) else list(frameworks or list(_ACTIVE))
    for name in names:
        if name not in ADAPTERS:
            raise ValueError(f"unknown framework {name!r}; known: {sorted(ADAPTERS)}")
    for name in names:
        patcher = _ACTIVE.pop(name, None)
        if patcher is not None:
            patcher.undo()


def registered() -> tuple:
    """Names of the frameworks the plugin is currently registered into."""
    return tuple(_ACTIVE)


# ------------------------------------------------------------------------------------------------
# the converters' default neuron
# ------------------------------------------------------------------------------------------------
# (name, kwargs) while a default_neuron() block is active; a ContextVar, so that threads and
# asyncio tasks each see only their own block
_DEFAULT_NEURON: contextvars.ContextVar = contextvars.ContextVar(
    "tpp_plugin_default_neuron", default=None
)
# the CalibrationRequest of the active default_neuron(..., calibrate=...) block, or None
_DEFAULT_CALIBRATION: contextvars.ContextVar = contextvars.ContextVar(
    "tpp_plugin_default_calibration", default=None
)


def check_neuron_name(neuron) -> str:
    """Validate a neuron name (case-insensitive) and return it in lower case.

    :raises ValueError: for a name that is not one of :data:`NEURON_NAMES`
    """
    if not isinstance(neuron, str) or neuron.lower() not in NEURON_NAMES:
        raise ValueError(
            f"unknown neuron {neuron!r}: neuron must be one of {NEURON_NAMES} (in any case); "
            f"tpp_plugin's converters know {', '.join(NEURON_NAMES)}"
        )
    return neuron.lower()


@contextlib.contextmanager
def default_neuron(neuron: str, *, calibrate=None, **neuron_kwargs):
    """Make ``neuron`` the default neuron of the converters inside a ``with`` block.

    While the block runs, a converter called *without* ``neuron=`` (and without its own
    ``neuron_factory=``) builds ``neuron`` with ``neuron_kwargs``, exactly as if the call had said
    ``neuron=..., neuron_kwargs=...``: SpikingJelly 2.x ``ann2snn.RateCodingRecipe(loader)``,
    SpikingJelly 0.0.0.0.14 ``ann2snn.Converter(loader)`` and
    :func:`tpp_plugin.adapters.snntorch.convert`. An explicit ``neuron=`` still wins. The previous
    default (none: each framework's own) comes back when the block ends, also on an exception.
    The plugin must be registered (``import tpp_plugin`` does it) for SpikingJelly to see it.

    The choice is held in a :class:`contextvars.ContextVar`: other threads and asyncio tasks do
    not see it.

    :param neuron: ``'tpp'`` or ``'if'``
    :param calibrate: ``True`` or a dict of calibration options: every SpikingJelly threshold
        recipe the block switches (``RateCodingRecipe``, ``LocalThresholdBalancingRecipe``;
        0.0.0.0.14's ``Converter``) converts by the calibration for ``T`` instead, on its own
        data loader (as the recipe's ``calibrate=`` does: see docs/calibration.md, "The
        calibration switch"). ``T`` is the neurons' ``T`` (or the dict's ``T``; needed for
        ``'if'``); the dict's other keys are
        :func:`~tpp_plugin.calibration.calibrate_for_T` options, e.g. ``max_samples``,
        ``finetune_epochs``. A recipe it cannot replace raises, naming it
    :param neuron_kwargs: the neuron's arguments, e.g. ``count='exact'``, ``seed=0``, ``T=8``
        (SpikingJelly's single-step mode); with ``seed=s`` the ``i``-th neuron gets the ``i``-th
        seed of :func:`tpp_plugin.functional.spawn_seeds`
    :raises ValueError: for an unknown neuron name, or a ``calibrate`` without ``T`` or with a
        bad option value (``TypeError`` for an unknown option)
    :raises RuntimeError: if SpikingJelly is installed but the plugin is not registered into it
        (its converters would silently ignore the block)

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from tpp_plugin.adapters.snntorch import convert
        >>> ann = nn.Sequential(nn.Linear(3, 2), nn.ReLU())
        >>> _ = nn.init.constant_(ann[0].weight, 0.5)   # positive activations to calibrate on
        >>> with default_neuron('tpp', count='exact', seed=0):
        ...     snn = convert(ann, [torch.rand(8, 3)], num_steps=4)
        >>> type(snn[1]).__name__, snn[1].count
        ('TPP', 'exact')
    """
    name = check_neuron_name(neuron)
    if "seed" in neuron_kwargs and neuron_kwargs["seed"] is not None:
        check_seed_value(neuron_kwargs["seed"], "neuron_kwargs['seed']")
    if _installed("spikingjelly") and "spikingjelly" not in _ACTIVE:
        raise RuntimeError(
            "default_neuron: tpp_plugin is not registered into SpikingJelly, whose converters "
            "would silently keep their own neuron; call tpp_plugin.register('spikingjelly') first"
        )
    request = calibration_request(calibrate, name, neuron_kwargs, "default_neuron(calibrate=)")
    token = _DEFAULT_NEURON.set((name, dict(neuron_kwargs)))
    calibration_token = _DEFAULT_CALIBRATION.set(request)
    try:
        yield
    finally:
        _DEFAULT_CALIBRATION.reset(calibration_token)
        _DEFAULT_NEURON.reset(token)


def current_default_neuron() -> tuple | None:
    """The active :func:`default_neuron` as ``(name, kwargs)`` (a fresh copy of the kwargs), or
    ``None`` when the frameworks' own default neuron applies."""
    current = _DEFAULT_NEURON.get()
    if current is None:
        return None
    name, kwargs = current
    return name, dict(kwargs)


def current_default_calibration():
    """The :class:`~tpp_plugin.calibration.switch.CalibrationRequest` (``T``, ``options``) of
    the active ``default_neuron(..., calibrate=...)`` block, or ``None`` (no calibration: the
    recipes' own thresholds)."""
    return _DEFAULT_CALIBRATION.get()
