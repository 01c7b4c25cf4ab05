import pytest
import torch


@pytest.fixture
def gen():
    """A fixed-seed CPU generator: statistical tests are deterministic."""
    return torch.Generator().manual_seed(1234)


@pytest.fixture(scope="session")
def digits():
    from tpp_plugin import data

    return data.load_digits(seed=0)


@pytest.fixture(scope="session")
def digits_loaders(digits):
    from tpp_plugin import data

    return data.loaders(*digits, seed=0)


@pytest.fixture(scope="session")
def relu_cnn(digits_loaders):
    from tpp_plugin.models import digits_cnn, train_ann

    torch.manual_seed(0)
    return train_ann(digits_cnn(), digits_loaders[0], epochs=8)


@pytest.fixture(scope="session")
def qcfs_cnn(digits_loaders):
    from tpp_plugin.models import digits_cnn, train_ann

    torch.manual_seed(0)
    return train_ann(digits_cnn(qcfs_levels=4), digits_loaders[0], epochs=8)
