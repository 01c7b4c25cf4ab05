"""snnTorch's ``snn.TPP(backend='cupy')``: the firing phase in the CUDA window kernel of
tpp_plugin/kernels/cupy.py (the one SpikingJelly's ``TPPNode(backend='cupy')`` runs).

CPU part (runs everywhere): the backend is validated and refused clearly (unknown backend,
missing CuPy, CPU input, the IF neuron in the converter), and the glue is tested with the kernel
emulated in torch (the ``emulated_kernel`` fixture: the kernel's Philox numbers and firing rule,
which ``tests/test_cupy.py`` holds the real kernel to on a GPU) — one launch per call with every
window, consecutive Philox windows from the seed, ``w = v/θ`` as the torch backend computes it,
pooling, per-channel thresholds, the time loop equal to sequence mode, count mode, and the
exact-count oracle of a converted network.

GPU part (``gpu`` marker, skipped without CUDA + CuPy; not run on CPU-only machines): the real
kernel through ``snn.TPP`` — bit for bit the reference rule on the kernel's own uniforms, exact
counts equal to the torch backend's neuron for neuron, bernoulli and unbiased mean counts within
4 standard errors of ``expected_count`` and ``clamp(w, 0, T)``, and a converted CNN whose
exact-count predictions equal the torch backend's and the QCFS ANN's (float64).
"""

from __future__ import annotations

import copy

import pytest
import torch
from gpu_helpers import kernel_window_uniforms, needs_gpu, needs_nvrtc, philox_words
from torch import nn

import tpp_plugin
from tpp_plugin import functional as F
from tpp_plugin.adapters.snntorch import TPP, convert, reset, steps_needed
from tpp_plugin.kernels import cupy as kernels
from tpp_plugin.qcfs import qcfs_levels

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_snntorch")

T = 4


def window_input(x_seq, T):
    """The window potentials ``[k, ...]`` (sequential sums, as the neuron accumulates)."""
    return torch.stack([F.tpp_accumulate(x_seq[s:s + T]) for s in range(0, len(x_seq), T)])


def reference_spikes(v, T, theta, count, seed, windows_from=0):
    """What the kernel fires for the window potentials ``v`` ``[k, ...]`` of a module seeded
    with ``seed``: window ``j`` takes Philox window ``windows_from + j``, ``w = v/θ`` as the
    torch backend computes it, the reference rule on the kernel's uniforms."""
    out = []
    n = v[0].numel()
    rdtype = torch.float64 if v.dtype == torch.float64 else torch.float32
    for j, vj in enumerate(v):
        def words(d, window=windows_from + j):
            return philox_words(n, window, d, seed, v.device)

        uniforms, rounding = kernel_window_uniforms(words, T, v.dtype, count)
        w = (vj.to(rdtype) / theta).to(rdtype).reshape(n)
        spikes = F.tpp_fire_reference(w, T, 1.0, count, uniforms, rounding)
        out.append(spikes.to(v.dtype).view(T, *vj.shape))
    return torch.cat(out)


def counts_per_window(spikes, T):
    return spikes.view(-1, T, *spikes.shape[1:]).sum(1)


# ================================================================ CPU: refusals
def test_unknown_backend_is_refused_and_changes_nothing():
    for bad in ("cuda", "CuPy", None, 1):
        with pytest.raises(ValueError, match=r"backend must be one of \('torch', 'cupy'\)"):
            TPP(num_steps=T, backend=bad)
    tpp = TPP(num_steps=T)
    assert tpp.backend == "torch" and "backend" not in repr(tpp)
    with pytest.raises(ValueError, match="backend must be one of"):
        tpp.backend = "triton"
    assert tpp.backend == "torch"
    ann = nn.Sequential(nn.Linear(4, 4), tpp_plugin.QCFS(L=T, lam=1.0), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="backend must be one of"):
        convert(ann, num_steps=T, backend="gpu")


def test_missing_cupy_names_the_wheel(no_cupy):
    with pytest.raises(ImportError, match=r"cupy-cuda\d+x"):
        TPP(num_steps=T, backend="cupy")
    ann = nn.Sequential(nn.Linear(4, 4), tpp_plugin.QCFS(L=T, lam=1.0))
    with pytest.raises(ImportError, match=r"cupy-cuda\d+x"):
        convert(ann, num_steps=T, backend="cupy")
    tpp = TPP(num_steps=T)
    with pytest.raises(ImportError, match=r"cupy-cuda\d+x"):
        tpp.backend = "cupy"
    assert tpp.backend == "torch"


