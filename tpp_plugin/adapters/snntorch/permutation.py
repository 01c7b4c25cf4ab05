r"""snnTorch's temporal permutation layer, :class:`TemporalPermutation`
(``snn.TemporalPermutation`` once registered)."""

from __future__ import annotations

import torch
from torch import nn

from ... import functional as F
from ...engine import RandomStream, Seeded

__all__ = ["TemporalPermutation"]


class TemporalPermutation(Seeded, nn.Module):
    r"""Randomly rearrange each spike train along time; every neuron keeps its spike count.

    Placed after IF neurons this is the paper's "temporal misalignment" experiment. Works on
    whole sequences only (it needs the full window).

    Example::

        >>> perm = TemporalPermutation(scope='neuron', seed=0)
        >>> spk_seq = torch.tensor([[1.], [1.], [0.], [0.]])   # [T, N]
        >>> perm(spk_seq).sum(0)
        tensor([2.])

    :param scope: ``'neuron'`` — an independent permutation per neuron (default); ``'sample'`` —
        one per sample (dim 1); ``'layer'`` — one for the whole tensor
    :type scope: str, optional
    :param seed: seed of the module's own random streams (one per device). Defaults to None
    :type seed: int, optional
    :param generator: a ``torch.Generator`` to draw from instead. Defaults to None
    :type generator: torch.Generator, optional

    Inputs: x_seq
        - **x_seq** of shape `(T, batch, ...)`: spike trains (or any values).

    Outputs: out
        - **out** of the same shape: ``x_seq`` permuted along dim 0.
    """

    def __init__(self, scope: str = "neuron", seed: int | None = None, generator=None):
        F.check_scope(scope)
        stream = RandomStream(seed, generator)
        super().__init__()
        self.scope = scope
        self.random_stream = stream

    # -- the contract (tpp_plugin.contract.TPPLayer) -------------------------------------------
    #: the window is the whole sequence it is given
    window_length = None
    sequence_mode = True
    spike_scale = 1.0

    @property
    def generator(self) -> torch.Generator | None:
        """The ``torch.Generator`` given at construction (``None`` for a seed or torch's global
        generator)."""
        return self.random_stream.generator

    def count_forward(self, x: torch.Tensor, T: int, bernoulli: str) -> torch.Tensor:
        """Count-domain forward: a permutation keeps every count (and draws nothing)."""
        return x

    def forward(self, x_seq):
        # floating, finite, [T, ...] with T >= 1: the same inputs SpikingJelly's version accepts
        F.check_sequence(x_seq, "x_seq", min_dim=2 if self.scope == "sample" else 1)
        return F.permute_time(x_seq, self.scope, self.random_stream.generator_for(x_seq.device))

    def extra_repr(self) -> str:
        return f"scope={self.scope!r}"
