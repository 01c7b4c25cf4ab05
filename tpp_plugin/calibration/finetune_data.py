"""Where fine-tuning's images come from when they are a loader, not one tensor: the training and
held-out batches read from the user's loader batch by batch (memory flat in the data set's
size, as PyTorch's own training loops), and the per-epoch checkpoint that lets a fine-tuning
resume.

The held-out share of a ``DataLoader`` over a map-style data set is a
``torch.utils.data.Subset`` of its data set (``holdout`` of its samples, chosen with the
seed as for a tensor), both parts read by loaders built like the user's (batch size, workers,
collate function, shuffling); of any other iterable, the same share by position in its
iteration (so it must yield the same samples in the same order each time it is iterated); or a
separate held-out loader.

Across processes (a process group, under ``torchrun``) the loader must be a ``DataLoader`` over a
map-style data set, the same on every rank: the held-out share is chosen on the whole data set
(the same samples on every rank), the training share is read through PyTorch's
``DistributedSampler`` (each rank its shard, ``seed`` its shuffling seed, ``set_epoch`` every
epoch; the last step padded with repeated samples as ``DistributedSampler`` does), and the
held-out share through :class:`~tpp_plugin.distributed.ShardSampler` (each sample scored once,
on one rank)."""

from __future__ import annotations

import os

import torch
from torch.utils.data import (
    DataLoader,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    Subset,
)

from ..batches import batch_inputs
from ..distributed import ShardSampler, world_of

__all__ = ["LoaderSplit", "save_checkpoint", "load_checkpoint"]


