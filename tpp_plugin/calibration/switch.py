r"""The calibration switch of the converters: ``calibrate=`` of SpikingJelly's threshold recipes
(after ``import tpp_plugin``), of :func:`tpp_plugin.default_neuron` and ``python -m tpp_plugin
run --calibrate``. :func:`calibration_request` checks what it is given and answers with a
:class:`CalibrationRequest`: the ``T`` to calibrate for and the options of
:func:`~tpp_plugin.calibration.calibrate_for_T`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import functional as F
from .options import options_from

__all__ = ["CalibrationRequest", "calibration_request"]


@dataclass(frozen=True)
class CalibrationRequest:
    """A threshold recipe's conversion, to be done by the calibration for ``T``.

    :ivar T: the number of time steps to calibrate for
    :ivar options: keyword arguments of :func:`~tpp_plugin.calibration.calibrate_for_T` (not
        ``fuse``: the recipe's ``fuse_flag`` decides)
    :ivar replaced: the names of the recipes replaced under this request so far (the adapters
        append; ``run --calibrate`` says so when a script made no such conversion)
    """

    T: int
    options: dict = field(default_factory=dict)
    replaced: list = field(default_factory=list, repr=False, compare=False)


def calibration_request(calibrate, neuron, neuron_kwargs=None,
                        where: str = "calibrate") -> CalibrationRequest | None:
    """Check a ``calibrate=`` value and resolve its ``T``.

    :param calibrate: ``None``/``False`` (no calibration), ``True`` (the calibration's
        defaults) or a dict of :func:`~tpp_plugin.calibration.calibrate_for_T` options, which may
        hold ``T``
    :param neuron: the neuron the conversion builds (``'tpp'``, ``'if'`` or a class)
    :param neuron_kwargs: its arguments; a TPP neuron's ``T`` is the ``T`` calibrated for
    :param where: how the caller names the switch, for the messages
    :return: a :class:`CalibrationRequest`, or ``None`` for no calibration
    :raises TypeError: for a ``calibrate`` that is neither a bool nor a dict, an unknown option,
        or ``fuse`` (the recipe's ``fuse_flag`` decides)
    :raises ValueError: for a bad option value, no ``T`` anywhere, or two different ``T``

    Example::

        >>> calibration_request({'max_samples': 256}, 'tpp', {'T': 4, 'count': 'exact'})
        CalibrationRequest(T=4, options={'max_samples': 256})
        >>> calibration_request(True, 'if', {})
        Traceback (most recent call last):
        ...
        ValueError: calibrate: the calibration for T needs the number of time steps ...
    """
    if calibrate is None or calibrate is False:
        return None
    if calibrate is True:
        options = {}
    elif isinstance(calibrate, dict):
        options = dict(calibrate)
    else:
        raise TypeError(f"{where} must be True, False or a dict of calibration options "
                        f"(calibrate_for_T's keyword arguments), got {calibrate!r}")
    if "fuse" in options:
        raise TypeError(f"{where}: 'fuse' is not a calibration option here: the recipe's "
                        "fuse_flag decides whether conv-BN pairs are fused")
    asked = options.pop("T", None)
    is_if = isinstance(neuron, str) and neuron.lower() == "if"
    neuron_T = None if is_if else (neuron_kwargs or {}).get("T")
    if asked is not None and neuron_T is not None and asked != neuron_T:
        raise ValueError(f"{where}: T={asked!r} contradicts the neurons' T={neuron_T!r}; the "
                         "calibration is for the T the neurons run (give one of them)")
    T = asked if asked is not None else neuron_T
    if T is None:
        hint = ("T in the calibration options (e.g. --calibrate T=8, calibrate={'T': 8})"
                if is_if else
                "the neurons' T (e.g. --neuron-kwargs T=8, neuron_kwargs={'T': 8})")
        raise ValueError(f"{where}: the calibration for T needs the number of time steps the "
                         f"network will run: give {hint}")
    T = F.check_window(T, f"{where}: T")
    options_from(None, options, caller=where)  # unknown names and bad values fail here
    return CalibrationRequest(T, options)
