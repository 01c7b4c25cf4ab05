r"""QCFS activation: train ANNs that convert to TPP/IF networks with little loss at low T."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from . import functional as F
from .convert import named_modules_of_type, set_submodule

__all__ = ["QCFS", "replace_relu", "qcfs_levels"]


class QCFS(nn.Module):
    r"""Quantization-clip-floor-shift activation with a trainable clipping level λ.

    ``y = λ/L · clamp(floor(x·L/λ + ½), 0, L)`` (straight-through floor). Train an ANN with it,
    then convert each ``QCFS`` to a spiking neuron with threshold ``λ``: an exact-count TPP network
    run for ``T`` steps computes exactly this ANN with ``L = T``.

    :param L: quantization levels (the time steps the ANN is tuned for), ``>= 1``
    :param lam: initial clipping level λ (> 0)
    :param shift: the shift φ (``0.5``)
    :param trainable: whether λ is an ``nn.Parameter``

    Shape: any; output has the input's shape.

    Example::

        >>> act = QCFS(L=4, lam=2.0)
        >>> act(torch.tensor([-1.0, 0.3, 0.9, 5.0]))
        tensor([0.0000, 0.5000, 1.0000, 2.0000], grad_fn=<DivBackward0>)
    """

    def __init__(self, L: int = 4, lam: float = 1.0, shift: float = 0.5, trainable: bool = True):
        super().__init__()
        self.L = F.check_window(L, "L")
        F.check_threshold(lam, "lam")
        self.shift = float(shift)
        lam = torch.tensor(float(lam))
        if trainable:
            self.lam = nn.Parameter(lam)
        else:
            self.register_buffer("lam", lam)

    @property
    def threshold(self) -> float:
        """The spiking threshold this activation converts to (``λ``)."""
        return float(self.lam.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.qcfs(x, self.lam, self.L, self.shift)

    def extra_repr(self) -> str:
        return f"L={self.L}, lam={self.threshold:.4g}, shift={self.shift}"


def replace_relu(model: nn.Module, L: int = 4, lam: float = 1.0) -> nn.Module:
    """Replace every ``nn.ReLU`` module of ``model`` (in place) by a fresh :class:`QCFS`.

    :param model: the ANN; functional ``F.relu`` calls are not seen (use ``nn.ReLU`` modules)
    :param L: quantization levels
    :param lam: initial λ of every QCFS
    :return: ``model``

    Example::

        >>> net = replace_relu(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), L=8)
        >>> net[1]
        QCFS(L=8, lam=1, shift=0.5)
    """
    relus = list(named_modules_of_type(model, nn.ReLU))
    if not relus:
        raise ValueError("model has no nn.ReLU module to replace")
    for name, _ in relus:
        set_submodule(model, name, QCFS(L=L, lam=lam))
    return model


@contextlib.contextmanager
def qcfs_levels(model: nn.Module, L: int):
    """Temporarily set the levels of every :class:`QCFS` in ``model`` to ``L``.

    The ANN with ``L = T`` is what an exact-count TPP network computes in ``T`` steps::

        with qcfs_levels(ann, T):
            reference = ann(images)
    """
    L = F.check_window(L, "L")
    modules = [m for _, m in named_modules_of_type(model, QCFS)]
    saved = [m.L for m in modules]
    try:
        for m in modules:
            m.L = L
        yield model
    finally:
        for m, old in zip(modules, saved):
            m.L = old
