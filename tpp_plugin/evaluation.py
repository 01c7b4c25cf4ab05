r"""Accuracy and spike statistics of a converted network over a data set, in one process or many.

:func:`evaluate` (re-exported as :func:`tpp_plugin.evaluate`) runs the full simulation or the
count domain; under ``torchrun`` every rank evaluates its shard of the data set
(:class:`~tpp_plugin.distributed.ShardSampler`) and the counts are all-reduced — see
:mod:`tpp_plugin.distributed` and ``docs/distributed.md``.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from . import contract, count_domain
from .distributed import (
    ShardSampler,
    all_reduce_sum,
    check_process_group,
    rank_seed,
    world,
)
from .functional import check_seed_value, check_window
from .state import reseed
from .state import reset as reset_net
from .stats import E_AC_PJ, E_MAC_PJ, SpikeStats, check_energy_constant

__all__ = ["evaluate"]


def _is_batch_list(data) -> bool:
    """A list or tuple of ``(x, y)`` batches: every item a pair of tensors whose labels ``y``
    have a batch dimension (a data set's samples carry one label each)."""
    return isinstance(data, (list, tuple)) and len(data) > 0 and all(
        isinstance(b, (list, tuple)) and len(b) == 2
        and all(isinstance(t, torch.Tensor) for t in b) and b[1].dim() >= 1
        and len(b[0]) == len(b[1]) for b in data)


def _check_net(net, T):
    """The window to evaluate: ``T``, which must be the TPP layers' window where they fix one
    (their window by default); a ``ValueError`` for a network without a spiking neuron."""
    if not isinstance(net, nn.Module):
        raise TypeError(f"net must be a converted network (an nn.Module), got "
                        f"{type(net).__name__}")
    spiking = contract.types_of("spiking")
    if not any(isinstance(m, spiking) or isinstance(m, contract.TPPLayer)
               for m in net.modules()):
        raise ValueError(
            f"net: {type(net).__name__} has no spiking neuron (TPP, IF, ...): evaluate runs a "
            "converted SNN for T steps; convert the ANN first (its own accuracy needs no T)")
    windows = sorted({contract.window_of(m) for m in contract.tpp_layers(net)} - {None})
    if T is None:
        if len(windows) != 1:
            why = f"its TPP layers' windows differ: {windows}" if windows else (
                "its layers do not fix a window")
            raise ValueError(f"T: pass the number of time steps ({why})")
        return windows[0]
    T = check_window(T)
    if any(w != T for w in windows):
        hint = f"; pass T={windows[0]}" if len(windows) == 1 else ""
        raise ValueError(
            f"T={T} differs from the window of the network's TPP layers "
            f"({', '.join(map(str, windows))}): they would run T={T} steps as other windows, "
            f"not one window of {T}{hint}")
    return T


def _check_options(count_mode, bernoulli, seed, batch_size) -> None:
    if not isinstance(count_mode, bool):
        raise TypeError(f"count_mode must be True or False, got {count_mode!r}")
    if bernoulli not in count_domain.BERNOULLI_SAMPLERS:
        raise ValueError(f"bernoulli must be one of {count_domain.BERNOULLI_SAMPLERS}, got "
                         f"{bernoulli!r}")
    if seed is not None:
        check_seed_value(seed, "seed")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int):
        raise TypeError(f"batch_size must be a positive integer, got {batch_size!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")


def _check_pair(data, what: str) -> None:
    """An ``(x, y)`` pair: as many labels as inputs, labels one class index per sample."""
    x, y = data
    if y.dim() != 1:
        hint = " (one-hot labels? pass y.argmax(1))" if y.dim() == 2 else ""
        raise ValueError(f"data: {what} has labels of shape {tuple(y.shape)}: labels are class "
                         f"indices of shape [N]{hint}")
    if x.dim() == 0 or len(x) != len(y):
        raise ValueError(f"data: {what} has {len(x) if x.dim() else 0} inputs (shape "
                         f"{tuple(x.shape)}) but {len(y)} labels")


