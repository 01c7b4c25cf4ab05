"""Validators of the TPP math: count rules, scopes, windows, thresholds, tensors, seeds and
generators, each raising a clear ``TypeError``/``ValueError``."""

from __future__ import annotations

import math
from numbers import Integral, Real

import torch

__all__ = [
    "COUNT_MODES",
    "PERMUTATION_SCOPES",
    "check_count",
    "check_scope",
    "check_window",
    "check_threshold",
    "check_tensor",
    "check_sequence",
    "check_positive",
    "check_seed",
    "check_seed_value",
    "check_window_sum",
    "check_broadcast",
    "SEED_LIMIT",
]


COUNT_MODES = ("bernoulli", "exact", "unbiased")
PERMUTATION_SCOPES = ("neuron", "sample", "layer")


def check_count(count: str) -> str:
    """Return ``count`` if it is one of :data:`COUNT_MODES`, else raise ``ValueError``."""
    if count not in COUNT_MODES:
        raise ValueError(f"count must be one of {COUNT_MODES}, got {count!r}")
    return count


def check_scope(scope: str) -> str:
    """Return ``scope`` if it is one of :data:`PERMUTATION_SCOPES`, else raise ``ValueError``."""
    if scope not in PERMUTATION_SCOPES:
        raise ValueError(f"scope must be one of {PERMUTATION_SCOPES}, got {scope!r}")
    return scope


def check_window(T, name: str = "T") -> int:
    """Return the window length ``T`` as an ``int`` ≥ 1, else raise ``TypeError``/``ValueError``."""
    if isinstance(T, bool) or not isinstance(T, Integral):
        raise TypeError(f"{name} must be an integer number of time steps, got {T!r}")
    if T < 1:
        raise ValueError(f"{name} must be >= 1, got {T}")
    return int(T)


def check_threshold(threshold, name: str = "threshold", shape=None):
    """Return a valid threshold: a finite positive number, or a tensor of them.

    :param shape: if given, a tensor threshold must broadcast to this shape without enlarging it
    :raises TypeError: if ``threshold`` is neither a real number nor a floating tensor
    :raises ValueError: if any threshold is not finite or not positive, lives on the meta
        device, or does not broadcast to ``shape``

    Example::

        >>> check_threshold(0.5)
        0.5
        >>> check_threshold(-1.0)
        Traceback (most recent call last):
        ...
        ValueError: threshold must be a finite number > 0, got -1.0
    """
    if isinstance(threshold, torch.Tensor):
        if not threshold.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got dtype {threshold.dtype}")
        _check_not_meta(threshold, name)
        if shape is not None:
            check_broadcast(threshold, shape, name)
        if not bool(torch.isfinite(threshold).all()) or bool((threshold <= 0).any()):
            raise ValueError(f"{name} must be finite and > 0 everywhere")
        return threshold
    return check_positive(threshold, name)


def check_positive(value, name: str, *, noun: str = "number", unit: str = "") -> float:
    """``value`` as a ``float`` if it is a finite real number > 0 (a bool is not a number).

    :param noun: what the value is, for the messages (``'number'``, ``'energy'``)
    :param unit: its unit, for the messages (``'pJ'``)
    :raises TypeError: naming ``name`` and the type, for anything but a real number
    :raises ValueError: naming ``name`` and the value, for NaN, ±inf and values <= 0

    Example::

        >>> check_positive(4.6, "e_mac", noun="energy", unit="pJ")
        4.6
        >>> check_positive(0, "e_mac", noun="energy", unit="pJ")
        Traceback (most recent call last):
        ...
        ValueError: e_mac must be a finite energy > 0 pJ, got 0.0
    """
    if isinstance(value, bool) or not isinstance(value, Real):
        unit_text = f" in {unit}" if unit else ""
        raise TypeError(f"{name} must be a positive {noun}{unit_text}, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite {noun} > 0{' ' + unit if unit else ''}, "
                         f"got {value}")
    return value


def _check_not_meta(x: torch.Tensor, name: str) -> None:
    if x.device.type == "meta":
        raise ValueError(
            f"{name} is on the meta device and holds no values; materialize it first (e.g. "
            "module.to_empty(device='cpu') and load the weights, or .to('cpu'))"
        )


def check_broadcast(tensor: torch.Tensor, shape, name: str = "threshold") -> None:
    """Check that ``tensor`` broadcasts to ``shape`` without enlarging it.

    :raises ValueError: naming ``name``, both shapes and the rule, if it does not

    Example::

        >>> check_broadcast(torch.ones(3), (2, 3))
        >>> check_broadcast(torch.ones(2), (2, 3))
        Traceback (most recent call last):
        ...
        ValueError: threshold of shape (2,) does not broadcast to the input's shape (2, 3) ...
    """
    shape = tuple(shape)
    try:
        ok = tuple(torch.broadcast_shapes(tuple(tensor.shape), shape)) == shape
    except RuntimeError:
        ok = False
    if not ok:
        hint = f"{shape[-1:]} or {(*shape[:-1], 1)}" if shape else "()"
        raise ValueError(
            f"{name} of shape {tuple(tensor.shape)} does not broadcast to the input's shape "
            f"{shape} (it must broadcast without enlarging the input, e.g. shape {hint})"
        )


