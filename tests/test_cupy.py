"""The 'cupy' backend (tpp_plugin/kernels/cupy.py) of TPPNode and TemporalPermutation.

CPU part (runs in CI): the kernel source compiles with NVRTC without a GPU for every kernel the
backend can launch (a window kernel for every count mode), the Philox reference below matches
Random123's published known answers, the emulation of the window kernel's uniforms below runs on
it, and the backend refuses what it cannot run with a clear message.

GPU part (skipped without CUDA + CuPy): the window kernel against the functional reference on the
kernel's own uniforms (bit for bit, every count mode), the kernels against the torch backend
(exact counts neuron for neuron; bernoulli and unbiased counts in distribution), the firing
statistics, the permutation, reproducibility and a converted network. Statistical checks use
fixed seeds and a tolerance of 4 standard errors, as stated in each test.
"""

import copy

import pytest
import torch
from gpu_helpers import (
    MASK,
    kernel_window_uniforms,
    needs_gpu,
    needs_nvrtc,
    philox4x32_10,
    philox_words,
    python_philox_words,
)
from spikingjelly.activation_based import functional  # noqa: E402,I001

import tpp_plugin  # noqa: F401  (registers into SpikingJelly)
from tpp_plugin import functional as F
from tpp_plugin.adapters.spikingjelly import TemporalPermutation, TPPNode, convert_qcfs
from tpp_plugin.kernels import cupy as kernels


# ================================================================ CPU: always
def test_philox_reference_matches_random123_known_answers():
    assert philox4x32_10((0, 0, 0, 0), (0, 0)) == (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)
    assert philox4x32_10((MASK,) * 4, (MASK, MASK)) == (
        0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD,
    )


def test_vectorised_philox_equals_the_python_reference():
    """gpu_helpers.philox_words (torch integer arithmetic, used by the kernel emulation) is the
    reference Philox for every counter, including neuron indices above 2**32 and 64-bit keys."""
    for seed in (0, 0xDEADBEEF12345678, 2**64 - 1):
        for window, draw in ((0, 0), (7, 2), (MASK, MASK)):
            words = philox_words(50, window, draw, seed)
            key = (seed & MASK, seed >> 32)
            assert words.tolist() == [list(philox4x32_10((i, 0, window, draw), key))
                                      for i in range(50)]
    first = 2**32 - 2  # neuron indices past 32 bits go into the second counter word
    words = philox_words(4, 3, 1, 99, first=first)
    assert words.tolist() == [list(philox4x32_10((i & MASK, i >> 32, 3, 1), (99, 0)))
                              for i in range(first, first + 4)]


@needs_nvrtc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90", "compute_75"])
def test_every_kernel_compiles_with_nvrtc_without_a_gpu(arch):
    image = kernels.compile_kernels(arch)
    assert len(image) > 0
    names = kernels.kernel_names()
    # 3 count modes x 4 dtypes of the window kernel, 4 element sizes x 8 capacities of the
    # permutation, Philox
    assert len(names) == 3 * 4 + 4 * 8 + 1
    for count in F.COUNT_MODES:  # 'unbiased' included
        for dtype in ("f16", "bf16", "f32", "f64"):
            assert f"tpp_window_{count}_{dtype}" in names
    for name in names:
        assert name.encode() in image, f"{name} missing from the {arch} image"


def test_every_count_mode_has_a_window_kernel():
    """A count mode added to functional.COUNT_MODES without its rule in the kernel fails here."""
    assert tuple(kernels._COUNT_CODES) == F.COUNT_MODES
    source = kernels.kernel_source()
    for count, code in kernels._COUNT_CODES.items():
        assert f"#define {code} " in source
        for dtype in ("f16", "bf16", "f32", "f64"):
            assert f'extern "C" __global__ void tpp_window_{count}_{dtype}(' in source


def test_window_kernel_takes_every_count_mode_and_checks_it_first():
    stream = kernels.PhiloxStream(0)
    for count in F.COUNT_MODES:  # accepted: the refusal is about the CPU tensor
        with pytest.raises(ValueError, match="CUDA tensors"):
            kernels.tpp_window(torch.ones(4, 3), 4, 1.0, count, stream)
    with pytest.raises(ValueError, match="count must be one of"):
        kernels.tpp_window(torch.ones(4, 3), 4, 1.0, "bogus", stream)
    assert stream.offset == 0  # refused calls take no window


