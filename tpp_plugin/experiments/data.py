r"""Offline datasets: scikit-learn's digits (embedded, the default) and Fashion-MNIST from the
Debian package ``dataset-fashion-mnist``. No download ever happens."""

from __future__ import annotations

import gzip
import os
import zlib

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

__all__ = [
    "load_digits",
    "load_fashion_mnist",
    "read_idx",
    "DataFileError",
    "subset",
    "resize",
    "loaders",
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_CLASSES",
]

#: where ``apt-get install dataset-fashion-mnist`` puts the four ``*-ubyte.gz`` files
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


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


class DataFileError(ValueError):
    """A data file exists but cannot be read as what it should be (the message names it)."""


def read_idx(path: str) -> np.ndarray:
    """Read one IDX file (the MNIST format), gzip-compressed if its name ends in ``.gz``.

    :param path: file path
    :return: the array, with the shape and element type the file's header declares
    :raises DataFileError: (a ``ValueError``) naming ``path`` if it is not valid gzip, its
        header is not an IDX header, or the data is truncated
    """
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DataFileError(
            f"{path} is not a valid gzip file ({exc}); replace it with the original "
            "*-ubyte.gz file (e.g. reinstall the dataset-fashion-mnist package)"
        ) from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataFileError(f"{path} is not an IDX file (bad magic number)")
    ndim = raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    offset = 4 + 4 * ndim
    count = int(np.prod(shape)) if shape else 1
    if len(raw) - offset < count * dtype.itemsize:
        raise DataFileError(f"{path} is truncated: header says {shape}, file is too short")
    return np.frombuffer(raw, dtype, count, offset=offset).reshape(shape)


def _missing_fashion_mnist(data_dir: str, missing: list) -> FileNotFoundError:
    return FileNotFoundError(
        f"Fashion-MNIST not found in {data_dir} (missing {', '.join(missing)}). It ships as the "
        "Debian/Ubuntu package dataset-fashion-mnist: run\n"
        "    sudo apt-get install -y dataset-fashion-mnist\n"
        "(or `make bench` as root), or pass data_dir=/ --data-dir with a folder holding the four "
        "*-ubyte.gz files. tpp_plugin never downloads data."
    )


def load_fashion_mnist(data_dir: str | None = None):
    """Fashion-MNIST (60 000 train / 10 000 test 28×28 images) from local IDX files.

    :param data_dir: folder with ``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``,
        ``t10k-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz`` (default
        :data:`FASHION_MNIST_DIR`, the Debian package's folder)
    :return: ``(x_train, y_train, x_test, y_test)``; images ``[N, 1, 28, 28]`` float32 in
        ``[0, 1]``, labels ``[N]`` int64
    :raises FileNotFoundError: with the ``apt-get`` command to install the package

    Example::

        >>> x_train, y_train, x_test, y_test = load_fashion_mnist()  # doctest: +SKIP
        >>> x_train.shape, x_test.shape  # doctest: +SKIP
        (torch.Size([60000, 1, 28, 28]), torch.Size([10000, 1, 28, 28]))
    """
    data_dir = data_dir or FASHION_MNIST_DIR
    paths = {
        split: [os.path.join(data_dir, name) for name in names]
        for split, names in _FASHION_FILES.items()
    }
    missing = [os.path.basename(p) for ps in paths.values() for p in ps if not os.path.isfile(p)]
    if missing:
        raise _missing_fashion_mnist(data_dir, missing)
    out = []
    for split in ("train", "test"):
        images, labels = (read_idx(p) for p in paths[split])
        if images.ndim != 3 or labels.shape != images.shape[:1]:
            raise ValueError(
                f"{split} files of {data_dir} do not match: images {images.shape}, "
                f"labels {labels.shape}"
            )
        out.append(torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1))
        out.append(torch.from_numpy(labels.astype(np.int64)))
    return tuple(out)


def subset(x: torch.Tensor, y: torch.Tensor, n: int | None, seed: int = 0):
    """A class-stratified random subset of ``n`` examples (all of them if ``n`` is ``None`` or
    not smaller than the set), in a fixed random order.

    :param x: inputs ``[N, ...]``
    :param y: integer labels ``[N]``
    :return: ``(x[idx], y[idx])``
    """
    if n is None or n >= len(y):
        return x, y
    if n < 1:
        raise ValueError(f"subset size must be >= 1, got {n}")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=g)
    # round-robin over classes in the random order: every class gets its share of the n
    rank = torch.empty(len(y), dtype=torch.long)
    for c in y.unique():
        members = order[y[order] == c]
        rank[members] = torch.arange(len(members))
    keep = order[torch.argsort(rank[order], stable=True)[:n]]
    keep = keep[torch.randperm(len(keep), generator=g)]
    return x[keep], y[keep]


def resize(x: torch.Tensor, size: int | None) -> torch.Tensor:
    """Downscale images ``[N, C, H, W]`` to ``size × size`` by area averaging (``None``: as is)."""
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ValueError(f"resize size must be an int >= 1, got {size!r}")
    if size is None or size == x.shape[-1]:
        return x
    return torch.nn.functional.interpolate(x, size=(size, size), mode="area")
