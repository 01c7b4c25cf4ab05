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


@pytest.fixture(scope="module")
def one_thread():
    """Small tensors: one intra-op thread is as fast, and immune to a busy machine's contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_snntorch():
    """Registered plugin, empty ``SpikingNeuron.instances`` — nothing leaks between tests."""
    import snntorch

    from tpp_plugin import registry

    registry.register("snntorch")
    snntorch.SpikingNeuron.init()
    yield
    snntorch.SpikingNeuron.init()
    registry.register("snntorch")
