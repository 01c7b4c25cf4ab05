"""GPU test helpers: the marks that gate GPU tests, and the CuPy window kernel's random numbers and
firing rule written out on the CPU.

Every GPU-gated test carries the ``gpu`` marker (registered in pyproject.toml), so that the GPU
check (``tools/gpu_check.sh``) runs exactly them with ``pytest -m gpu``; use the decorators below
(or ``CUDA_MARKS``/``CUPY_MARKS`` in ``pytest.param(..., marks=...)``), which add it together with
the skip condition.

The emulation: :func:`philox_words` is the kernels' Philox4x32-10 in vectorised torch integer
arithmetic (checked against the plain-Python :func:`philox4x32_10` and Random123's known
answers), :func:`kernel_window_uniforms` lays its words out as the window kernel reads them, and
:func:`emulated_tpp_window` is ``kernels.tpp_window`` for ``steps_in=1`` on any device — what the
GPU twin test (``tests/test_cupy.py``) holds the real kernel to, bit for bit. CPU tests swap it
in for the kernel (the ``emulated_kernel`` fixture of conftest.py) to test the adapters' glue
without a GPU.
"""

from __future__ import annotations

import pytest
import torch

from tpp_plugin import functional as F
from tpp_plugin.kernels import cupy as kernels

MASK = 0xFFFFFFFF


# ------------------------------------------------------------------------------------------------
# marks
# ------------------------------------------------------------------------------------------------
def _nvrtc_or_none():
    try:
        kernels.load_nvrtc()
    except ImportError as error:
        return str(error)
    return None


def _cupy_available() -> bool:
    try:
        return kernels.available()
    except Exception:  # noqa: BLE001 - any failure means: not usable here
        return False


NVRTC_MISSING = _nvrtc_or_none()
CUDA = torch.cuda.is_available()
CUPY = _cupy_available()

needs_nvrtc = pytest.mark.skipif(
    NVRTC_MISSING is not None, reason=f"CuPy/NVRTC not loadable: {NVRTC_MISSING}"
)
#: marks of a test that needs a CUDA device (``pytest.param(..., marks=CUDA_MARKS)``)
CUDA_MARKS = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA device")]
#: marks of a test that needs a CUDA device and CuPy (the 'cupy' backend)
CUPY_MARKS = [
    pytest.mark.gpu,
    pytest.mark.skipif(not CUPY, reason="needs a CUDA device and CuPy (run on a GPU machine)"),
]
#: where the exact-count oracles run, ``(device, backend)``: the CPU, and a GPU with either TPP
#: backend (``@pytest.mark.parametrize("device, backend", ORACLE_DEVICES)``)
ORACLE_DEVICES = [
    pytest.param("cpu", "torch", id="cpu"),
    pytest.param("cuda", "torch", id="cuda-torch", marks=CUDA_MARKS),
    pytest.param("cuda", "cupy", id="cuda-cupy", marks=CUPY_MARKS),
]


def _apply(marks, test):
    for mark in marks:
        test = mark(test)
    return test


def needs_cuda(test):
    """Decorator: the ``gpu`` marker, skipped without a CUDA device."""
    return _apply(CUDA_MARKS, test)


def needs_gpu(test):
    """Decorator: the ``gpu`` marker, skipped without a CUDA device and CuPy."""
    return _apply(CUPY_MARKS, test)


