"""The random numbers of the TPP math: 16-bit uniforms, four per 64-bit draw of the generator.

Every random number of :mod:`tpp_plugin.functional` is drawn here, so equal draws give equal
spikes whatever consumes them."""

from __future__ import annotations

import math

import torch

from .checks import check_window

__all__ = [
    "UNIFORM_BITS",
    "window_uniforms",
]


def _random_dtype(dtype: torch.dtype) -> torch.dtype:
    # half-precision uniforms have only 11 bits: draw in float32 to keep probabilities honest
    return torch.float64 if dtype == torch.float64 else torch.float32


#: bits per uniform: u = r / 2**16 with r a random 16-bit integer
UNIFORM_BITS = 16
_UNIFORM_SCALE = 2.0**-UNIFORM_BITS


def _words(numel: int) -> int:
    return (numel + 3) // 4  # 64-bit words holding ``numel`` 16-bit draws


def _fill_words(words: torch.Tensor, generator) -> torch.Tensor:
    # full 64-bit range: all four 16-bit lanes of each word are uniform
    return words.random_(-(2**63), None, generator=generator)


def _draw_bits(numel: int, device, generator=None) -> torch.Tensor:
    """``numel`` random 16-bit integers (``torch.uint16``, flat) from ``⌈numel/4⌉`` 64-bit draws.

    This fixes how every random number of this module is drawn: the generator advances by the
    same amount whatever consumes the bits, so equal draws give equal spikes.
    """
    words = torch.empty(_words(numel), dtype=torch.int64, device=device)
    return _fill_words(words, generator).view(torch.uint16)[:numel]


def _step_draws(T: int, n: int, device, generator):
    """Yield the ``T`` rows ``[n]`` of :func:`_draw_bits` ``(T·n)`` one step at a time.

    On the CPU the generator hands out 64-bit words one after another, so drawing the words of
    each step separately gives the same numbers (when a step is a whole number of words) without
    a ``[T, n]`` buffer; other devices draw the window at once.
    """
    if torch.device(device).type == "cpu" and n % 4 == 0:
        words = torch.empty(n // 4, dtype=torch.int64)
        for _ in range(T):
            yield _fill_words(words, generator).view(torch.uint16)
    else:
        yield from _draw_bits(T * n, device, generator).view(T, n)


def window_uniforms(shape, T: int, device, dtype=torch.float32, generator=None) -> torch.Tensor:
    """Draw the uniforms of one firing window, ``[T, *shape]`` in ``[0, 1)``.

    Each uniform is ``r / 2**16`` for a random 16-bit integer ``r`` (:data:`UNIFORM_BITS`; four
    per 64-bit draw, so a window costs ``⌈T·numel/4⌉`` draws of the generator). This is the one
    place randomness is drawn for :func:`tpp_fire`: a module that streams a window step by step
    calls :func:`tpp_fire` (or this function) once at the window boundary and so reproduces it
    bit for bit.

    :param shape: shape of one step, ``[*shape]``
    :param T: window length
    :param device: device of the uniforms
    :param dtype: dtype of the potential; the uniforms are ``float64`` for ``float64`` and
        ``float32`` otherwise
    :param generator: optional ``torch.Generator`` on ``device``
    :return: uniforms, shape ``[T, *shape]``

    Example::

        >>> u = window_uniforms((3,), 4, 'cpu', generator=torch.Generator().manual_seed(0))
        >>> u.shape, bool((u * 2**16 == (u * 2**16).floor()).all())
        (torch.Size([4, 3]), True)
    """
    T = check_window(T)
    shape = tuple(shape)
    bits = _draw_bits(T * math.prod(shape), device, generator)
    return bits.to(_random_dtype(dtype)).mul_(_UNIFORM_SCALE).view(T, *shape)


def _rounding_uniforms(n: int, device, generator, rdtype) -> torch.Tensor:
    """The ``n`` uniforms of ``count='unbiased'``'s rounding, drawn before the window's ``T``
    step uniforms (so :func:`tpp_count` and :func:`tpp_fire` draw in the same order)."""
    return _draw_bits(n, device, generator).to(rdtype).mul_(_UNIFORM_SCALE)
