r"""Checks and conventions every snnTorch module of the plugin shares."""

from __future__ import annotations

import math
from numbers import Real

import torch

from ... import functional as F
from ...kernels import cupy as kernels

__all__ = ["check_mem_argument", "returns", "refuse_surrogate", "check_graded_spikes_factor",
           "BACKENDS", "check_backend"]


def check_mem_argument(neuron, mem) -> None:
    """snnTorch's rule for an explicit ``mem`` argument; a sequence always starts afresh."""
    if mem is None:
        return
    if neuron.init_hidden:
        raise TypeError("`mem` should not be passed as an argument while `init_hidden=True`")
    if neuron.sequence:
        raise TypeError("`mem` cannot be passed in sequence mode: every sequence starts afresh")


def returns(neuron, spk, mem):
    """snnTorch's return convention: ``(spk, mem)``, or ``spk`` alone with ``init_hidden``."""
    if neuron.output or not neuron.init_hidden:
        return spk, mem
    return spk


def refuse_surrogate(spike_grad, surrogate_disable) -> None:
    """TPP fires at random from a whole window: there is no surrogate gradient to select."""
    if spike_grad is not None or surrogate_disable is False:
        what = "spike_grad" if spike_grad is not None else "surrogate_disable=False"
        raise TypeError(
            f"TPP does not take {what}: it is an inference neuron for converted networks, with no "
            "surrogate gradient (its spikes are drawn at random from a whole window's potential); "
            "train the ANN (e.g. with tpp_plugin.QCFS) and convert it, or use snn.Leaky to train"
        )


def check_graded_spikes_factor(factor) -> None:
    """A finite number or a finite floating tensor (spikes are multiplied by it)."""
    if isinstance(factor, torch.Tensor):
        F.check_tensor(factor, "graded_spikes_factor")
        return
    if isinstance(factor, bool) or not isinstance(factor, Real):
        raise TypeError(
            f"graded_spikes_factor must be a finite number or tensor, got {type(factor).__name__}"
        )
    if not math.isfinite(factor):
        raise ValueError(f"graded_spikes_factor must be finite, got {factor}")


#: implementations of the TPP neuron's firing phase (as SpikingJelly's ``TPPNode.backend``)
BACKENDS = ("torch", "cupy")


def check_backend(backend) -> str:
    """``'torch'`` or ``'cupy'``; ``'cupy'`` needs CuPy and NVRTC (checked now, with the install
    command in the error)."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "cupy":
        kernels.load_nvrtc()  # ImportError with the install command if CuPy/NVRTC is missing
    return backend