@needs_nvrtc
@pytest.mark.parametrize("sequence", [True, False])
def test_cpu_input_is_refused_with_advice_and_state_unchanged(sequence):
    tpp = TPP(num_steps=T, backend="cupy", seed=0, sequence=sequence, init_hidden=True)
    assert tpp.backend == "cupy" and "backend='cupy'" in repr(tpp)
    x = torch.rand(T, 2, 3) if sequence else torch.rand(2, 3)
    name = "input_"
    with pytest.raises(ValueError, match=rf"CUDA tensors, but {name} is on 'cpu'.*backend='torch'"):
        tpp(x)
    with pytest.raises(ValueError, match=r"CUDA tensors, but x_seq is on 'cpu'.*backend='torch'"):
        tpp.forward_sequence(torch.rand(T, 2, 3))
    assert tpp._step == 0 and tpp.mem.numel() == 0 and tpp.random_stream._philox is None


@needs_nvrtc
def test_converter_threads_backend_to_every_tpp_layer():
    ann = nn.Sequential(nn.Linear(4, 8), tpp_plugin.QCFS(L=T, lam=1.0), nn.Linear(8, 8),
                        tpp_plugin.QCFS(L=T, lam=1.0), nn.Linear(8, 2))
    for sequence in (True, False):
        net = convert(ann, num_steps=T, backend="cupy", seed=0, sequence=sequence)
        tpps = [m for m in net.modules() if isinstance(m, TPP)]
        assert len(tpps) == 2 and all(m.backend == "cupy" for m in tpps)
    assert all(m.backend == "torch" for m in convert(ann, num_steps=T).modules()
               if isinstance(m, TPP))
    # the IF neuron has snnTorch's implementation only
    assert convert(ann, num_steps=T, neuron="if", backend="torch") is not None
    with pytest.raises(ValueError, match="IF neuron.*drop backend= or use neuron='tpp'"):
        convert(ann, num_steps=T, neuron="if", backend="cupy")


# ================================================================ CPU: the glue, kernel emulated
@pytest.mark.parametrize("count", F.COUNT_MODES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_sequence_fires_every_window_in_one_launch_from_the_seed(emulated_kernel, count, dtype):
    g = torch.Generator().manual_seed(3)
    x_seq = (torch.rand(3 * T, 5, 7, generator=g) * 1.2 - 0.2).to(dtype)
    theta = 0.7
    tpp = TPP(theta, num_steps=T, count=count, backend="cupy", seed=11, sequence=True,
              graded_spikes_factor=2.0)
    spk, mem = tpp(x_seq)
    assert emulated_kernel == [(3, T, 1.0, count)]  # one launch: 3 windows, w = v/θ, θ = 1
    assert spk.dtype == dtype and mem.dtype == dtype and spk.shape == x_seq.shape
    expected = reference_spikes(window_input(x_seq, T), T, tpp.threshold, count, seed=11)
    assert torch.equal(spk, 2.0 * expected)
    assert torch.equal(mem, TPP(theta, num_steps=T, sequence=True)(x_seq)[1])  # torch's mem
    # the next call takes the next three Philox windows; manual_seed restarts the stream
    again, _ = tpp(x_seq)
    later = reference_spikes(window_input(x_seq, T), T, tpp.threshold, count, 11, windows_from=3)
    assert torch.equal(again, 2.0 * later) and not torch.equal(again, spk)
    tpp.manual_seed(11)
    assert torch.equal(tpp(x_seq)[0], spk)


@pytest.mark.parametrize("count", F.COUNT_MODES)
def test_time_loop_equals_sequence_on_the_cupy_backend(emulated_kernel, count):
    g = torch.Generator().manual_seed(4)
    x_seq = torch.rand(3 * T, 4, 6, generator=g)
    seq, _ = TPP(num_steps=T, count=count, backend="cupy", seed=5, sequence=True)(x_seq)
    loop = TPP(num_steps=T, count=count, backend="cupy", seed=5, streaming="delayed")
    spks = [loop(x)[0] for x in torch.cat([x_seq, torch.zeros_like(x_seq[:T])])]
    assert torch.equal(torch.stack(spks)[T:], seq)  # one window later, the same spikes
    assert [c[0] for c in emulated_kernel] == [3, 1, 1, 1, 1]  # the loop: one per window
    # warm-up windows draw nothing: the first fired window takes Philox window 0
    late = TPP(num_steps=T, count=count, backend="cupy", seed=5, warmup_windows=1,
               streaming="delayed")
    spks = torch.stack([late(x)[0] for x in x_seq])
    assert not spks[:2 * T].any()
    first, _ = TPP(num_steps=T, count=count, backend="cupy", seed=5, sequence=True)(
        x_seq[T:2 * T])
    assert torch.equal(spks[2 * T:], first)


def test_pool_per_channel_threshold_and_exact_counts_match_the_torch_backend(emulated_kernel):
    """Every threshold shape works (the glue hands the kernel w = v/θ); exact counts equal the
    torch backend's neuron for neuron, the max-pool of the window potential included."""
    g = torch.Generator().manual_seed(5)
    x_seq = torch.rand(2 * T, 3, 4, 6, 6, generator=g) * 1.5 - 0.2
    theta = torch.tensor([0.6, 0.9, 1.3, 0.45]).view(4, 1, 1)
    kwargs = dict(num_steps=T, count="exact", pool=nn.MaxPool2d(2), sequence=True, seed=0)
    cupy, _ = TPP(theta, backend="cupy", **kwargs)(x_seq)
    torch_, _ = TPP(theta, **kwargs)(x_seq)
    assert cupy.shape == torch_.shape == (2 * T, 3, 4, 3, 3)
    assert torch.equal(counts_per_window(cupy, T), counts_per_window(torch_, T))
    assert counts_per_window(cupy, T).sum() > 0 and not torch.equal(cupy, torch_)


@pytest.mark.parametrize("count", ["exact", "bernoulli"])
def test_count_mode_on_the_cupy_backend_equals_its_full_simulation(emulated_kernel, qcfs_cnn,
                                                                   digits, count):
    """Exact counts, and bernoulli with draw-equal, fire through the kernel in count mode as in
    the full simulation (the same Philox windows): the same predictions (float64)."""
    x = digits[2][:24].double()
    net = convert(copy.deepcopy(qcfs_cnn).double(), num_steps=T, count=count, seed=1,
                  backend="cupy")
    with torch.no_grad():
        full = net(x.expand(T, *x.shape)).mean(0)
        tpp_plugin.reseed(net)
        with tpp_plugin.count_mode(net, T, bernoulli="draw-equal"):
            fast = net(x)
    torch.testing.assert_close(fast, full, rtol=0, atol=1e-9)


@pytest.mark.parametrize("sequence", [True, False])
def test_exact_converted_cnn_on_the_cupy_backend_is_the_qcfs_ann(emulated_kernel, qcfs_cnn,
                                                                 digits, sequence):
    """The oracle through the kernel's glue: exact-count TPP == the QCFS ANN with L = T, image
    for image (float64), in sequence mode and in the time loop."""
    ann = copy.deepcopy(qcfs_cnn).double().eval()
    x = digits[2][:40].double()
    net = convert(ann, num_steps=T, count="exact", seed=0, backend="cupy", sequence=sequence)
    with torch.no_grad(), qcfs_levels(ann, T):
        ref = ann(x)
        if sequence:
            out = net(x.expand(T, *x.shape)).mean(0)
        else:
            reset(net)
            out = torch.stack([net(x) for _ in range(steps_needed(net))])[-T:].mean(0)
    assert torch.equal(out.argmax(1), ref.argmax(1))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-9)