def test_kernel_uniforms_emulation_on_the_python_philox():
    """The emulation the GPU twin test compares the kernel with, run on the Python Philox: the
    uniforms lie on the kernel's 24-bit (float64: 53-bit) grid; 'unbiased' rounds with uniform 0
    truncated to 16 bits and fires with the uniforms after it; on them the reference fires
    floor(w) or ceil(w) spikes, exactly w for a whole w."""
    n, T, seed = 37, 6, 0xDEADBEEF12345678
    words = python_philox_words(n, 3, seed)
    for dtype, bits in ((torch.float32, 24), (torch.float64, 53)):
        plain, none = kernel_window_uniforms(words, T + 1, dtype, "bernoulli")
        steps, rounding = kernel_window_uniforms(words, T, dtype, "unbiased")
        assert none is None and plain.dtype == rounding.dtype == dtype and plain.shape == (T + 1, n)
        assert torch.equal(steps, plain[1:])
        assert torch.equal(rounding, torch.floor(plain[0] * 2**16) / 2**16)
        assert ((plain >= 0) & (plain < 1)).all() and len(plain.unique()) == plain.numel()
        assert torch.equal(plain * 2**bits, (plain * 2**bits).floor())
        w = torch.linspace(-1.5, T + 1.5, n, dtype=torch.float64)
        w[::3] = w[::3].round()
        v = (w * 0.5).to(dtype)  # θ = 0.5: v/θ is exact, as a division and as v·(1/θ)
        counts = F.tpp_fire_reference(v, T, 0.5, "unbiased", steps, rounding).sum(0).double()
        target = w.clamp(0, T)
        assert ((counts == target.floor()) | (counts == target.ceil())).all()


def test_16_bit_rounding_uniform_keeps_whole_potentials_exact():
    """Why the kernel truncates 'unbiased''s rounding uniform to 16 bits (the torch backend's
    grid): w + u is then exact in float32 for every whole w < 2**8, even for the largest u, so a
    whole potential fires exactly w spikes; a 24-bit u rounds 1 + (1 − 2**-24) up to 2."""
    T, v = 256, torch.arange(256, dtype=torch.float32)
    fire_all = torch.zeros(T, len(v))  # u = 0: fire at every step while w > 0

    def counts(u):
        return F.tpp_fire_reference(v, T, 1.0, "unbiased", fire_all, torch.full_like(v, u)).sum(0)

    assert torch.equal(counts(1 - 2**-16), v)
    assert counts(1 - 2**-24)[1] == 2


@needs_nvrtc
def test_compile_error_reports_nvrtc_log(monkeypatch):
    monkeypatch.setattr(kernels, "kernel_source", lambda: "this is not CUDA")
    with pytest.raises(RuntimeError, match="NVRTC failed"):
        kernels.compile_kernels("sm_90")


def test_missing_cupy_names_the_wheel(no_cupy):
    with pytest.raises(ImportError, match=r"cupy-cuda\d+x"):
        TPPNode(backend="cupy")
    assert not kernels.available()


@needs_nvrtc
@pytest.mark.parametrize("module", [TPPNode, TemporalPermutation])
def test_cpu_tensor_is_refused_with_advice(module):
    node = module(step_mode="m", backend="cupy", seed=0)
    with pytest.raises(ValueError, match="CUDA tensors.*backend='torch'"):
        node(torch.rand(4, 2, 3))


@needs_nvrtc
def test_unbiased_tppnode_takes_the_cupy_backend():
    node = TPPNode(count="unbiased", step_mode="m", backend="cupy", seed=0)
    assert node.backend == "cupy" and node.count == "unbiased"
    with pytest.raises(ValueError, match="CUDA tensors.*backend='torch'"):
        node(torch.rand(4, 2, 3))
    other = TPPNode(count="unbiased", step_mode="m")
    other.backend = "cupy"  # what functional.set_backend does
    assert other.backend == "cupy"


@needs_nvrtc
def test_unsupported_dtype_and_tensor_threshold_are_refused():
    stream = kernels.PhiloxStream(0)
    with pytest.raises(TypeError, match="supports"):
        kernels.tpp_window(torch.ones(4, 3, dtype=torch.int32), 4, 1.0, "exact", stream)
    with pytest.raises(TypeError, match="scalar threshold"):
        kernels.tpp_window(torch.ones(4, 3), 4, torch.ones(3), "exact", stream)
    with pytest.raises(ValueError, match="up to 1024"):
        kernels.tpp_permute(torch.ones(1025, 3), 1025, stream)