def _held_out_order(n: int, holdout: float, seed: int) -> tuple:
    """The sample indices held out and trained on, as :func:`~.finetune._split` draws them."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_hold = min(int(round(holdout * n)), n - 1)
    return order[:n_hold], order[n_hold:]


def _like(loader: DataLoader, dataset, shuffle: bool = False, sampler=None) -> DataLoader:
    """A loader over ``dataset`` built like ``loader`` (drawing from ``sampler`` if given)."""
    return DataLoader(dataset, batch_size=loader.batch_size, shuffle=shuffle, sampler=sampler,
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                      pin_memory=loader.pin_memory, drop_last=loader.drop_last,
                      worker_init_fn=loader.worker_init_fn, generator=loader.generator)


def _map_style(loader) -> bool:
    """Whether ``loader`` is a batching ``DataLoader`` over a map-style data set."""
    return (isinstance(loader, DataLoader) and loader.batch_size is not None
            and not isinstance(loader.dataset, IterableDataset))


def _shuffles(loader: DataLoader) -> bool:
    """Whether ``loader`` reads its data set in a random order."""
    sampler = loader.sampler
    return isinstance(sampler, RandomSampler) or bool(
        isinstance(sampler, DistributedSampler) and sampler.shuffle)


class LoaderSplit:
    """The training and held-out batches of a fine-tuning loader (see the module docstring).

    :param loader: the training images: a ``DataLoader`` or any re-iterable of batches
        (tensors or ``(inputs, labels)``)
    :param holdout: the share held out, in ``[0, 1)`` (ignored with ``holdout_loader``)
    :param seed: seed of the held-out choice
    :param holdout_loader: a separate held-out loader, or ``None``
    :param group: the process group sharing the fine-tuning (``None``: this process alone)
    :raises ValueError: across processes, for a loader that is not a ``DataLoader`` over a
        map-style data set, or a held-out share with fewer samples than ranks
    """

    def __init__(self, loader, holdout: float, seed: int, holdout_loader=None, group=None):
        self.loader, self.mask, self.hold = loader, None, holdout_loader
        self.train, self.sampler, self.sharded_hold = loader, None, False
        self.rank, self.size = world_of(group)
        dataset = getattr(loader, "dataset", None)
        if self.size > 1:
            self._shard(loader, holdout, seed, holdout_loader)
        elif holdout_loader is None and holdout > 0:
            if _map_style(loader):
                held, kept = _held_out_order(len(dataset), holdout, seed)
                self.train = _like(loader, Subset(dataset, kept.tolist()), _shuffles(loader))
                self.hold = _like(loader, Subset(dataset, held.tolist()))
            else:
                n = sum(batch_inputs(b).shape[0] for b in loader)
                held = _held_out_order(n, holdout, seed)[0] if n else torch.zeros(0).long()
                self.mask = torch.zeros(n, dtype=torch.bool)
                self.mask[held] = True
        self.steps = self._count_steps()

    def _shard(self, loader, holdout: float, seed: int, holdout_loader) -> None:
        """The loaders of one rank across processes (see the module docstring)."""
        if not _map_style(loader):
            raise ValueError(
                "fine-tuning across processes reads a DataLoader over a map-style data set "
                f"(each rank its shard through a DistributedSampler), got {type(loader).__name__}"
                ": pass such a DataLoader (or one tensor), the same on every rank, or "
                "distributed=False to fine-tune in every process on its own")
        dataset, train_set = loader.dataset, loader.dataset
        if holdout_loader is None and holdout > 0:
            held, kept = _held_out_order(len(dataset), holdout, seed)
            train_set = Subset(dataset, kept.tolist())
            self.hold = self._sharded(loader, Subset(dataset, held.tolist()))
        elif holdout_loader is not None and _map_style(holdout_loader):
            self.hold = self._sharded(holdout_loader, holdout_loader.dataset)
        self.sampler = DistributedSampler(train_set, self.size, self.rank,
                                          shuffle=_shuffles(loader), seed=seed,
                                          drop_last=loader.drop_last)
        self.train = _like(loader, train_set, sampler=self.sampler)

    def _sharded(self, loader, dataset) -> DataLoader:
        """A loader like ``loader`` over this rank's shard of ``dataset``, every sample on one
        rank (:class:`~tpp_plugin.distributed.ShardSampler`)."""
        if len(dataset) < self.size:
            raise ValueError(
                f"the held-out share holds {len(dataset)} samples, fewer than the {self.size} "
                "processes sharing the fine-tuning: raise holdout, pass more samples or use "
                "fewer processes")
        self.sharded_hold = True
        return _like(loader, dataset, sampler=ShardSampler(dataset, self.size, self.rank))

    def _count_steps(self) -> int:
        """Training steps (batches with a sample to train on) per epoch."""
        if self.mask is None:
            try:
                steps = len(self.train)
            except TypeError:
                steps = sum(1 for _ in self.train)
        else:
            steps = sum(1 for x in self._rows(self.loader, held=False))
        if not steps:
            raise ValueError("the fine-tuning loader yielded no batch to train on: pass at "
                             "least one batch of inputs")
        return steps

    def _rows(self, loader, held: bool):
        """Each batch's inputs held out (``held``) or trained on, by position (batches with
        none left out)."""
        seen = 0
        for batch in loader:
            x = batch_inputs(batch)
            rows = self.mask[seen:seen + x.shape[0]]
            seen += x.shape[0]
            if rows.numel() < x.shape[0]:
                raise ValueError("the fine-tuning loader yielded more samples than on its "
                                 "first pass: it must yield the same samples each time")
            x = x[(rows if held else ~rows).to(x.device)]
            if x.shape[0]:
                yield x

    def training_batches(self, epoch: int = 0):
        """The inputs of each training batch of epoch ``epoch`` (from 1; it seeds a
        ``DistributedSampler``'s shuffling across processes)."""
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        if self.mask is not None:
            yield from self._rows(self.loader, held=False)
            return
        for batch in self.train:
            x = batch_inputs(batch)
            if x.shape[0]:
                yield x

    def held_out_batches(self):
        """The inputs of each held-out batch (none without a held-out share)."""
        if self.mask is not None:
            yield from self._rows(self.loader, held=True)
        elif self.hold is not None:
            for batch in self.hold:
                x = batch_inputs(batch)
                if x.shape[0]:
                    yield x

    @property
    def has_held_out(self) -> bool:
        return self.hold is not None or (self.mask is not None and bool(self.mask.any()))


def save_checkpoint(path: str, state: dict) -> None:
    """Write ``state`` to ``path`` (through a temporary file: a crash never leaves half a
    checkpoint)."""
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str, params: list, epochs: int) -> dict | None:
    """The checkpoint at ``path`` (``None`` if there is none), checked against the parameters
    being trained and the number of epochs; a ``ValueError`` if it belongs to another run."""
    if path is None or not os.path.exists(path):
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    shapes = [tuple(p.shape) for p in params]
    if (state.get("epochs") != epochs
            or [tuple(t.shape) for t in state.get("params", [])] != shapes):
        raise ValueError(f"the checkpoint {path!r} belongs to another fine-tuning (other "
                         "epochs or parameters); delete it or pass another checkpoint path")
    return state
