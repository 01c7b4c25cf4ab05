r"""Offline datasets: scikit-learn's digits (embedded, the default). No download ever happens."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["load_digits", "loaders"]


def load_digits(test_fraction: float = 0.3, seed: int = 0):
    """scikit-learn's 8×8 digits as tensors, pixel values scaled to ``[0, 1]``.

    :param test_fraction: share of the 1797 images held out for testing
    :param seed: seed of the (stratification-free) random split
    :return: ``(x_train, y_train, x_test, y_test)``; images are ``[N, 1, 8, 8]`` float32
    """
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the digits dataset needs scikit-learn: pip install scikit-learn"
        ) from exc
    bunch = sk_load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(len(y) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def loaders(x_train, y_train, x_test, y_test, batch_size: int = 64, seed: int = 0):
    """Shuffled train loader and ordered test loader over tensors."""
    g = torch.Generator().manual_seed(seed)
    train = DataLoader(TensorDataset(x_train, y_train), batch_size, shuffle=True, generator=g)
    test = DataLoader(TensorDataset(x_test, y_test), 256, shuffle=False)
    return train, test