@needs_nvrtc
@pytest.mark.skipif(not hasattr(functional, "set_backend"), reason="no set_backend in this line")
def test_set_backend_switches_tpp_modules():
    net = torch.nn.Sequential(TPPNode(step_mode="m"), TemporalPermutation(step_mode="m"))
    functional.set_backend(net, "cupy")
    assert net[0].backend == "cupy" and net[1].backend == "cupy"
    functional.set_backend(net, "torch")
    assert net[0].backend == "torch"


def test_philox_stream_hands_out_consecutive_windows():
    stream = kernels.PhiloxStream(2**40 + 5)
    assert stream.take(3) == (5, 2**8, 0)
    assert stream.take(1) == (5, 2**8, 3)


# ================================================================ GPU
DEVICE = "cuda"


def stream_steps(module, x_seq, T):
    """Feed x_seq step by step, then T zero steps; drop the first window (the delay)."""
    outs = [module(x) for x in x_seq] + [module(torch.zeros_like(x_seq[0])) for _ in range(T)]
    return torch.stack(outs)[T:]


@needs_gpu
def test_philox_kernel_matches_reference():
    seed = 0x0123456789ABCDEF
    words = kernels.philox4x32(64, window=7, draw=2, seed=seed).cpu().tolist()
    for i, row in enumerate(words):
        assert tuple(row) == philox4x32_10((i, 0, 7, 2), (seed & MASK, seed >> 32))
    zero = kernels.philox4x32(1, window=0, draw=0, seed=0).cpu().tolist()[0]
    assert tuple(zero) == (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)
    # the vectorised emulation (gpu_helpers.philox_words) on the GPU too
    many = kernels.philox4x32(5000, window=3, draw=1, seed=seed)
    assert torch.equal(many, philox_words(5000, 3, 1, seed, device=DEVICE))