def _batch(batch, i: int) -> tuple:
    """``(x, y)`` of batch ``i``, checked."""
    if isinstance(batch, dict):
        raise TypeError(f"data: batch {i} is a dict with keys {sorted(map(str, batch))}: "
                        "evaluate takes (x, y) samples or batches; map the data set to pairs")
    if isinstance(batch, torch.Tensor) or not (isinstance(batch, (list, tuple))
                                                and len(batch) == 2):
        what = (f"a tensor of shape {tuple(batch.shape)}" if isinstance(batch, torch.Tensor)
                else f"a {type(batch).__name__}"
                + (f" of {len(batch)} items" if isinstance(batch, (list, tuple)) else ""))
        raise TypeError(f"data: batch {i} is {what}, not an (x, y) pair: evaluate needs labels")
    if not all(isinstance(t, torch.Tensor) for t in batch):
        raise TypeError(f"data: batch {i} must be a pair of tensors (x, y), got "
                        f"({type(batch[0]).__name__}, {type(batch[1]).__name__})")
    _check_pair(batch, f"batch {i}")
    return batch[0], batch[1]


def _loader(data, batch_size: int, group) -> tuple:
    """A loader over this rank's shard of ``data``, and the data set's size."""
    rank, size = world(group)
    if isinstance(data, (torch.Tensor, dict, str, bytes)) or data is None:
        what = (f"a tensor of shape {tuple(data.shape)} (no labels)"
                if isinstance(data, torch.Tensor) else type(data).__name__)
        raise TypeError(f"data must be a Dataset, a DataLoader, an (x, y) pair or (x, y) "
                        f"batches, got {what}")
    if (isinstance(data, list) and data and all(isinstance(t, torch.Tensor) for t in data)):
        raise TypeError(f"data: a list of {len(data)} tensors (inputs without labels); evaluate "
                        "takes (x, y) batches or samples")
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, torch.Tensor)
                                                           for t in data):
        _check_pair(data, "the (x, y) pair")
        data = TensorDataset(*data)
    elif _is_batch_list(data):  # a list of (x, y) batches is not a data set of samples
        data = TensorDataset(torch.cat([b[0] for b in data]), torch.cat([b[1] for b in data]))
    if isinstance(data, DataLoader):
        dataset, batch_size = data.dataset, data.batch_size or batch_size
        options = dict(num_workers=data.num_workers, collate_fn=data.collate_fn,
                       pin_memory=data.pin_memory)
    elif isinstance(data, Dataset) or (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
        dataset, options = data, {}
    elif not hasattr(data, "__iter__"):
        raise TypeError(f"data must be a Dataset, a DataLoader, an (x, y) pair or (x, y) "
                        f"batches, got {type(data).__name__}")
    else:
        if size > 1:
            raise TypeError(
                "evaluate: to shard the test set over processes pass a Dataset, a DataLoader or "
                f"an (x, y) pair of tensors, not {type(data).__name__}"
            )
        return data, None
    if len(dataset) == 0:
        raise ValueError(f"data: the data set is empty ({type(dataset).__name__} of 0 samples)")
    sampler = ShardSampler(dataset, size, rank)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, **options), len(dataset)


@contextlib.contextmanager
def _multi_step(net: nn.Module):
    """SpikingJelly step modules in multi-step mode for the duration (restored after)."""
    saved = [(m, m.step_mode) for m in net.modules() if getattr(m, "step_mode", None) in ("s", "m")]
    for module, _ in saved:
        module.step_mode = "m"
    try:
        yield
    finally:
        for module, mode in saved:
            module.step_mode = mode