# ------------------------------------------------------------------------------------------------
# Philox4x32-10 and the window kernel's uniforms
# ------------------------------------------------------------------------------------------------
def philox4x32_10(counter, key):
    """Reference Philox4x32-10 in plain Python (Salmon et al., SC 2011)."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for round_ in range(10):
        if round_:
            k0, k1 = (k0 + 0x9E3779B9) & MASK, (k1 + 0xBB67AE85) & MASK
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & MASK, (p0 >> 32) ^ c3 ^ k1, p0 & MASK
    return c0, c1, c2, c3


def _mul_hi_lo(a: int, c: torch.Tensor):
    """``(a·c) >> 32`` and ``(a·c) & MASK`` for 32-bit ``a`` and int64 tensors ``c < 2**32``,
    through 16-bit halves of ``a`` so that no int64 product overflows."""
    low, high = c * (a & 0xFFFF), c * (a >> 16)  # each < 2**48
    return (high + (low >> 16)) >> 16, (low + ((high & 0xFFFF) << 16)) & MASK


def philox_words(n: int, window: int, draw: int, seed: int, device="cpu",
                 first: int = 0) -> torch.Tensor:
    """The kernels' Philox words of neurons ``i = first … first + n − 1``, counters
    ``(i mod 2**32, i >> 32, window, draw)``: ``[n, 4]`` int64 (the uint32 values) —
    :func:`tpp_plugin.kernels.cupy.philox4x32` on any device."""
    i = torch.arange(first, first + n, dtype=torch.int64, device=device)
    c0, c1 = i & MASK, i >> 32
    c2, c3 = torch.full_like(i, window & MASK), torch.full_like(i, draw & MASK)
    k0, k1 = seed & MASK, (seed >> 32) & MASK
    for round_ in range(10):
        if round_:
            k0, k1 = (k0 + 0x9E3779B9) & MASK, (k1 + 0xBB67AE85) & MASK
        hi0, lo0 = _mul_hi_lo(0xD2511F53, c0)
        hi1, lo1 = _mul_hi_lo(0xCD9E8D57, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return torch.stack([c0, c1, c2, c3], dim=1)


def python_philox_words(n: int, window: int, seed: int):
    """``words(d)`` for :func:`kernel_uniforms` from the plain-Python Philox (CPU)."""
    key = (seed & MASK, seed >> 32)
    return lambda d: torch.tensor([philox4x32_10((i, 0, window, d), key) for i in range(n)])


def kernel_uniforms(words, m: int, dtype) -> torch.Tensor:
    """The first ``m`` uniforms ``[m, n]`` of a window as the window kernel computes them
    (``uniform`` in kernels/cupy.py): uniform ``j`` is word ``j % 4`` of draw ``j // 4``, its top
    24 bits times 2**-24; in float64 words ``2(j % 2)`` and ``2(j % 2) + 1`` of draw ``j // 2``,
    27 + 26 bits times 2**-53. ``words(d)`` returns draw ``d``'s Philox words, ``[n, 4]`` int64."""
    per_draw = 2 if dtype == torch.float64 else 4
    draws = [words(d) for d in range(-(-m // per_draw))]
    rows = []
    for j in range(m):
        r = draws[j // per_draw]
        if dtype == torch.float64:
            hi, lo = r[:, 2 * (j % 2)], r[:, 2 * (j % 2) + 1]
            rows.append(((hi >> 5).double() * 2.0**26 + (lo >> 6).double()) * 2.0**-53)
        else:
            rows.append((r[:, j % 4] >> 8).float() * 2.0**-24)
    return torch.stack(rows)


def kernel_window_uniforms(words, T: int, dtype, count: str):
    """``(uniforms [T, n], rounding [n] or None)`` of one window of the kernel, the arguments of
    ``F.tpp_fire_reference``: ``'unbiased'`` rounds with the top 16 bits of word 0 (uniform 0
    truncated to 16 bits) and fires step ``t`` with uniform ``t + 1``, the other counts fire step
    ``t`` with uniform ``t``."""
    if count != "unbiased":
        return kernel_uniforms(words, T, dtype), None
    uniforms = kernel_uniforms(words, T + 1, dtype)[1:]
    rdtype = torch.float64 if dtype == torch.float64 else torch.float32
    return uniforms, (words(0)[:, 0] >> 16).to(rdtype) * 2.0**-16


# ------------------------------------------------------------------------------------------------
# the window kernel, emulated
# ------------------------------------------------------------------------------------------------
def emulated_tpp_window(x_seq, T, threshold, count, stream, v_init=0.0, steps_in=None,
                        return_v_seq=False):
    """``kernels.tpp_window`` on any device: window ``j`` of the call sums its ``steps_in`` input
    steps from ``v_init`` in the storage dtype (rounded after every add, in time order), takes
    Philox window number ``offset + j`` of ``stream``, forms ``w = v·(1/θ)`` in float32 (float64
    for float64) and fires with ``F.tpp_fire_reference``'s rule on the kernel's uniforms; spikes in
    ``x_seq``'s dtype. (Not ``return_v_seq``.)"""
    if return_v_seq:
        raise NotImplementedError("the emulation does not return v_seq")
    T = F.check_window(T)
    steps_in = T if steps_in is None else F.check_window(steps_in, "steps_in")
    F.check_count(count)
    if x_seq.dtype not in kernels.SUPPORTED_DTYPES:
        raise TypeError(f"the 'cupy' backend supports float dtypes; x_seq has {x_seq.dtype}")
    windows, shape = x_seq.shape[0] // steps_in, x_seq.shape[1:]
    n = shape.numel()
    acc = torch.float64 if x_seq.dtype == torch.float64 else torch.float32
    inv = torch.tensor(1.0, dtype=acc) / torch.tensor(float(threshold), dtype=acc)
    k0, k1, offset = stream.take(windows)
    seed = k0 | (k1 << 32)
    out = []
    for k in range(windows):
        def words(d, window=offset + k):
            return philox_words(n, window, d, seed, x_seq.device)

        steps = x_seq[k * steps_in:(k + 1) * steps_in].reshape(steps_in, n)
        v = steps[0] + v_init
        for j in range(1, steps_in):
            v = v + steps[j]
        uniforms, rounding = kernel_window_uniforms(words, T, x_seq.dtype, count)
        w = v.to(acc) * inv.to(x_seq.device)
        spikes = F.tpp_fire_reference(w, T, 1.0, count, uniforms, rounding)
        out.append(spikes.to(x_seq.dtype).view(T, *shape))
    return torch.cat(out)