@needs_gpu
@pytest.mark.parametrize("count", F.COUNT_MODES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_emulated_window_kernel_equals_the_kernel(count, dtype):
    """gpu_helpers.emulated_tpp_window, which the CPU tests of the snnTorch glue swap in for the
    kernel, fires what the kernel fires, bit for bit (steps_in=1, the glue's call)."""
    from gpu_helpers import emulated_tpp_window

    T, n, theta = 8, 3001, 0.7
    g = torch.Generator(device=DEVICE).manual_seed(0)
    w = torch.rand(3, n, generator=g, device=DEVICE, dtype=torch.float64) * (T + 3) - 1.5
    w[:, ::5] = w[:, ::5].round()
    v = (w * theta).to(dtype)
    real = kernels.tpp_window(v, T, theta, count, kernels.PhiloxStream(77), steps_in=1)
    stream = kernels.PhiloxStream(77)
    emulated = emulated_tpp_window(v, T, theta, count, stream, steps_in=1)
    assert torch.equal(real, emulated) and stream.offset == 3


@needs_gpu
@pytest.mark.parametrize("count", F.COUNT_MODES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("T", [1, 3, 4, 8, 32])
def test_window_kernel_fires_the_reference_on_its_own_uniforms(count, dtype, T):
    """The twin property: given the kernel's uniforms (its Philox words, emulated by
    kernel_window_uniforms), functional's reference and fast path fire the kernel's spikes bit
    for bit, window by window (window k takes Philox window number k)."""
    n, theta, seed = 4099, 0.7, 0x5EED
    g = torch.Generator(device=DEVICE).manual_seed(T)
    w = torch.rand(2, n, generator=g, device=DEVICE, dtype=torch.float64) * (T + 3) - 1.5
    w[:, ::7] = w[:, ::7].round()  # whole potentials too
    v = (w * theta).to(dtype)
    spikes = kernels.tpp_window(v, T, theta, count, kernels.PhiloxStream(seed), steps_in=1)
    assert spikes.shape == (2 * T, n) and spikes.dtype == dtype
    for k in range(2):
        def words(d, k=k):
            return kernels.philox4x32(n, window=k, draw=d, seed=seed)

        uniforms, rounding = kernel_window_uniforms(words, T, dtype, count)
        expected = F.tpp_fire_reference(v[k], T, theta, count, uniforms, rounding)
        assert torch.equal(spikes[k * T:(k + 1) * T], expected)
        fast = F.tpp_fire(v[k], T, theta, count, uniforms=uniforms, rounding=rounding)
        assert torch.equal(fast, expected)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("T", [1, 4, 8, 32])
def test_unbiased_counts_agree_with_torch_backend(dtype, T):
    """TPPNode(count='unbiased'): each backend rounds the same potential w = v/θ with its own
    (16-bit) uniform, so every count is floor(w) or ceil(w) of the torch backend's w (clamped to
    [0, T]), whole potentials give equal counts neuron for neuron, and the window totals of the
    two backends differ by at most 4 standard errors (SE² = Σ 2·f(1 − f), f = frac(w))."""
    g = torch.Generator(device=DEVICE).manual_seed(T)
    x_seq = (torch.rand(2 * T, 64, 513, generator=g, device=DEVICE) * 0.8 - 0.15).to(dtype)
    halves = torch.randint(-1, 3, (2 * T, 64, 128), generator=g, device=DEVICE) * 0.5
    x_seq[..., :128] = halves.to(dtype)  # window sums k/2: whole potentials w = k at θ = 0.5
    kwargs = dict(v_threshold=0.5, count="unbiased", T=T, step_mode="m", seed=1)
    torch_spikes = TPPNode(backend="torch", **kwargs)(x_seq)
    cupy_spikes = TPPNode(backend="cupy", **kwargs)(x_seq)
    assert cupy_spikes.dtype == dtype and cupy_spikes.shape == x_seq.shape
    assert set(cupy_spikes.unique().tolist()) <= {0.0, 1.0}
    rdtype = torch.float64 if dtype == torch.float64 else torch.float32
    for k in range(2):
        window = slice(k * T, (k + 1) * T)
        w = (F.tpp_accumulate(x_seq[window]).to(rdtype) / 0.5).clamp(0, T).double()
        whole = w == w.floor()
        assert whole[..., :128].all()
        counts = [s[window].sum(0).double() for s in (torch_spikes, cupy_spikes)]
        for c in counts:
            assert ((c == w.floor()) | (c == w.ceil())).all()
        assert torch.equal(counts[1][whole], counts[0][whole])
        f = w - w.floor()
        se = (2 * (f * (1 - f)).sum()).sqrt().item()
        assert abs(counts[1].sum().item() - counts[0].sum().item()) <= 4 * se + 1e-9


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("T", [1, 4, 8, 32])
def test_exact_counts_equal_torch_backend_for_every_neuron(dtype, T):
    g = torch.Generator(device=DEVICE).manual_seed(T)
    x_seq = (torch.rand(2 * T, 64, 513, generator=g, device=DEVICE) * 1.6 - 0.3).to(dtype)
    kwargs = dict(v_threshold=0.7, count="exact", T=T, step_mode="m", seed=1)
    torch_spikes = TPPNode(backend="torch", **kwargs)(x_seq)
    cupy_spikes = TPPNode(backend="cupy", **kwargs)(x_seq)
    assert cupy_spikes.dtype == dtype and cupy_spikes.shape == x_seq.shape
    for w in range(2):
        window = slice(w * T, (w + 1) * T)
        assert torch.equal(cupy_spikes[window].sum(0), torch_spikes[window].sum(0))
    assert set(cupy_spikes.unique().tolist()) <= {0.0, 1.0}


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bernoulli_mean_count_within_4_standard_errors(dtype):
    T, theta, n = 8, 0.5, 20_000
    w = torch.tensor([0.0, 0.3, 1.0, 2.5, 4.0, 6.2, 7.7, 8.0, 9.0, -1.0], dtype=torch.float64)
    v = (w * theta).repeat_interleave(n).to(dtype).to(DEVICE)
    spikes = kernels.tpp_window(v[None], T, theta, "bernoulli", kernels.PhiloxStream(7), steps_in=1)
    counts = spikes.sum(0).double().view(len(w), n).cpu()
    expected = F.expected_count(w * theta, T, theta)
    # whole numbers of thresholds in [0, T] (and outside) fire deterministically (DESIGN fact 1)
    assert torch.allclose(expected[w == w.round()], w[w == w.round()].clamp(0, T))
    se = counts.std(1) / n**0.5
    assert ((counts.mean(1) - expected).abs() <= 4 * se + 1e-12).all(), (counts.mean(1), expected)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_unbiased_mean_count_is_w_within_4_standard_errors(dtype):
    """floor(w) or ceil(w) spikes, mean clamp(w, 0, T) within 4 SE plus the 2**-16 grid of the
    rounding uniform; whole potentials (and those outside [0, T]) fire deterministically."""
    T, theta, n = 8, 0.5, 20_000
    w = torch.tensor([0.0, 0.3, 1.0, 2.5, 4.0, 6.2, 7.7, 8.0, 9.0, -1.0], dtype=torch.float64)
    v = (w * theta).repeat_interleave(n).to(dtype).to(DEVICE)
    spikes = kernels.tpp_window(v[None], T, theta, "unbiased", kernels.PhiloxStream(7), steps_in=1)
    counts = spikes.sum(0).double().view(len(w), n).cpu()
    expected = F.expected_count(w * theta, T, theta, count="unbiased")  # clamp(w, 0, T)
    low = expected.floor()[:, None]
    assert ((counts == low) | (counts == low + 1)).all()
    whole = expected == expected.floor()
    assert (counts[whole] == expected[whole, None]).all()
    se = counts.std(1) / n**0.5
    assert ((counts.mean(1) - expected).abs() <= 4 * se + 2**-16).all(), (counts.mean(1), expected)


@needs_gpu
@pytest.mark.parametrize("count", ["exact", "unbiased"])
def test_positions_uniform_within_4_standard_errors(count):
    T, k, n = 8, 3, 40_000
    v = torch.full((1, n), float(k), device=DEVICE)
    spikes = kernels.tpp_window(v, T, 1.0, count, kernels.PhiloxStream(11), steps_in=1)
    assert (spikes.sum(0) == k).all()
    p = k / T
    freq = spikes.mean(1).cpu()
    se = (p * (1 - p) / n) ** 0.5
    assert ((freq - p).abs() <= 4 * se).all(), freq


@needs_gpu
@pytest.mark.parametrize("count", F.COUNT_MODES)
def test_same_seed_same_spikes_and_streaming_equals_multi_step(count):
    T = 4
    x_seq = torch.rand(3 * T, 8, 100, device=DEVICE)
    multi = TPPNode(count=count, T=T, step_mode="m", seed=5, backend="cupy")
    first = multi(x_seq)
    functional.reset_net(multi)
    assert torch.equal(TPPNode(count=count, T=T, step_mode="m", seed=5, backend="cupy")(x_seq),
                       first)
    other = TPPNode(count=count, T=T, step_mode="m", seed=6, backend="cupy")(x_seq)
    assert not torch.equal(other, first)
    streamed = stream_steps(
        TPPNode(count=count, T=T, seed=5, backend="cupy", streaming="delayed"), x_seq, T)
    assert torch.equal(streamed, first)


@needs_gpu
@pytest.mark.parametrize("count", ["exact", "unbiased"])
def test_store_v_seq_ends_at_the_torch_backend_residual(count):
    T = 8
    x_seq = torch.rand(T, 4, 300, device=DEVICE, dtype=torch.float64)
    kwargs = dict(count=count, step_mode="m", store_v_seq=True, v_threshold=0.5)
    node_c, node_t = TPPNode(backend="cupy", seed=0, **kwargs), TPPNode(seed=0, **kwargs)
    node_c(x_seq), node_t(x_seq)
    assert torch.allclose(node_c.v_seq[-1], node_t.v_seq[-1])
    assert (node_c.v_seq.diff(dim=0) <= 0).all()


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("T", [1, 8, 40])
def test_permutation_keeps_every_value_and_is_uniform(dtype, T):
    n = 40_000
    x_seq = torch.arange(T, device=DEVICE).to(dtype)[:, None].expand(T, n).contiguous()
    out = kernels.tpp_permute(x_seq, T, kernels.PhiloxStream(3))  # any dtype, by element size
    assert out.dtype == dtype
    assert torch.equal(out.sort(0).values, x_seq)  # every neuron keeps its values
    if T > 1:
        # P(slot t holds the value from slot j) = 1/T for every (t, j)
        freq = torch.stack([(out == j).double().mean(1) for j in range(T)]).cpu()
        p, se = 1 / T, ((1 / T) * (1 - 1 / T) / n) ** 0.5
        assert ((freq - p).abs() <= 4 * se).all()


@needs_gpu
def test_permutation_streaming_equals_multi_step():
    T = 4
    x_seq = (torch.rand(3 * T, 5, 7, device=DEVICE) < 0.5).float()
    multi = TemporalPermutation(T=T, step_mode="m", seed=2, backend="cupy")(x_seq)
    streamed = stream_steps(
        TemporalPermutation(T=T, seed=2, backend="cupy", streaming="delayed"), x_seq, T)
    assert torch.equal(streamed, multi)
    assert torch.equal(multi.view(3, T, 5, 7).sum(1), x_seq.view(3, T, 5, 7).sum(1))


def _predict(snn, x, T, backend, seed):
    for i, m in enumerate(m for m in snn.modules() if isinstance(m, TPPNode)):
        m.backend = backend
        m.manual_seed(seed + i)
    functional.reset_net(snn)
    with torch.no_grad():
        return snn(x.unsqueeze(0).expand(T, *x.shape)).mean(0).argmax(1)


@needs_gpu
@pytest.mark.parametrize("T", [2, 4, 8])
def test_converted_network_exact_same_predictions_as_torch_backend(qcfs_cnn, digits, T):
    from tpp_plugin.qcfs import qcfs_levels

    # float64: in float32 cuDNN's default TF32 convolutions round the ANN and the SNN differently
    x = digits[2].to(DEVICE, torch.float64)
    ann = copy.deepcopy(qcfs_cnn).to(DEVICE, torch.float64).eval()
    snn = convert_qcfs(ann, "tpp", {"count": "exact"}).to(DEVICE, torch.float64)
    functional.set_step_mode(snn, "m")
    with torch.no_grad(), qcfs_levels(ann, T):
        ann_preds = ann(x).argmax(1)
    torch_preds = _predict(snn, x, T, "torch", seed=0)
    cupy_preds = _predict(snn, x, T, "cupy", seed=0)
    assert torch.equal(cupy_preds, torch_preds)
    assert torch.equal(cupy_preds, ann_preds)  # the exact-count oracle, on the GPU


@needs_gpu
@pytest.mark.parametrize("count", ["bernoulli", "unbiased"])
def test_converted_network_random_counts_same_accuracy_as_torch_backend(qcfs_cnn, digits, count):
    T, seeds = 4, 5
    x, y = digits[2].to(DEVICE), digits[3].to(DEVICE)
    snn = convert_qcfs(copy.deepcopy(qcfs_cnn).to(DEVICE), "tpp", {"count": count})
    functional.set_step_mode(snn, "m")
    accuracy = {
        backend: sum(
            (_predict(snn, x, T, backend, seed=10 * s) == y).double().mean().item()
            for s in range(seeds)
        ) / seeds
        for backend in ("torch", "cupy")
    }
    # each image is right or wrong at random: Var(accuracy) <= 1/(4n) per run, so the SE of the
    # difference of two means over `seeds` runs is at most sqrt(2 / (4 n seeds))
    se = (2 / (4 * len(y) * seeds)) ** 0.5
    assert abs(accuracy["cupy"] - accuracy["torch"]) <= 4 * se, accuracy


@needs_gpu
@pytest.mark.parametrize("count", F.COUNT_MODES)
def test_count_mode_on_the_cupy_backend_equals_its_full_simulation(qcfs_cnn, digits, count):
    # float64 so that T·mean and the step-by-step sum land on the same side of every decision
    T = 4
    x = digits[2][:256].to(DEVICE, torch.float64)
    snn = convert_qcfs(copy.deepcopy(qcfs_cnn), "tpp", {"count": count}).to(DEVICE).double()
    functional.set_step_mode(snn, "m")
    full = _predict(snn, x, T, "cupy", seed=0)
    for i, m in enumerate(m for m in snn.modules() if isinstance(m, TPPNode)):
        m.manual_seed(i)
    with torch.no_grad(), tpp_plugin.count_mode(snn, T=T, bernoulli="draw-equal"):
        fast = snn(x).argmax(1)
    assert torch.equal(fast, full)