def evaluate(net: nn.Module, data, T: int | None = None, *, count_mode: bool = False,
             bernoulli: str = "one-draw", seed: int | None = None, batch_size: int = 256,
             stats: bool = False, e_ac: float | None = None, e_mac: float | None = None,
             device=None, group=None) -> dict:
    r"""Test accuracy of a converted network over a data set, in one process or many.

    Each image is fed as a constant input for ``T`` steps: the full simulation runs
    ``net(x.expand(T, ...)).mean(0)`` in multi-step / sequence mode (SpikingJelly networks are
    switched to multi-step for the call; the state is reset before every batch); with
    ``count_mode=True`` it runs ``net(x)`` under :func:`tpp_plugin.count_mode`.

    Under ``torchrun`` (a process group exists, see
    :func:`~tpp_plugin.distributed.init_distributed`) every rank evaluates its shard
    (:class:`~tpp_plugin.distributed.ShardSampler`: each image exactly once, also when the world
    size does not divide the set) and the counts — correct predictions, images, and with
    ``stats=True`` the spike statistics — are all-reduced, so every rank returns the totals of
    the whole set. With ``seed`` the random modules of rank ``r`` are reseeded from
    :func:`~tpp_plugin.distributed.rank_seed` ``(seed, r)`` (``seed`` on rank 0), so a run
    repeats for a given world size. The predictions do not depend on how the set is split;
    float32 spike counts may, in the few neurons whose potential sits within rounding of a
    firing boundary (the kernels sum in an order that depends on the batch and thread count).

    :param net: converted network (SpikingJelly or snnTorch), on its device, in eval mode
    :param data: a ``Dataset`` of ``(x, y)``, a ``DataLoader`` (its data set is re-sharded), an
        ``(x, y)`` pair of tensors, a list of ``(x, y)`` batches (joined into one data set), or —
        in one process only — any other iterable of ``(x, y)`` batches
    :param T: time steps: the window of the network's TPP layers (default: that window;
        required for networks whose neurons fix none, e.g. IF)
    :param count_mode: evaluate in the count domain
    :param bernoulli: count-mode sampler of bernoulli neurons (see :func:`tpp_plugin.count_mode`)
    :param seed: reseed the network's random modules (per rank) before evaluating
    :param batch_size: batch size of the loader built here
    :param stats: also collect :func:`tpp_plugin.spike_stats` (all-reduced)
    :param e_ac: energy per accumulate, pJ (for ``stats``)
    :param e_mac: energy per multiply-accumulate, pJ (for ``stats``)
    :param device: device of the inputs (default: the network's)
    :param group: process group (default: the default group)
    :raises RuntimeError: if launched by ``torchrun`` with several processes but without a
        process group
    :raises ValueError: if the world size is larger than the data set, the data set is empty,
        ``net`` has no spiking neuron, ``T`` differs from its TPP layers' window, a batch's
        labels are not class indices ``[N]``, or an energy constant is not > 0
    :raises TypeError: for data that are no (x, y) samples or batches (a tensor, dicts, inputs
        without labels)
    :return: ``{'accuracy', 'correct', 'images', 'rank', 'world_size', 'spike_stats'}`` —
        totals over all ranks; ``spike_stats`` is the summary (or ``None``)

    Example::

        >>> import torch, tpp_plugin
        >>> from tpp_plugin.adapters.snntorch import convert
        >>> ann = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),
        ...                           torch.nn.Linear(8, 3)).eval()
        >>> x, y = torch.rand(20, 4), torch.randint(3, (20,))
        >>> snn = convert(ann, [x], num_steps=4, count='exact', seed=0)
        >>> result = tpp_plugin.evaluate(snn, (x, y), T=4, seed=0, stats=True)
        >>> result['images'], 0 <= result['accuracy'] <= 1, result['spike_stats'] is not None
        (20, True, True)
    """
    check_process_group()  # a launch without a process group first: no rank may go on
    T = _check_net(net, T)
    _check_options(count_mode, bernoulli, seed, batch_size)
    e_ac = E_AC_PJ if e_ac is None else check_energy_constant(e_ac, "e_ac")
    e_mac = E_MAC_PJ if e_mac is None else check_energy_constant(e_mac, "e_mac")
    rank, size = world(group)
    loader, n = _loader(data, batch_size, group)
    if seed is not None:
        reseed(net, rank_seed(seed, rank))
    if device is None:
        device = next(net.parameters(), torch.empty(0)).device
    recorder = SpikeStats(net, T, e_ac, e_mac) if stats else None
    correct = images = 0
    try:
        with torch.no_grad(), _multi_step(net):
            for i, batch in enumerate(loader):
                x, y = (t.to(device) for t in _batch(batch, i))
                if count_mode:
                    with count_domain.count_mode(net, T, bernoulli=bernoulli):
                        out = net(x)
                else:
                    reset_net(net)
                    out = net(x.unsqueeze(0).expand(T, *x.shape))
                    out = (out[0] if isinstance(out, tuple) else out).mean(0)
                out = out[0] if isinstance(out, tuple) else out
                correct += int((out.argmax(1) == y).sum())
                images += len(y)
            if not count_mode:
                reset_net(net)
    finally:
        if recorder is not None:
            recorder.remove()
    if n is None and images == 0:
        raise ValueError("data: the batches hold no image (an empty iterable)")
    correct, images = (int(v) for v in all_reduce_sum([correct, images], group).tolist())
    if n is not None and images != n:  # pragma: no cover - a broken sampler
        raise RuntimeError(f"evaluated {images} images of a data set of {n}")
    summary = None
    if recorder is not None:
        summary = recorder.all_reduce(group).summary()
    return {"accuracy": correct / images if images else float("nan"), "correct": correct,
            "images": images, "rank": rank, "world_size": size, "spike_stats": summary}
