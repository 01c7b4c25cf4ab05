r"""CuPy backend: fused CUDA kernels for the TPP window and the temporal permutation.

The kernel twin of :mod:`tpp_plugin.functional`. One CUDA thread owns one neuron:

* ``tpp_window_<count>_<dtype>`` accumulates the neuron's window of input (phase 1), applies
  ``count`` and fires ``T`` steps (phase 2) with the rule of
  :func:`tpp_plugin.functional.tpp_fire`: spike at step ``t = 1..T`` when ``u·(T − t + 1) < w``
  for the step's uniform ``u``, then ``w ← w − 1``, with ``w = v·(1/θ)`` (how torch evaluates
  ``v / θ`` for a CUDA tensor and a number, so ``count='exact'`` gives the torch backend's counts
  neuron for neuron). ``'exact'`` first rounds ``w ← clamp(floor(w + ½), 0, T)``, ``'unbiased'``
  ``w ← clamp(floor(clamp(w, −1, T) + u), 0, T)``. A window's uniforms are numbered
  ``j = 0, 1, …``: ``'bernoulli'`` and ``'exact'`` fire step ``t`` with uniform ``t − 1``;
  ``'unbiased'`` rounds with uniform ``0`` truncated to 16 bits, ``u = ⌊u_0·2¹⁶⌋/2¹⁶`` (the torch
  backend's grid: ``w + u`` is then exact for a whole ``w < 2⁸`` in float32, which fires exactly
  ``w`` spikes), and fires step ``t`` with uniform ``t`` (the rounding uniform comes first, as in
  :func:`~tpp_plugin.functional.tpp_fire`). One kernel per count mode and dtype.
* ``tpp_permute`` shuffles each neuron's ``T`` slots with a Fisher–Yates shuffle in O(T), no sort.

Random numbers come from Philox4x32-10 (Salmon et al., SC 2011) computed inside the kernels: the
key is the 64-bit seed, the counter is ``(neuron index, window number, draw index)``. Nothing is
stored, results are reproducible for a seed, and a window's draws do not depend on how the work is
split into launches (so streaming and multi-step give the same spikes). ``float32``/``float16``/
``bfloat16`` windows use 24-bit uniforms (one Philox word each, four per Philox call), ``float64``
windows 53-bit ones (two words each, two per call): uniform ``j`` of a window is word ``j mod 4``
(words ``2·(j mod 2)``, ``2·(j mod 2) + 1``) of draw ``⌊j/4⌋`` (``⌊j/2⌋``). Permutation indices use
Lemire's multiply-shift on one 32-bit word (bias ≤ T·2⁻³²). On the same uniforms the window
kernel is to fire what :func:`tpp_plugin.functional.tpp_fire_reference` fires, bit for bit (the GPU
tests of ``tests/test_cupy.py`` check it on the kernel's own uniforms); its uniforms come from
another generator than the torch backend's, so only ``'exact'`` counts (which are not random)
equal the torch backend's neuron for neuron, ``'bernoulli'`` and ``'unbiased'`` ones agree in
distribution.

The sources are compiled with NVRTC. CuPy for CUDA 13 (``pip install cupy-cuda13x``, matching the
CUDA 13 build of ``torch==2.14.1``) finds ``libnvrtc.so.13`` in the ``nvidia/cu13/lib`` folder that
this torch wheel ships, but NVRTC then needs ``libnvrtc-builtins`` from the same folder, which is
not on the library path: :func:`load_nvrtc` preloads it. That is enough to compile the kernels on a
machine without a GPU (the CPU test suite does so for every kernel the backend can launch).
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os

import numpy as np
import torch

from .. import functional as F
from ..engine.stream import PhiloxStream

__all__ = [
    "SUPPORTED_DTYPES",
    "MAX_PERMUTE_T",
    "available",
    "load_nvrtc",
    "kernel_source",
    "compile_kernels",
    "tpp_window",
    "tpp_permute",
    "philox4x32",
    "PhiloxStream",
    "fire_potentials",
    "check_cuda_tensor",
]

#: dtypes the TPP window kernel accepts (the permutation kernel accepts any dtype)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: longest window the permutation kernel shuffles in registers/local memory
MAX_PERMUTE_T = 1024

_BLOCK = 256
_PERMUTE_CAPACITIES = (8, 16, 32, 64, 128, 256, 512, MAX_PERMUTE_T)
_ELEMENT_TYPES = {
    1: "unsigned char",
    2: "unsigned short",
    4: "unsigned int",
    8: "unsigned long long",
}
_DTYPE_NAMES = {
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.float32: "f32",
    torch.float64: "f64",
}

_COMMON = r"""
typedef unsigned int u32;
typedef unsigned long long u64;
#define LOADS 8  // global loads issued together per thread

