"""The quantization-clip-floor-shift (QCFS) activation the TPP neuron converts exactly."""

from __future__ import annotations

import torch

from .checks import _check_not_meta, check_tensor, check_threshold, check_window

__all__ = [
    "qcfs",
]


def qcfs(x: torch.Tensor, lam, L: int, shift: float = 0.5) -> torch.Tensor:
    r"""Quantization-clip-floor-shift activation (Bu et al., ICLR 2022).

    ``qcfs(x) = λ/L · floor(clamp(x/λ, 0, 1)·L + shift)`` (``= λ/L · clamp(floor(x·L/λ + ½), 0, L)``
    for ``shift = ½``), with a straight-through gradient for
    the floor (so ``λ`` and the input are trainable). With ``L = T`` and ``shift = ½`` it is
    exactly what an exact-count TPP neuron with threshold ``λ`` computes over ``T`` steps.

    :param x: pre-activation, any shape
    :param lam: clipping level λ (> 0), a number or a tensor (e.g. a trainable parameter)
    :param L: number of quantization levels, ``>= 1``
    :param shift: the shift φ (``0.5`` is the QCFS paper's choice)
    :return: quantized activation, same shape as ``x``
    """
    check_tensor(x, "x", finite=False)
    L = check_window(L, "L")
    if isinstance(lam, torch.Tensor):
        if not lam.is_floating_point():
            raise TypeError(f"lam must be a number or a floating tensor, got dtype {lam.dtype}")
        _check_not_meta(lam, "lam")
        if not bool(torch.isfinite(lam).all()) or bool((lam <= 0).any()):
            raise ValueError("lam (the clipping level λ) must be finite and > 0 everywhere")
    else:
        check_threshold(lam, "lam")
    # clip before the floor (as QCFS does) so the straight-through gradient reaches all of (0, λ)
    z = (x / lam).clamp(0, 1) * L + shift
    z = z + (torch.floor(z) - z).detach()
    return z * lam / L
