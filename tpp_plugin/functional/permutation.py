"""The temporal permutation ("misalignment") of spike trains, and its plain reference loop."""

from __future__ import annotations

import torch

from .checks import _check_generator, check_scope
from .firing import tpp_fire
from .uniforms import _UNIFORM_SCALE, UNIFORM_BITS, _draw_bits, _fill_words, _words

__all__ = [
    "permute_time",
    "permute_time_reference",
    "permutation_bits",
]


def _swap_indices(bits: torch.Tensor, i: int, out_f: torch.Tensor, out_j: torch.Tensor):
    """Fisher–Yates step ``i``: ``j = floor(r·(i+1) / 2¹⁶)``, uniform on ``0..i`` up to a relative
    error below ``(i+1)/2¹⁶`` (``r·(i+1)`` is exact in the float dtype chosen by the caller)."""
    torch.mul(bits, torch.tensor((i + 1) * _UNIFORM_SCALE, dtype=out_f.dtype), out=out_f)
    return out_j.copy_(out_f)  # truncation == floor for j >= 0


def _index_dtype(T: int) -> torch.dtype:
    return torch.float32 if T <= 256 else torch.float64  # r·T < 2²⁴: exact in float32


def permute_time_reference(x_seq: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    r"""Neuron-scope permutation written out plainly (one neuron at a time), for tests.

    Fisher–Yates from the back: for ``i = T−1, …, 1`` draw ``j = floor(r_i·(i+1)/2¹⁶)`` and swap
    slots ``i`` and ``j``.

    :param x_seq: ``[T, *shape]``
    :param bits: the 16-bit draws, ``[T−1, numel]`` (row ``k`` serves ``i = T−1−k``)
    :return: the permuted sequence
    """
    T = x_seq.shape[0]
    flat = x_seq.reshape(T, -1).clone()
    for col in range(flat.shape[1]):
        for k, i in enumerate(range(T - 1, 0, -1)):
            j = int(bits[k, col].item()) * (i + 1) >> UNIFORM_BITS
            flat[i, col], flat[j, col] = flat[j, col].clone(), flat[i, col].clone()
    return flat.view(x_seq.shape)


def permutation_bits(T: int, numel: int, device, generator=None) -> torch.Tensor:
    """The draws of a neuron-scope :func:`permute_time`, ``[T−1, numel]`` 16-bit integers, in the
    order it draws them (one ``⌈numel/4⌉``-word draw per swap step), for
    :func:`permute_time_reference`."""
    rows = [_draw_bits(numel, device, generator) for _ in range(T - 1)]
    return torch.stack(rows) if rows else torch.empty((0, numel), dtype=torch.uint16)


def _permute_neurons(x_seq: torch.Tensor, generator) -> torch.Tensor:
    """Independent Fisher–Yates shuffle of every neuron's train, in O(T) passes and no sort."""
    T = x_seq.shape[0]
    out = x_seq.clone(memory_format=torch.contiguous_format)
    flat = out.view(T, -1)
    n = flat.shape[1]
    if T == 1 or n == 0:
        return out
    words = torch.empty(_words(n), dtype=torch.int64, device=x_seq.device)
    j_f = torch.empty(n, dtype=_index_dtype(T), device=x_seq.device)
    j = torch.empty((1, n), dtype=torch.int64, device=x_seq.device)
    row_i = torch.empty((1, n), dtype=x_seq.dtype, device=x_seq.device)
    at_j = torch.empty((1, n), dtype=x_seq.dtype, device=x_seq.device)
    for i in range(T - 1, 0, -1):  # one window's draws per step: row k of the reference's bits
        bits = _fill_words(words, generator).view(torch.uint16)[:n]
        _swap_indices(bits, i, j_f, j.view(n))
        row_i.copy_(flat[i])
        torch.gather(flat, 0, j, out=at_j)
        flat.scatter_(0, j, row_i)
        flat[i].copy_(at_j[0])
    return out


def _is_spike_train(x_seq: torch.Tensor) -> bool:
    """``True`` if every value is 0 or 1 (what spiking neurons emit)."""
    return x_seq.is_floating_point() and not bool(((x_seq != 0) & (x_seq != 1)).any())


def permute_time(
    x_seq: torch.Tensor, scope: str = "neuron", generator: torch.Generator | None = None
) -> torch.Tensor:
    r"""Randomly rearrange spike trains along time (dim 0); every neuron keeps its count.

    ``scope='neuron'`` shuffles each neuron's train independently, in ``O(T)`` passes and no
    sort. A 0/1 spike train is redrawn as its count of spikes on a uniformly random subset of the
    ``T`` slots (:func:`tpp_fire` with ``count='exact'`` on the counts: the same distribution as a
    uniform shuffle); other values get a Fisher–Yates shuffle (``T − 1`` swaps, each from a
    16-bit draw; see :func:`permute_time_reference`). The other scopes draw one permutation per
    sample or layer.

    :param x_seq: spike trains (or any values), shape ``[T, N, ...]`` (``[T, ...]`` for
        ``scope='neuron'``/``'layer'``)
    :param scope: ``'neuron'`` — an independent permutation for every neuron (default);
        ``'sample'`` — one permutation per sample (dim 1); ``'layer'`` — one permutation for the
        whole tensor
    :param generator: optional ``torch.Generator``
    :return: permuted tensor, same shape and dtype as ``x_seq``

    Example::

        >>> s = torch.tensor([[1.], [1.], [0.], [0.]])
        >>> permute_time(s).sum(0)
        tensor([2.])
    """
    check_scope(scope)
    if not isinstance(x_seq, torch.Tensor):
        raise TypeError(f"x_seq must be a torch.Tensor, got {type(x_seq).__name__}")
    min_dim = 2 if scope == "sample" else 1
    if x_seq.dim() < min_dim:
        raise ValueError(
            f"x_seq must have at least {min_dim} dimension(s) ([T, N, ...]) for scope={scope!r}, "
            f"got shape {tuple(x_seq.shape)}"
        )
    _check_generator(generator, x_seq.device)
    T = x_seq.shape[0]
    if scope == "neuron":
        if _is_spike_train(x_seq):
            # a uniformly shuffled 0/1 train is its k spikes on a uniform k-subset of the T slots:
            # exactly what an exact-count TPP neuron fires from k, in three ops per step
            return tpp_fire(x_seq.sum(0), T, 1.0, "exact", generator)
        return _permute_neurons(x_seq, generator)
    if scope == "layer":
        perm = torch.randperm(T, generator=generator, device=x_seq.device)
        return x_seq[perm]
    keys = torch.rand(x_seq.shape[:2], generator=generator, device=x_seq.device)
    order = keys.argsort(dim=0)
    order = order.view(*order.shape, *([1] * (x_seq.dim() - 2))).expand_as(x_seq)
    return x_seq.gather(0, order)