def check_tensor(x, name: str, min_dim: int = 0, finite: bool = True) -> torch.Tensor:
    """Check that ``x`` is a floating tensor with at least ``min_dim`` dimensions (and finite).

    :raises TypeError: if ``x`` is not a floating-point tensor
    :raises ValueError: if ``x`` has too few dimensions or non-finite entries
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    _check_not_meta(x, name)
    if x.dim() < min_dim:
        raise ValueError(
            f"{name} must have at least {min_dim} dimension(s), got shape {tuple(x.shape)}"
        )
    # a NaN or ±inf entry makes the sum non-finite: one read-only pass, no [x.shape] temporary;
    # only a sum that overflows needs the element-wise check
    if finite and x.numel() and not bool(torch.isfinite(x.sum())):
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} contains NaN or infinite values")
    return x


def check_sequence(x_seq, name: str = "x_seq", window: int | None = None, *, min_dim: int = 2,
                   finite: bool = True, window_name: str = "T") -> int:
    """Check a sequence ``[k·T, N, ...]`` (time first): a floating tensor (finite, unless
    ``finite=False``) with a non-empty time dimension whose length is a multiple of ``window``.

    :param window: the window length ``T`` (``None``: the whole sequence is one window)
    :param window_name: what the framework calls the window (``T``, ``num_steps``)
    :return: the window length
    :raises ValueError: for an empty time dimension, or a length that is not a multiple of the
        window, naming ``name``

    Example::

        >>> check_sequence(torch.zeros(8, 2), window=4)
        4
        >>> check_sequence(torch.zeros(6, 2), window=4)
        Traceback (most recent call last):
        ...
        ValueError: x_seq has 6 time steps, which is not a multiple of the window T=4
    """
    check_tensor(x_seq, name, min_dim=min_dim, finite=finite)
    steps = x_seq.shape[0]
    if steps == 0:
        raise ValueError(
            f"{name} has an empty time dimension (shape {tuple(x_seq.shape)}); a sequence needs "
            "[T, N, ...] with T >= 1"
        )
    T = window or steps
    if steps % T:
        raise ValueError(
            f"{name} has {steps} time steps, which is not a multiple of the window "
            f"{window_name}={T}"
        )
    return T


def check_seed(seed, generator) -> None:
    """Check a module's randomness arguments: an ``int`` seed or a ``torch.Generator``, not both.

    :raises ValueError: if both are given
    :raises TypeError: if ``seed`` is not an int or ``generator`` not a ``torch.Generator``
    """
    if seed is not None and generator is not None:
        raise ValueError("pass either seed or generator, not both")
    if seed is not None:
        check_seed_value(seed)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")


#: seeds are integers in ``[0, SEED_LIMIT)`` (what ``torch.Generator.manual_seed`` accepts)
SEED_LIMIT = 2**64


def check_seed_value(seed, name: str = "seed") -> int:
    """Return ``seed`` as an ``int`` in ``[0, 2**64)``, else raise.

    :raises TypeError: if ``seed`` is not an integer (``bool``, ``float``, ``str``, ``None``)
    :raises ValueError: if it is negative or ``>= 2**64``

    Example::

        >>> check_seed_value(7)
        7
        >>> check_seed_value(1.5)
        Traceback (most recent call last):
        ...
        TypeError: seed must be an int in [0, 2**64), got float 1.5
    """
    if isinstance(seed, bool) or not isinstance(seed, Integral):
        raise TypeError(f"{name} must be an int in [0, 2**64), got {type(seed).__name__} {seed!r}")
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"{name} must be an int in [0, 2**64), got {seed}")
    return int(seed)


def _check_generator(generator, device: torch.device, name: str = "generator"):
    if generator is None:
        return None
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"{name} must be a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != device.type:
        raise ValueError(
            f"{name} lives on {generator.device.type!r} but the tensor is on {device.type!r}; "
            f"create the generator with torch.Generator(device={device.type!r})"
        )
    return generator


def check_window_sum(v: torch.Tensor, dtype=None, name: str = "x_seq") -> torch.Tensor:
    """Raise a clear error if a window sum of finite inputs overflowed its dtype.

    :param v: the window sum (membrane potential)
    :param dtype: dtype of the inputs (for the message; defaults to ``v``'s)
    :param name: the input that was summed
    :raises ValueError: naming ``name``, the dtype and its largest finite value

    Example::

        >>> check_window_sum(torch.tensor([65504.0]).half() * 2, torch.float16)
        Traceback (most recent call last):
        ...
        ValueError: the window sum of x_seq overflows torch.float16 ...
    """
    if v.numel() and not bool(torch.isfinite(v.sum())) and not bool(torch.isfinite(v).all()):
        dtype = v.dtype if dtype is None else dtype
        raise ValueError(
            f"the window sum of {name} overflows {dtype} (largest finite value "
            f"{torch.finfo(dtype).max:g}); feed {name} in a wider dtype (e.g. float32) or "
            "scale it down together with the threshold"
        )
    return v


def _check_fire_args(v, T, threshold, count):
    check_tensor(v, "v", finite=False)
    if v.numel() and not bool(torch.isfinite(v.sum())) and not bool(torch.isfinite(v).all()):
        raise ValueError(
            f"v (the membrane potential) contains NaN or infinite values; if the inputs were "
            f"finite, their window sum overflowed {v.dtype} (largest finite value "
            f"{torch.finfo(v.dtype).max:g}): feed a wider dtype or scale the input down together "
            "with the threshold"
        )
    T = check_window(T)
    return T, check_threshold(threshold, shape=v.shape), check_count(count)
