"""Where fine-tuning's images come from when they are a loader, not one tensor: the training and
held-out batches read from the user's loader batch by batch (memory flat in the data set's
size, as PyTorch's own training loops), and the per-epoch checkpoint that lets a fine-tuning
resume.

The held-out share of a ``DataLoader`` over a map-style data set is a
``torch.utils.data.Subset`` of its data set (``holdout`` of its samples, chosen with the
seed as for a tensor), both parts read by loaders built like the user's (batch size, workers,
collate function, shuffling); of any other iterable, the same share by position in its
iteration (so it must yield the same samples in the same order each time it is iterated); or a
separate held-out loader."""

from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader, IterableDataset, RandomSampler, Subset

from ..batches import batch_inputs

__all__ = ["LoaderSplit", "save_checkpoint", "load_checkpoint"]


def _held_out_order(n: int, holdout: float, seed: int) -> tuple:
    """The sample indices held out and trained on, as :func:`~.finetune._split` draws them."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_hold = min(int(round(holdout * n)), n - 1)
    return order[:n_hold], order[n_hold:]


def _like(loader: DataLoader, dataset, shuffle: bool) -> DataLoader:
    """A loader over ``dataset`` built like ``loader``."""
    return DataLoader(dataset, batch_size=loader.batch_size, shuffle=shuffle,
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                      pin_memory=loader.pin_memory, drop_last=loader.drop_last,
                      worker_init_fn=loader.worker_init_fn, generator=loader.generator)


class LoaderSplit:
    """The training and held-out batches of a fine-tuning loader (see the module docstring).

    :param loader: the training images: a ``DataLoader`` or any re-iterable of batches
        (tensors or ``(inputs, labels)``)
    :param holdout: the share held out, in ``[0, 1)`` (ignored with ``holdout_loader``)
    :param seed: seed of the held-out choice
    :param holdout_loader: a separate held-out loader, or ``None``
    """

    def __init__(self, loader, holdout: float, seed: int, holdout_loader=None):
        self.loader, self.mask, self.hold = loader, None, holdout_loader
        self.train = loader
        dataset = getattr(loader, "dataset", None)
        if holdout_loader is None and holdout > 0:
            if (isinstance(loader, DataLoader) and loader.batch_size is not None
                    and not isinstance(dataset, IterableDataset)):
                held, kept = _held_out_order(len(dataset), holdout, seed)
                shuffle = isinstance(loader.sampler, RandomSampler)
                self.train = _like(loader, Subset(dataset, kept.tolist()), shuffle)
                self.hold = _like(loader, Subset(dataset, held.tolist()), False)
            else:
                n = sum(batch_inputs(b).shape[0] for b in loader)
                held = _held_out_order(n, holdout, seed)[0] if n else torch.zeros(0).long()
                self.mask = torch.zeros(n, dtype=torch.bool)
                self.mask[held] = True
        self.steps = self._count_steps()

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

    def training_batches(self):
        """The inputs of each training batch of one epoch."""
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
