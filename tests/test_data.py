"""Offline datasets: the Fashion-MNIST loader (Debian package files), IDX parsing, subsets."""

import gzip
import os

import numpy as np
import pytest
import torch

from tpp_plugin.experiments import data

FASHION_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                 "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
HAVE_FASHION = all(os.path.isfile(os.path.join(data.FASHION_MNIST_DIR, f)) for f in FASHION_FILES)


def _write_idx(path, array: np.ndarray, code: int = 0x08):
    header = bytes([0, 0, code, array.ndim]) + np.array(array.shape, ">u4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(array.dtype.newbyteorder(">")).tobytes())


def test_read_idx_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 3, 4), dtype=np.uint8)
    _write_idx(tmp_path / "x.gz", images)
    assert np.array_equal(data.read_idx(str(tmp_path / "x.gz")), images)
    ints = rng.integers(-1000, 1000, (7,)).astype(np.int32)
    _write_idx(tmp_path / "i.gz", ints, code=0x0C)
    assert np.array_equal(data.read_idx(str(tmp_path / "i.gz")), ints)


def test_read_idx_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as f:
        f.write(b"\x1f\x00\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="not an IDX"):
        data.read_idx(str(bad))
    short = tmp_path / "short.gz"
    with gzip.open(short, "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + np.array([10], ">u4").tobytes() + b"\x00" * 3)
    with pytest.raises(ValueError, match="truncated"):
        data.read_idx(str(short))


def test_synthetic_fashion_folder_loads(tmp_path):
    rng = np.random.default_rng(1)
    for split, n in (("train", 12), ("t10k", 6)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz",
                   rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz",
                   rng.integers(0, 10, (n,), dtype=np.uint8))
    x_train, y_train, x_test, y_test = data.load_fashion_mnist(str(tmp_path))
    assert x_train.shape == (12, 1, 28, 28) and x_test.shape == (6, 1, 28, 28)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert 0.0 <= x_train.min() and x_train.max() <= 1.0


def test_missing_fashion_mnist_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError) as exc:
        data.load_fashion_mnist(str(tmp_path))
    message = str(exc.value)
    assert "apt-get install -y dataset-fashion-mnist" in message
    assert "train-images-idx3-ubyte.gz" in message


@pytest.mark.skipif(not HAVE_FASHION, reason=(
    f"Fashion-MNIST is not installed in {data.FASHION_MNIST_DIR} "
    "(apt-get install -y dataset-fashion-mnist)"))
def test_installed_fashion_mnist():
    x_train, y_train, x_test, y_test = data.load_fashion_mnist()
    assert x_train.shape == (60000, 1, 28, 28) and x_test.shape == (10000, 1, 28, 28)
    assert torch.equal(y_train.bincount(), torch.full((10,), 6000))
    assert torch.equal(y_test.bincount(), torch.full((10,), 1000))
    assert x_train.min() == 0.0 and x_train.max() == 1.0


def test_subset_is_stratified_and_repeatable():
    y = torch.arange(1000) % 10
    x = torch.arange(1000).float().unsqueeze(1)
    xs, ys = data.subset(x, y, 100, seed=3)
    assert torch.equal(ys.bincount(), torch.full((10,), 10))
    assert torch.equal(y[xs.squeeze(1).long()], ys)  # pairs stay together
    assert torch.equal(data.subset(x, y, 100, seed=3)[0], xs)
    assert not torch.equal(data.subset(x, y, 100, seed=4)[0], xs)
    assert data.subset(x, y, None)[0] is x


def test_resize_averages_areas():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert torch.equal(data.resize(x, 2), torch.tensor([[[[2.5, 4.5], [10.5, 12.5]]]]))
    assert data.resize(x, None) is x