// the count rules of tpp_plugin.functional (COUNT_MODES), applied to w = v/θ before firing
#define COUNT_BERNOULLI 0  // w as it is: the paper's sequential rule
#define COUNT_EXACT 1      // clamp(floor(w + 1/2), 0, T)
#define COUNT_UNBIASED 2   // clamp(floor(clamp(w, -1, T) + u), 0, T), u the window's uniform 0

// a product rounded on its own, never fused with a following add into one FMA: torch rounds
// v/θ (as v·(1/θ)) before it rounds or fires, so must the kernel
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

// Philox4x32-10 (Salmon, Moraes, Dror, Shaw: "Parallel random numbers: as easy as 1, 2, 3").
__device__ __forceinline__ void philox4x32_10(u32 c[4], u32 k0, u32 k1) {
    #pragma unroll
    for (int round = 0; round < 10; ++round) {
        if (round > 0) { k0 += 0x9E3779B9u; k1 += 0xBB67AE85u; }
        const u32 hi0 = __umulhi(0xD2511F53u, c[0]), lo0 = 0xD2511F53u * c[0];
        const u32 hi1 = __umulhi(0xCD9E8D57u, c[2]), lo1 = 0xCD9E8D57u * c[2];
        const u32 n0 = hi1 ^ c[1] ^ k0, n2 = hi0 ^ c[3] ^ k1;
        c[0] = n0; c[1] = lo1; c[2] = n2; c[3] = lo0;
    }
}

// the four words for (neuron, window, draw): one call serves 4 steps (2 in float64)
__device__ __forceinline__ void draw_words(u32 r[4], u64 neuron, u32 window, u32 draw,
                                           u32 k0, u32 k1) {
    r[0] = (u32)neuron; r[1] = (u32)(neuron >> 32); r[2] = window; r[3] = draw;
    philox4x32_10(r, k0, k1);
}

// storage <-> arithmetic type; half and bfloat16 round to nearest even like torch's casts
template <typename storage_t, typename acc_t, int IS_BF16> struct Cast {
    static __device__ __forceinline__ acc_t load(storage_t x) { return x; }
    static __device__ __forceinline__ storage_t store(acc_t x) { return x; }
};
template <> struct Cast<unsigned short, float, 0> {
    static __device__ __forceinline__ float load(unsigned short h) {
        float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f;
    }
    static __device__ __forceinline__ unsigned short store(float f) {
        unsigned short h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h;
    }
};
template <> struct Cast<unsigned short, float, 1> {
    static __device__ __forceinline__ float load(unsigned short h) {
        return __uint_as_float(((u32)h) << 16);
    }
    static __device__ __forceinline__ unsigned short store(float f) {
        u32 u = __float_as_uint(f);
        u += 0x7FFFu + ((u >> 16) & 1u);
        return (unsigned short)(u >> 16);
    }
};

__device__ __forceinline__ float uniform(const u32 r[4], int t, float) {
    return (float)(r[t & 3] >> 8) * 5.9604644775390625e-08f;             // 2^-24
}
__device__ __forceinline__ double uniform(const u32 r[4], int t, double) {
    const int j = (t & 1) * 2;
    return ((double)(r[j] >> 5) * 67108864.0 + (double)(r[j + 1] >> 6))
           * 1.1102230246251565e-16;                                      // 2^-53
}
// uniform 0 truncated to 16 bits (the top 16 bits of word 0, either dtype): 'unbiased' rounds
// with it. On this grid (the torch backend's) w + u is exact for a whole w below 2^8 (float32;
// 2^36 in float64), so such a w fires exactly w spikes; a 24-bit u could round it up to w + 1
template <typename acc_t> __device__ __forceinline__ acc_t rounding_uniform(const u32 r[4]) {
    return (acc_t)(r[0] >> 16) * (acc_t)1.52587890625e-05;                 // 2^-16
}