# ================================================================ GPU
DEVICE = "cuda"


@needs_gpu
@pytest.mark.parametrize("count", F.COUNT_MODES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_kernel_through_snn_tpp_fires_the_reference_on_its_own_uniforms(count, dtype):
    """The whole glue on the real kernel: snn.TPP(backend='cupy') fires, bit for bit, the
    reference rule on the kernel's own Philox uniforms, for the torch backend's w = v/θ."""
    g = torch.Generator(device=DEVICE).manual_seed(1)
    x_seq = (torch.rand(2 * T, 16, 257, generator=g, device=DEVICE) * 1.4 - 0.2).to(dtype)
    tpp = TPP(0.7, num_steps=T, count=count, backend="cupy", seed=21, sequence=True).to(DEVICE)
    spk, _ = tpp(x_seq)
    v = window_input(x_seq, T)
    # the reference on the kernel's own words (kernels.philox4x32, not the emulation)
    n, out = v[0].numel(), []
    rdtype = torch.float64 if dtype == torch.float64 else torch.float32
    for j in range(2):
        def words(d, j=j):
            return kernels.philox4x32(n, window=j, draw=d, seed=21)

        uniforms, rounding = kernel_window_uniforms(words, T, dtype, count)
        w = (v[j].to(rdtype) / tpp.threshold).to(rdtype).reshape(n)
        out.append(F.tpp_fire_reference(w, T, 1.0, count, uniforms, rounding).to(dtype))
    assert torch.equal(spk, torch.cat(out).view_as(spk))


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("steps", [1, 4, 8, 32])
@pytest.mark.parametrize("sequence", [True, False])
def test_exact_counts_equal_torch_backend_for_every_neuron(dtype, steps, sequence):
    g = torch.Generator(device=DEVICE).manual_seed(steps)
    x_seq = (torch.rand(2 * steps, 64, 513, generator=g, device=DEVICE) * 1.6 - 0.3).to(dtype)
    kwargs = dict(num_steps=steps, count="exact", seed=1, sequence=sequence)
    spikes = {}
    for backend in ("torch", "cupy"):
        tpp = TPP(0.7, backend=backend, **kwargs).to(DEVICE)  # a threshold tensor on the GPU
        if sequence:
            spikes[backend] = tpp(x_seq)[0]
        else:  # the time loop: one window later
            xs = torch.cat([x_seq, torch.zeros_like(x_seq[:steps])])
            spikes[backend] = torch.stack([tpp(x)[0] for x in xs])[steps:]
    assert spikes["cupy"].dtype == dtype and spikes["cupy"].shape == x_seq.shape
    assert torch.equal(counts_per_window(spikes["cupy"], steps),
                       counts_per_window(spikes["torch"], steps))
    assert set(spikes["cupy"].unique().tolist()) <= {0.0, 1.0}


@needs_gpu
@pytest.mark.parametrize("count", ["bernoulli", "unbiased"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_random_mean_counts_within_4_standard_errors(count, dtype):
    """Mean count of 20 000 neurons per level within 4 SE of functional.expected_count (the
    sequential rule's exact mean; clamp(w, 0, T) for 'unbiased', plus its 2**-16 grid); whole
    potentials, and those outside [0, T], fire deterministically."""
    steps, theta, n = 8, 0.5, 20_000
    w = torch.tensor([0.0, 0.3, 1.0, 2.5, 4.0, 6.2, 7.7, 8.0, 9.0, -1.0], dtype=torch.float64)
    x_seq = torch.zeros(steps, len(w) * n, dtype=dtype, device=DEVICE)
    x_seq[0] = (w * theta).repeat_interleave(n).to(dtype)  # window sum w·θ, exactly
    tpp = TPP(theta, num_steps=steps, count=count, backend="cupy", seed=7, sequence=True)
    counts = tpp.to(DEVICE)(x_seq)[0].sum(0).double().view(len(w), n).cpu()
    expected = F.expected_count(w * theta, steps, theta, count=count)
    if count == "unbiased":
        assert torch.equal(expected, w.clamp(0, steps))
    low = expected.floor()[:, None]
    assert ((counts == low) | (counts == low + 1)).all()
    whole = w == w.round()
    assert (counts[whole] == w[whole, None].clamp(0, steps)).all()
    se = counts.std(1) / n**0.5
    assert ((counts.mean(1) - expected).abs() <= 4 * se + 2**-16).all(), (counts.mean(1),
                                                                          expected)


@needs_gpu
@pytest.mark.parametrize("steps", [2, 4, 8])
def test_converted_cnn_exact_same_predictions_as_torch_backend(qcfs_cnn, digits, steps):
    """A converted snnTorch CNN on the GPU (float64: no TF32 convolutions): backend='cupy' and
    backend='torch' predict the same, and both are the QCFS ANN with L = T (the oracle)."""
    x = digits[2].to(DEVICE, torch.float64)
    ann = copy.deepcopy(qcfs_cnn).to(DEVICE, torch.float64).eval()
    preds, logits = {}, {}
    for backend in ("torch", "cupy"):
        net = convert(ann, num_steps=steps, count="exact", seed=0, backend=backend)
        assert all(m.backend == backend for m in net.modules() if isinstance(m, TPP))
        with torch.no_grad():
            logits[backend] = net(x.expand(steps, *x.shape)).mean(0)
        preds[backend] = logits[backend].argmax(1)
    with torch.no_grad(), qcfs_levels(ann, steps):
        ref = ann(x)
    assert torch.equal(preds["cupy"], preds["torch"])
    assert torch.equal(preds["cupy"], ref.argmax(1))
    torch.testing.assert_close(logits["cupy"], ref, rtol=0, atol=1e-9)


@needs_gpu
@pytest.mark.parametrize("count", ["exact", "bernoulli"])
def test_converted_cnn_time_loop_and_count_mode_on_the_gpu(qcfs_cnn, digits, count):
    """Same seed: the time loop equals sequence mode, and count mode (draw-equal) the full
    simulation, through the real kernel (float64)."""
    x = digits[2][:256].to(DEVICE, torch.float64)
    ann = copy.deepcopy(qcfs_cnn).to(DEVICE, torch.float64).eval()
    seq = convert(ann, num_steps=T, count=count, seed=3, backend="cupy")
    loop = convert(ann, num_steps=T, count=count, seed=3, backend="cupy", sequence=False)
    with torch.no_grad():
        full = seq(x.expand(T, *x.shape))
        reset(loop)
        looped = torch.stack([loop(x) for _ in range(steps_needed(loop))])[-T:]
        tpp_plugin.reseed(seq)
        with tpp_plugin.count_mode(seq, T, bernoulli="draw-equal"):
            counted = seq(x)
    torch.testing.assert_close(looped, full, rtol=0, atol=1e-9)
    torch.testing.assert_close(counted, full.mean(0), rtol=0, atol=1e-9)
