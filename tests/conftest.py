import re
import sys

import pytest
import torch

_NEEDS_CUDA = re.compile(r"\bneeds (a )?CUDA\b")


def pytest_collection_modifyitems(config, items):
    """Every test skipped for want of CUDA carries the ``gpu`` marker, so that ``pytest -m gpu``
    (the GPU check, tools/gpu_check.sh) selects it even where its author forgot the marker."""
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            continue
        for mark in item.iter_markers("skipif"):
            if _NEEDS_CUDA.search(str(mark.kwargs.get("reason", ""))):
                item.add_marker(pytest.mark.gpu)
                break


def pytest_report_header(config):
    """Which SpikingJelly line and which GPUs the run sees (the GPU check's logs need both)."""
    try:
        import spikingjelly

        where = spikingjelly.__file__
    except ImportError:
        where = "not installed"
    devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return [f"spikingjelly: {where}",
            f"torch {torch.__version__}, CUDA devices: {devices or 'none'}"]


@pytest.fixture
def gen():
    """A fixed-seed CPU generator: statistical tests are deterministic."""
    return torch.Generator().manual_seed(1234)


@pytest.fixture(scope="session")
def digits():
    from tpp_plugin.experiments import data

    return data.load_digits(seed=0)


@pytest.fixture(scope="session")
def digits_loaders(digits):
    from tpp_plugin.experiments import data

    return data.loaders(*digits, seed=0)


@pytest.fixture(scope="session")
def relu_cnn(digits_loaders):
    from tpp_plugin.experiments.models import digits_cnn, train_ann

    torch.manual_seed(0)
    return train_ann(digits_cnn(), digits_loaders[0], epochs=8)


@pytest.fixture(scope="session")
def qcfs_cnn(digits_loaders):
    from tpp_plugin.experiments.models import digits_cnn, train_ann

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


@pytest.fixture
def emulated_kernel(monkeypatch):
    """The 'cupy' backend on the CPU: ``kernels.tpp_window`` replaced by
    ``gpu_helpers.emulated_tpp_window`` (the kernel's Philox numbers and firing rule in torch),
    CPU tensors accepted, CuPy not required. Yields the list of the kernel calls'
    ``(windows, T, threshold, count)``."""
    from gpu_helpers import emulated_tpp_window

    from tpp_plugin.kernels import cupy as kernels

    calls = []

    def window(x_seq, T, threshold, count, stream, **kwargs):
        calls.append((x_seq.shape[0], T, threshold, count))
        return emulated_tpp_window(x_seq, T, threshold, count, stream, **kwargs)

    def check(x, name, dtypes=None):
        if dtypes is not None and x.dtype not in dtypes:
            raise TypeError(f"the 'cupy' backend does not take {x.dtype} ({name})")

    monkeypatch.setattr(kernels, "tpp_window", window)
    monkeypatch.setattr(kernels, "check_cuda_tensor", check)
    monkeypatch.setattr(kernels, "load_nvrtc", lambda: None)
    yield calls


@pytest.fixture
def no_cupy(monkeypatch):
    """CuPy made unimportable (and the cached NVRTC/CuPy lookup cleared before and after)."""
    from tpp_plugin.kernels import cupy as kernels

    monkeypatch.setitem(sys.modules, "cupy", None)
    monkeypatch.setitem(sys.modules, "cupy.cuda", None)
    kernels.load_nvrtc.cache_clear()
    yield
    kernels.load_nvrtc.cache_clear()