// Phase 1 and phase 2 for `windows` consecutive windows of one neuron per thread, count rule COUNT.
// x: [windows * steps_in, n]; spikes (and v_seq when not null): [windows * T, n].
template <typename scalar_t, typename acc_t, int IS_BF16, int COUNT>
__device__ void tpp_window_impl(
        const scalar_t* __restrict__ x, scalar_t* __restrict__ spikes,
        scalar_t* __restrict__ v_seq, long long n, int steps_in, int T, int windows,
        acc_t inv_theta, acc_t theta, acc_t v_init, u32 k0, u32 k1, u32 offset) {
    typedef Cast<scalar_t, acc_t, IS_BF16> C;
    const int per_draw = sizeof(acc_t) == 8 ? 2 : 4;
    const scalar_t one = C::store((acc_t)1), zero = C::store((acc_t)0);
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        for (int k = 0; k < windows; ++k) {
            const scalar_t* xw = x + (long long)k * steps_in * n + i;
            // Loads go out in chunks of LOADS so that several are in flight per thread (one at a
            // time leaves the memory system idle); the adds stay in time order and round after
            // every add, as a sequential sum in the storage dtype does.
            acc_t v = v_init;
            for (int s = 0; s < steps_in; s += LOADS) {
                scalar_t chunk[LOADS];
                #pragma unroll
                for (int j = 0; j < LOADS; ++j)
                    if (s + j < steps_in) chunk[j] = xw[(long long)(s + j) * n];
                #pragma unroll
                for (int j = 0; j < LOADS; ++j)
                    if (s + j < steps_in) v = C::load(C::store(v + C::load(chunk[j])));
            }
            // v/θ in acc_t (float32 for 16-bit storage), not rounded back to the storage dtype:
            // the torch backend widens 16-bit potentials before dividing, too
            acc_t w = mul_rn(v, inv_theta);
            const long long base = (long long)k * T * n + i;
            const u32 window = offset + (u32)k;
            // the window's uniforms j = 0, 1, ...: 'unbiased' rounds w with uniform 0 (drawn
            // first, as in functional.tpp_fire; truncated to 16 bits) and fires step t with
            // uniform t + 1; the other rules fire step t with uniform t
            const int first = COUNT == COUNT_UNBIASED ? 1 : 0;
            u32 r[4];
            if (COUNT == COUNT_EXACT) w = fmin(fmax(floor(w + (acc_t)0.5), (acc_t)0), (acc_t)T);
            if (COUNT == COUNT_UNBIASED) {
                draw_words(r, (u64)i, window, 0u, k0, k1);
                const acc_t u = rounding_uniform<acc_t>(r);
                w = fmin(fmax(floor(fmin(fmax(w, (acc_t)-1), (acc_t)T) + u), (acc_t)0), (acc_t)T);
            }
            for (int t = 0; t < T; ++t) {
                const int j = t + first;
                if (j % per_draw == 0)
                    draw_words(r, (u64)i, window, (u32)(j / per_draw), k0, k1);
                const bool fired = uniform(r, j, w) * (acc_t)(T - t) < w;
                spikes[base + (long long)t * n] = fired ? one : zero;
                if (fired) w -= (acc_t)1;
                if (v_seq) v_seq[base + (long long)t * n] = C::store(w * theta);
            }
        }
    }
}

