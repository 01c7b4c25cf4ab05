r"""Small reference models and a plain training loop, used by the demo and the tests."""

from __future__ import annotations

import torch
from torch import nn

from .qcfs import replace_relu

__all__ = ["digits_cnn", "train_ann", "ann_accuracy"]


def digits_cnn(qcfs_levels: int | None = None, channels: int = 16) -> nn.Sequential:
    """A 5-spiking-layer CNN for 8×8 digits (four convolutions, one hidden linear layer).

    Average pooling only, so every op between activations is affine (DESIGN §1 fact 4).

    :param qcfs_levels: if given, every ReLU is a :class:`~tpp_plugin.QCFS` with that many levels
    :param channels: width of the first convolution
    """
    c = channels
    net = nn.Sequential(
        nn.Conv2d(1, c, 3, padding=1), nn.ReLU(),
        nn.Conv2d(c, 2 * c, 3, padding=1), nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Conv2d(2 * c, 2 * c, 3, padding=1), nn.ReLU(),
        nn.Conv2d(2 * c, 4 * c, 3, padding=1), nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * c * 2 * 2, 64), nn.ReLU(),
        nn.Linear(64, 10),
    )
    return replace_relu(net, L=qcfs_levels) if qcfs_levels else net


def train_ann(model: nn.Module, loader, epochs: int = 30, lr: float = 2e-3, progress=None):
    """Train ``model`` with Adam and cross-entropy; ``progress`` wraps the epoch range (tqdm)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    loss_fn = nn.CrossEntropyLoss()
    epochs_iter = progress(range(epochs)) if progress else range(epochs)
    model.train()
    for _ in epochs_iter:
        for x, y in loader:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
        sched.step()
    return model.eval()


@torch.no_grad()
def ann_accuracy(model: nn.Module, loader) -> float:
    """Top-1 accuracy of ``model`` (in eval mode) over ``loader``."""
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += (model(x).argmax(1) == y).sum().item()
        total += len(y)
    return correct / total