// Fisher-Yates shuffle of each neuron's T slots (T <= CAPACITY), one neuron per thread.
// x, out: [windows * T, n] of any element type of that size.
template <typename element_t, int CAPACITY>
__device__ void tpp_permute_impl(
        const element_t* __restrict__ x, element_t* __restrict__ out, long long n, int T,
        int windows, u32 k0, u32 k1, u32 offset) {
    element_t slots[CAPACITY];
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        for (int k = 0; k < windows; ++k) {
            const long long base = (long long)k * T * n + i;
            for (int s = 0; s < T; s += LOADS) {  // chunks of loads in flight, as above
                element_t chunk[LOADS];
                #pragma unroll
                for (int j = 0; j < LOADS; ++j)
                    if (s + j < T) chunk[j] = x[base + (long long)(s + j) * n];
                #pragma unroll
                for (int j = 0; j < LOADS; ++j)
                    if (s + j < T) slots[s + j] = chunk[j];
            }
            u32 r[4];
            for (int d = 0, t = T - 1; t > 0; ++d, --t) {
                if ((d & 3) == 0) draw_words(r, (u64)i, offset + (u32)k, (u32)(d >> 2), k0, k1);
                const int j = (int)(((u64)r[d & 3] * (u64)(t + 1)) >> 32);   // uniform 0..t
                const element_t tmp = slots[t]; slots[t] = slots[j]; slots[j] = tmp;
            }
            for (int t = 0; t < T; ++t) out[base + (long long)t * n] = slots[t];
        }
    }
}

// raw Philox words for counters (i, 0, window, draw), i < n: [n, 4]; for tests of the generator
extern "C" __global__ void tpp_philox4x32(u32* out, long long n, u32 window, u32 draw,
                                          u32 k0, u32 k1) {
    const long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (i >= n) return;
    u32 r[4];
    draw_words(r, (u64)i, window, draw, k0, k1);
    for (int j = 0; j < 4; ++j) out[4 * i + j] = r[j];
}
"""

_WINDOW_ENTRY = r"""
extern "C" __global__ void tpp_window_{count}_{name}(
        const {storage}* x, {storage}* spikes, {storage}* v_seq, long long n, int steps_in,
        int T, int windows, {acc} inv_theta, {acc} theta, {acc} v_init,
        u32 k0, u32 k1, u32 offset) {{
    tpp_window_impl<{storage}, {acc}, {is_bf16}, {code}>(x, spikes, v_seq, n, steps_in, T,
        windows, inv_theta, theta, v_init, k0, k1, offset);
}}
"""

_PERMUTE_ENTRY = r"""
extern "C" __global__ void tpp_permute_{size}_{capacity}(
        const {element}* x, {element}* out, long long n, int T, int windows,
        u32 k0, u32 k1, u32 offset) {{
    tpp_permute_impl<{element}, {capacity}>(x, out, n, T, windows, k0, k1, offset);
}}
"""

# storage type, arithmetic type, bfloat16 flag
_WINDOW_TYPES = {
    "f16": ("unsigned short", "float", 0),
    "bf16": ("unsigned short", "float", 1),
    "f32": ("float", "float", 0),
    "f64": ("double", "double", 0),
}
#: count mode (:data:`tpp_plugin.functional.COUNT_MODES`) -> its rule in the kernel source
_COUNT_CODES = {
    "bernoulli": "COUNT_BERNOULLI",
    "exact": "COUNT_EXACT",
    "unbiased": "COUNT_UNBIASED",
}


def kernel_source() -> str:
    """The CUDA C++ source of every kernel of this backend (one NVRTC program)."""
    entries = [
        _WINDOW_ENTRY.format(
            count=count, code=code, name=name, storage=storage, acc=acc, is_bf16=flag
        )
        for count, code in _COUNT_CODES.items()
        for name, (storage, acc, flag) in _WINDOW_TYPES.items()
    ]
    entries += [
        _PERMUTE_ENTRY.format(size=size, capacity=capacity, element=element)
        for size, element in _ELEMENT_TYPES.items()
        for capacity in _PERMUTE_CAPACITIES
    ]
    return _COMMON + "".join(entries)


def kernel_names() -> list[str]:
    """Names of the ``extern "C"`` kernels in :func:`kernel_source`."""
    names = [f"tpp_window_{count}_{name}" for count in _COUNT_CODES for name in _WINDOW_TYPES]
    names += [
        f"tpp_permute_{size}_{capacity}"
        for size in _ELEMENT_TYPES
        for capacity in _PERMUTE_CAPACITIES
    ]
    return names + ["tpp_philox4x32"]


# ------------------------------------------------------------------------------------------------
# compilation
# ------------------------------------------------------------------------------------------------
def _nvrtc_builtins_candidates() -> list[str]:
    folders = []
    try:
        import nvidia  # namespace package of NVIDIA's pip wheels (torch depends on them)

        folders += [os.path.join(p, "cu13", "lib") for p in nvidia.__path__]
        folders += [os.path.join(p, "cuda_nvrtc", "lib") for p in nvidia.__path__]
    except ImportError:
        pass
    if os.environ.get("CUDA_PATH"):
        folders.append(os.path.join(os.environ["CUDA_PATH"], "lib64"))
    found = []
    for folder in folders:
        found += sorted(glob.glob(os.path.join(folder, "libnvrtc-builtins.so.*")))
    return found


def _cupy_wheel() -> str:
    major = (torch.version.cuda or "13").split(".")[0]
    return f"cupy-cuda{major}x"


@functools.cache
def load_nvrtc():
    """Import CuPy's NVRTC binding and make sure NVRTC can compile.

    Preloads ``libnvrtc-builtins`` from NVIDIA's pip wheels (which are not on the library search
    path) so that NVRTC finds it.

    :return: the ``cupy.cuda.nvrtc`` module
    :raises ImportError: if CuPy is not installed or NVRTC cannot be loaded
    """
    try:
        from cupy.cuda import nvrtc
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the 'cupy' backend needs CuPy built for torch's CUDA major version: "
            f"pip install {_cupy_wheel()} (or the extra: pip install 'tpp_plugin[cupy]')"
        ) from error
    for path in _nvrtc_builtins_candidates():
        if ".alt." not in path:
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                break
            except OSError:
                continue
    try:
        nvrtc.getVersion()
    except Exception as error:  # pragma: no cover - depends on the environment
        raise ImportError(f"CuPy is installed but NVRTC cannot be loaded: {error}") from error
    return nvrtc


def compile_kernels(arch: str) -> bytes:
    """Compile :func:`kernel_source` with NVRTC for ``arch`` (e.g. ``'sm_90'`` → a cubin,
    ``'compute_90'`` → PTX). Needs no GPU.

    :raises RuntimeError: with NVRTC's log if compilation fails
    """
    nvrtc = load_nvrtc()
    program = nvrtc.createProgram(kernel_source(), "tpp_kernels.cu", [], [])
    try:
        try:
            nvrtc.compileProgram(program, [f"--gpu-architecture={arch}", "--std=c++14"])
        except nvrtc.NVRTCError as error:
            raise RuntimeError(
                f"NVRTC failed to compile the TPP kernels for {arch}:\n"
                f"{nvrtc.getProgramLog(program)}"
            ) from error
        return nvrtc.getCUBIN(program) if arch.startswith("sm_") else nvrtc.getPTX(program)
    finally:
        nvrtc.destroyProgram(program)


@functools.cache
def _module(device_index: int):
    import cupy

    with cupy.cuda.Device(device_index):
        major, minor = torch.cuda.get_device_capability(device_index)
        supported = load_nvrtc().getSupportedArchs()
        arch = major * 10 + minor
        if arch not in supported:  # newer GPU than this NVRTC knows: let the driver JIT PTX
            image = compile_kernels(f"compute_{max(a for a in supported if a <= arch)}")
        else:
            image = compile_kernels(f"sm_{arch}")
        module = cupy.cuda.function.Module()
        module.load(image if isinstance(image, bytes) else image.encode())
        return module


def available() -> bool:
    """``True`` if CuPy, NVRTC and a CUDA device are all usable."""
    try:
        load_nvrtc()
    except ImportError:
        return False
    return torch.cuda.is_available()


# ------------------------------------------------------------------------------------------------
# launching
# ------------------------------------------------------------------------------------------------
def fire_potentials(potentials: torch.Tensor, T: int, threshold, count: str,
                    stream: PhiloxStream) -> torch.Tensor:
    r"""Phase 2 of ``k`` accumulated windows, ``potentials`` ``[k, *shape]``, in one launch.

    ``w = v/θ`` is formed by torch exactly as :func:`tpp_plugin.functional.tpp_fire` forms it
    (float32 for 16-bit ``v``), and the kernel fires ``w`` with ``θ = 1``: ``w·1`` is exact, so
    every threshold shape works (per channel too) and exact counts equal the torch backend's
    neuron for neuron.

    :param potentials: CUDA tensor ``[k, *shape]`` (pooled, ``v_init`` included)
    :param T: firing steps per window
    :param threshold: θ, a number or a tensor broadcastable to ``shape``
    :param count: ``'bernoulli'``, ``'exact'`` or ``'unbiased'``
    :param stream: the module's :class:`PhiloxStream` (advanced by ``k`` windows)
    :return: spikes ``[k·T, *shape]`` in ``potentials``' dtype
    """
    F.check_threshold(threshold, shape=potentials.shape[1:])
    check_cuda_tensor(potentials, "potentials", SUPPORTED_DTYPES)
    rdtype = F._random_dtype(potentials.dtype)
    w = F._potential_in_thresholds(potentials, T, threshold, "bernoulli", rdtype)
    return tpp_window(w, T, 1.0, count, stream, steps_in=1).to(potentials.dtype)


def check_cuda_tensor(x: torch.Tensor, name: str, dtypes=None) -> None:
    """Refuse ``x`` unless it is a CUDA tensor (of one of ``dtypes``), naming it and the fix."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if dtypes is not None and x.dtype not in dtypes:
        raise TypeError(
            f"the 'cupy' backend supports {', '.join(str(d) for d in dtypes)}; "
            f"{name} has dtype {x.dtype}"
        )
    if x.device.type != "cuda":
        raise ValueError(
            f"the 'cupy' backend runs on CUDA tensors, but {name} is on {x.device.type!r}; "
            "move the network and input to the GPU, or use backend='torch'"
        )


@functools.cache
def _function(device_index: int, name: str):
    return _module(device_index).get_function(name)


_STREAMS: dict = {}


def _cupy_stream(device_index: int):
    """CuPy's view of torch's current stream (cached per stream)."""
    import cupy

    torch_stream = torch.cuda.current_stream(device_index)
    key = (device_index, torch_stream.cuda_stream)
    if key not in _STREAMS:
        try:  # CuPy >= 14 and a torch with the CUDA stream protocol
            _STREAMS[key] = cupy.cuda.Stream.from_external(torch_stream)
        except (AttributeError, TypeError):
            _STREAMS[key] = cupy.cuda.ExternalStream(torch_stream.cuda_stream, device_index)
    return _STREAMS[key]


def _launch(name: str, device_index: int, n: int, args) -> None:
    """Launch kernel ``name`` on torch's current stream, one thread per neuron (grid-stride)."""
    import cupy

    stream = _cupy_stream(device_index)
    grid = (max(1, min(-(-n // _BLOCK), 2**31 - 1)),)
    with cupy.cuda.Device(device_index):
        _function(device_index, name)(grid, (_BLOCK,), args, stream=stream)


def _ptr(x: torch.Tensor | None) -> np.uint64:
    return np.uint64(0 if x is None else x.data_ptr())


def tpp_window(
    x_seq: torch.Tensor,
    T: int,
    threshold: float,
    count: str,
    stream: PhiloxStream,
    v_init: float = 0.0,
    steps_in: int | None = None,
    return_v_seq: bool = False,
):
    r"""Both TPP phases for every window of ``x_seq`` in one kernel launch.

    :param x_seq: CUDA tensor ``[windows·steps_in, *shape]`` (float16/bfloat16/float32/float64)
    :param T: firing steps per window
    :param threshold: θ, a positive number
    :param count: ``'bernoulli'``, ``'exact'`` or ``'unbiased'`` (which uniforms each uses: see
        the module docstring; ``'unbiased'`` rounds with uniform 0 truncated to 16 bits, step
        ``t = 1..T`` fires with uniform ``t``)
    :param stream: the module's :class:`PhiloxStream` (advanced by the number of windows)
    :param v_init: potential each window starts from
    :param steps_in: input steps per window (default ``T``; ``1`` fires an already accumulated
        potential ``x_seq = v[None]``)
    :param return_v_seq: also return the potential after each step's reset
    :return: spikes ``[windows·T, *shape]`` (dtype of ``x_seq``), or ``(spikes, v_seq)``
    """
    T = F.check_window(T)
    steps_in = T if steps_in is None else F.check_window(steps_in, "steps_in")
    F.check_count(count)
    if isinstance(threshold, torch.Tensor):
        raise TypeError("the 'cupy' backend needs a scalar threshold; use backend='torch'")
    threshold = F.check_threshold(threshold)
    check_cuda_tensor(x_seq, "x_seq", SUPPORTED_DTYPES)
    if x_seq.dim() < 1 or x_seq.shape[0] % steps_in:
        raise ValueError(
            f"x_seq has {x_seq.shape[0] if x_seq.dim() else 0} steps, not a multiple of {steps_in}"
        )
    windows = x_seq.shape[0] // steps_in
    x = x_seq.contiguous()
    n = x[0].numel() if windows else 0
    spikes = torch.empty((windows * T, *x.shape[1:]), dtype=x.dtype, device=x.device)
    v_seq = torch.empty_like(spikes) if return_v_seq else None
    if n and windows:
        acc = np.float64 if x.dtype == torch.float64 else np.float32
        inv = acc(1.0) / acc(threshold)  # torch evaluates v / θ as v · (1/θ) on CUDA
        k0, k1, offset = stream.take(windows)
        args = (
            _ptr(x), _ptr(spikes), _ptr(v_seq), np.int64(n), np.int32(steps_in), np.int32(T),
            np.int32(windows), inv, acc(threshold), acc(v_init),
            np.uint32(k0), np.uint32(k1), np.uint32(offset),
        )
        _launch(f"tpp_window_{count}_{_DTYPE_NAMES[x.dtype]}", x.device.index or 0, n, args)
    return (spikes, v_seq) if return_v_seq else spikes


def tpp_permute(x_seq: torch.Tensor, T: int, stream: PhiloxStream) -> torch.Tensor:
    r"""Shuffle every neuron's spike train in each window of ``T`` steps (scope ``'neuron'``).

    :param x_seq: CUDA tensor ``[windows·T, *shape]`` of any dtype
    :param T: window length, at most :data:`MAX_PERMUTE_T`
    :param stream: the module's :class:`PhiloxStream`
    :return: the permuted tensor (same shape and dtype)
    """
    T = F.check_window(T)
    if T > MAX_PERMUTE_T:
        raise ValueError(
            f"the 'cupy' permutation kernel handles windows of up to {MAX_PERMUTE_T} steps, "
            f"got T={T}; use backend='torch'"
        )
    check_cuda_tensor(x_seq, "x_seq")
    if x_seq.dim() < 1 or x_seq.shape[0] % T:
        raise ValueError(f"x_seq's time dimension must be a multiple of T={T}")
    windows = x_seq.shape[0] // T
    x = x_seq.contiguous()
    out = torch.empty_like(x)
    n = x[0].numel() if windows else 0
    if n and windows:
        size = x.element_size()
        capacity = next(c for c in _PERMUTE_CAPACITIES if c >= T)
        k0, k1, offset = stream.take(windows)
        args = (
            _ptr(x), _ptr(out), np.int64(n), np.int32(T), np.int32(windows),
            np.uint32(k0), np.uint32(k1), np.uint32(offset),
        )
        _launch(f"tpp_permute_{size}_{capacity}", x.device.index or 0, n, args)
    return out


def philox4x32(n: int, window: int, draw: int, seed: int, device="cuda") -> torch.Tensor:
    """Raw Philox4x32-10 words for counters ``(i, 0, window, draw)``, ``i < n``: ``[n, 4]``
    int64 (the uint32 values). Exposes the kernels' generator to tests."""
    out = torch.empty((n, 4), dtype=torch.int32, device=device)
    check_cuda_tensor(out, "out")
    args = (
        _ptr(out), np.int64(n), np.uint32(window), np.uint32(draw),
        np.uint32(seed & 0xFFFFFFFF), np.uint32(seed >> 32),
    )
    _launch("tpp_philox4x32", out.device.index or 0, n, args)
    return out.to(torch.int64) & 0xFFFFFFFF
