"""Tests of the snnTorch adapter (tpp_plugin.adapters.snntorch). CPU only, fixed seeds, < 1 min."""

from __future__ import annotations

import copy
import io
import math

import pytest
import snntorch
import snntorch.functional as SF
import snntorch.utils
import torch
from gpu_helpers import ORACLE_DEVICES
from torch import nn

import tpp_plugin
from tpp_plugin import functional as F
from tpp_plugin import registry
from tpp_plugin.adapters import snntorch as adapter
from tpp_plugin.adapters.snntorch import (
    IF,
    TPP,
    TemporalPermutation,
    TimeFlatten,
    convert,
    steps_needed,
)
from tpp_plugin.qcfs import QCFS, qcfs_levels

T = 4


pytestmark = pytest.mark.usefixtures("one_thread", "fresh_snntorch")


def run_loop(neuron, x_seq, pass_mem=False):
    """Feed ``x_seq`` one step per call; return stacked (spk, mem)."""
    spks, mems, mem = [], [], None
    for x in x_seq:
        out = neuron(x, mem) if pass_mem else neuron(x)
        spk, mem = out if isinstance(out, tuple) else (out, None)
        spks.append(spk)
        mems.append(mem)
    return torch.stack(spks), (torch.stack(mems) if mems[0] is not None else None)


def state_of(tpp):
    return tpp.mem.clone(), tpp.pending.clone(), tpp._step, tpp.generator.get_state()


def assert_state_equal(a, b):
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
    assert torch.equal(a[3], b[3])  # no random number was consumed


# ----------------------------------------------------------------------------------------------
# registration
# ----------------------------------------------------------------------------------------------
def test_registration_adds_and_unregister_restores():
    import snntorch as snn

    assert snn.TPP is TPP and snn.TemporalPermutation is TemporalPermutation
    from snntorch import TPP as imported

    assert imported is TPP
    wrapper = snntorch.utils.reset
    assert getattr(wrapper, "__tpp_plugin_wrapper__", False)
    original = wrapper.__wrapped__
    registry.unregister("snntorch")
    try:
        assert not hasattr(snntorch, "TPP") and not hasattr(snntorch, "TemporalPermutation")
        assert snntorch.utils.reset is original
    finally:
        registry.register("snntorch")
    registry.register("snntorch")  # idempotent: wraps once
    assert snntorch.utils.reset.__wrapped__ is original and snntorch.TPP is TPP


def _leaky_run():
    torch.manual_seed(0)
    inner = snntorch.Leaky(beta=0.7, init_hidden=True)
    net = nn.Sequential(
        nn.Linear(5, 8),
        snntorch.Leaky(beta=0.8, init_hidden=True),
        nn.Linear(8, 8),
        nn.Sequential(inner),  # nested: stock reset reaches it only via Leaky.reset_hidden()
        nn.Linear(8, 3),
        snntorch.Leaky(beta=0.9, init_hidden=True, output=True),
    )
    nested_only = nn.Sequential(
        nn.Linear(5, 4), nn.Sequential(snntorch.Leaky(0.9, init_hidden=True))
    )
    x = torch.randn(3, 6, 2, 5)
    outs = []
    for batch in x:
        snntorch.utils.reset(net)
        for step in batch:
            outs.extend(net(step))
    for step in x[0]:
        nested_only(step)
    before = nested_only[1][0].mem.clone()
    snntorch.utils.reset(nested_only)  # stock reset ignores neurons nested only: must stay so
    after = nested_only[1][0].mem
    return torch.stack(outs), before, after


def test_leaky_only_net_identical_with_and_without_plugin():
    with_plugin = _leaky_run()
    registry.unregister("snntorch")
    try:
        snntorch.SpikingNeuron.init()
        without = _leaky_run()
    finally:
        registry.register("snntorch")
    for a, b in zip(with_plugin, without):
        assert torch.equal(a, b)
    assert with_plugin[0].abs().sum() > 0


# ----------------------------------------------------------------------------------------------
# TPP neuron: returns, state, resets
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sequence", [False, True])
@pytest.mark.parametrize("init_hidden,output", [(False, False), (False, True), (True, False),
                                                (True, True)])
def test_return_signatures(init_hidden, output, sequence):
    tpp = TPP(num_steps=T, init_hidden=init_hidden, output=output, sequence=sequence, seed=0)
    x = torch.full((T, 2, 3) if sequence else (2, 3), 0.5)
    out = tpp(x)
    if output or not init_hidden:
        spk, mem = out
        assert spk.shape == mem.shape == x.shape
    else:
        assert isinstance(out, torch.Tensor) and out.shape == x.shape
    seq_out = tpp.forward_sequence(torch.full((T, 2, 3), 0.5))
    assert isinstance(seq_out, tuple) == (output or not init_hidden)


def test_time_loop_delays_by_one_window_and_mem_is_window_potential():
    tpp = TPP(threshold=0.5, num_steps=T, count="exact", v_init=0.25, seed=0, streaming="delayed")
    x = torch.tensor([[0.5, 0.25, 1.0]])
    spk, mem = run_loop(tpp, x.expand(3 * T, 1, 3))
    assert spk[:T].abs().sum() == 0  # first window: accumulate only
    # window potential 0.25 + 4·x = [2.25, 1.25, 4.25] → exact counts round(v/θ) = [4(.5), 2(.5), 4]
    assert torch.equal(spk[T:2 * T].sum(0), torch.tensor([[4.0, 3.0, 4.0]]))
    assert torch.equal(mem[T - 1], torch.tensor([[2.25, 1.25, 4.25]]))
    assert torch.equal(mem[T], 0.25 + x)  # the next window starts again from v_init


def test_utils_reset_resets_tpp_in_nested_containers():
    tpp = TPP(num_steps=T, init_hidden=True, seed=0, streaming="delayed")
    net = nn.Sequential(nn.Identity(), nn.Sequential(nn.Sequential(tpp)))
    x = torch.full((2, 3), 0.6)
    for _ in range(T + 2):
        net(x)
    assert tpp._step == 2 and tpp.pending.shape == (T, 2, 3) and tpp.mem.abs().sum() > 0

    registry.unregister("snntorch")  # stock reset does not know TPP ...
    try:
        snntorch.utils.reset(net)
        assert tpp._step == 2
        adapter.reset(net)  # ... the adapter's reset does, registered or not
        assert tpp._step == 0
    finally:
        registry.register("snntorch")

    for _ in range(T + 2):
        net(x)
    snntorch.utils.reset(net)
    assert tpp._step == 0 and tpp.pending.numel() == 0 and not tpp.mem.any()
    out = torch.stack([net(x) for _ in range(T)])
    assert not out.any()  # nothing left from before the reset: the first window is silent again

    for _ in range(T + 1):
        net(x)
    TPP.reset_hidden()
    assert tpp._step == 0 and tpp.pending.numel() == 0


def test_detach_hidden():
    tpp = TPP(num_steps=T, init_hidden=True, streaming="delayed")
    w = torch.ones(3, requires_grad=True)
    tpp(w * 0.5)
    assert tpp.mem.requires_grad
    TPP.detach_hidden()
    assert not tpp.mem.requires_grad


def test_state_follows_dtype():
    tpp = TPP(threshold=0.75, num_steps=T, init_hidden=True, seed=0, streaming="delayed")
    x = torch.full((2, 3), 0.6)
    for _ in range(T + 1):
        tpp(x)
    mem32 = tpp.mem.clone()
    tpp.to(torch.float64)
    assert tpp.mem.dtype == tpp.pending.dtype == tpp.threshold.dtype == torch.float64
    assert torch.equal(tpp.mem, mem32.double()) and tpp._step == 1
    out = tpp(x.double())
    assert out.dtype == torch.float64 and tpp.mem.dtype == torch.float64


def test_state_dict_round_trip_without_state():
    a = TPP(threshold=0.7, num_steps=T, v_init=0.1, graded_spikes_factor=0.7, seed=0,
            streaming="delayed")
    for _ in range(T + 1):
        a(torch.full((2, 3), 0.4))
    sd = a.state_dict()
    assert set(sd) == {"threshold", "graded_spikes_factor", "reset_mechanism_val", "v_init"}
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    b = TPP(threshold=1.0, num_steps=T, streaming="delayed")
    b.load_state_dict(torch.load(buf))
    assert float(b.threshold) == pytest.approx(0.7) and float(b.v_init) == pytest.approx(0.1)
    assert float(b.graded_spikes_factor) == pytest.approx(0.7)
    assert b.mem.numel() == 0 and b._step == 0  # state is not part of the state_dict


def test_bad_seed_or_generator():
    with pytest.raises(ValueError, match="seed or generator"):
        TPP(num_steps=T, seed=0, generator=torch.Generator())
    with pytest.raises(TypeError, match="generator"):
        TPP(num_steps=T, generator=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_state_and_seeded_generator_follow_the_device():
    x = torch.rand(2 * T, 5, 7, device="cuda")
    loop = TPP(num_steps=T, seed=1, streaming="delayed").to("cuda")
    seq = TPP(num_steps=T, seed=1, sequence=True).to("cuda")
    spk_loop, _ = run_loop(loop, torch.cat([x, x[:T]]))
    spk_seq, _ = seq(x)
    assert loop.mem.is_cuda and loop.pending.is_cuda and loop.generator.device.type == "cuda"
    assert torch.equal(spk_loop[T:], spk_seq)


# ----------------------------------------------------------------------------------------------
# loop mode == sequence mode; randomness
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("count", ["bernoulli", "exact"])
@pytest.mark.parametrize("pass_mem", [False, True])
def test_loop_equals_sequence_bit_for_bit(count, pass_mem):
    k = 3
    x = (torch.rand(k * T, 5, 7, generator=torch.Generator().manual_seed(1)) - 0.2) * 0.8
    loop = TPP(threshold=0.6, num_steps=T, count=count, v_init=0.05, seed=123, streaming="delayed")
    seq = TPP(threshold=0.6, num_steps=T, count=count, v_init=0.05, seed=123, sequence=True)
    spk_loop, mem_loop = run_loop(loop, torch.cat([x, torch.zeros(T, 5, 7)]), pass_mem)
    spk_seq, mem_seq = seq(x)
    assert torch.equal(spk_loop[T:], spk_seq)  # delay removed
    assert torch.equal(mem_loop[: k * T], mem_seq)
    assert 0 < spk_seq.sum() < spk_seq.numel()
    # the same with a shared torch.Generator, via forward_sequence
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    spk_loop, _ = run_loop(TPP(num_steps=T, count=count, generator=g1, streaming="delayed"),
                           torch.cat([x, x[:T]]))
    spk_seq, _ = TPP(num_steps=T, count=count, generator=g2).forward_sequence(x)
    assert torch.equal(spk_loop[T:], spk_seq)


def test_same_seed_same_spikes_different_seed_different():
    x = torch.rand(T, 50, 20, generator=torch.Generator().manual_seed(0))
    a, b, c = (TPP(num_steps=T, seed=s, sequence=True, init_hidden=True) for s in (7, 7, 8))
    sa, sb, sc = a(x), b(x), c(x)
    assert torch.equal(sa, sb) and not torch.equal(sa, sc)


def test_bernoulli_mean_count_and_exact_positions():
    # Bernoulli rule: the mean count is functional.expected_count (clamp(v/θ, 0, T) for whole or
    # out-of-range v/θ; a little more for fractional v/θ). n = 4000 neurons per value; tolerance
    # 5 standard errors of the mean, from the sample standard deviation (<= T/2 = 2, SE <= 0.032).
    n, theta = 4000, 0.5
    w = torch.tensor([-1.0, 0.3, 1.0, 1.5, 2.7, 3.0, 3.9, 6.0])  # v/θ
    tpp = TPP(threshold=theta, num_steps=T, seed=0, sequence=True, init_hidden=True)
    x = (w * theta / T).repeat(n, 1).expand(T, n, len(w))  # Σ_t x_t = v
    counts = tpp(x).sum(0)
    mean, sd = counts.mean(0), counts.std(0)
    expected = F.expected_count(w * theta, T, theta).float()
    assert torch.all((mean - expected).abs() <= 5 * sd / math.sqrt(n) + 1e-6), (mean, expected)
    whole = torch.tensor([True, False, True, False, False, True, False, True])
    assert torch.all(sd[whole] == 0) and torch.equal(mean[whole], w[whole].clamp(0, T))  # fact 1
    # exact count, v = 1·θ: one spike on a uniformly random slot (fact 1). Each slot's frequency
    # has SE sqrt(¼·¾/n) = 0.0068 at n = 4000; tolerance 5 SE = 0.034.
    exact = TPP(threshold=theta, num_steps=T, count="exact", seed=1, sequence=True)
    spk, _ = exact(torch.full((T, n), theta / T))
    assert torch.all(spk.sum(0) == 1)
    freq = spk.mean(1)
    assert torch.all((freq - 1 / T).abs() < 5 * math.sqrt(0.25 * 0.75 / n)), freq


def test_steps_needed():
    make = lambda: TPP(num_steps=T, init_hidden=True, streaming="delayed")  # noqa: E731
    net = nn.Sequential(nn.Linear(3, 3), make(), nn.Sequential(nn.Linear(3, 3), make()), make())
    assert steps_needed(net, T) == 4 * T
    assert steps_needed(net) == 4 * T  # window taken from the layers
    assert steps_needed(nn.Sequential(nn.Linear(3, 3)), 5) == 5
    seq_only = nn.Sequential(TPP(num_steps=T, sequence=True))
    assert steps_needed(seq_only, T) == T  # sequence mode has no delay
    with pytest.raises(ValueError, match="num_steps"):
        steps_needed(nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(ValueError, match="num_steps"):
        steps_needed(net, 0)


# ----------------------------------------------------------------------------------------------
# bad input: clear errors, state unchanged
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bad,exc,name",
    [
        (torch.zeros(2), ValueError, "input_"),  # wrong rank mid-window
        (torch.zeros(2, 4), ValueError, "input_"),  # wrong shape mid-window
        (torch.tensor([[0.1, float("nan"), 0.1]] * 2), ValueError, "input_"),
        (torch.tensor([[0.1, float("inf"), 0.1]] * 2), ValueError, "input_"),
        (torch.ones(2, 3, dtype=torch.long), TypeError, "input_"),
        ([[0.1] * 3] * 2, TypeError, "input_"),
    ],
)
def test_bad_step_input_leaves_state_unchanged(bad, exc, name):
    tpp = TPP(num_steps=T, seed=0, streaming="delayed")
    for _ in range(T + 2):  # a pending window and a half-accumulated one
        tpp(torch.full((2, 3), 0.6))
    before = state_of(tpp)
    with pytest.raises(exc, match=name):
        tpp(bad)
    assert_state_equal(state_of(tpp), before)


def test_bad_mem_and_sequence_input():
    tpp = TPP(num_steps=T, seed=0, streaming="delayed")
    tpp(torch.full((2, 3), 0.6))
    before = state_of(tpp)
    with pytest.raises(ValueError, match="mem"):
        tpp(torch.full((2, 3), 0.6), torch.zeros(3, 2))
    with pytest.raises(TypeError, match="mem"):
        TPP(num_steps=T, init_hidden=True)(torch.zeros(2), torch.zeros(2))
    with pytest.raises(ValueError, match="input_"):
        TPP(num_steps=T, sequence=True)(torch.zeros(T))  # rank 1: no batch dimension
    with pytest.raises(ValueError, match="num_steps"):
        tpp.forward_sequence(torch.zeros(T + 2, 3))  # not a whole number of windows
    with pytest.raises(ValueError, match="x_seq"):
        tpp.forward_sequence(torch.full((T, 3), float("nan")))
    assert_state_equal(state_of(tpp), before)


@pytest.mark.parametrize(
    "kwargs,exc,name",
    [
        (dict(num_steps=0), ValueError, "num_steps"),
        (dict(num_steps=-3), ValueError, "num_steps"),
        (dict(num_steps=2.0), TypeError, "num_steps"),
        (dict(num_steps=T, count="poisson"), ValueError, "count"),
        (dict(num_steps=T, threshold=0.0), ValueError, "threshold"),
        (dict(num_steps=T, threshold=float("nan")), ValueError, "threshold"),
        (dict(num_steps=T, v_init=float("inf")), TypeError, "v_init"),
        (dict(num_steps=T, seed="0"), TypeError, "seed"),
        (dict(num_steps=T, warmup_windows=-1), ValueError, "warmup_windows"),
    ],
)
def test_bad_constructor_arguments(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        TPP(**kwargs)
    assert snntorch.SpikingNeuron.instances == []  # nothing half-built was registered


# ----------------------------------------------------------------------------------------------
# IF with θ/2 start, temporal permutation
# ----------------------------------------------------------------------------------------------
def test_if_starts_at_half_threshold_like_a_leaky_with_mem_set():
    theta = 0.75
    x = torch.randint(-2, 6, (12, 4, 5), generator=torch.Generator().manual_seed(0)) / 8.0
    ref = snntorch.Leaky(beta=1.0, threshold=theta, reset_mechanism="subtract")
    mem, ref_out = torch.full((4, 5), theta / 2), []
    for step in x:
        spk, mem = ref(step, mem)
        ref_out.append(spk)
    ref_spk = torch.stack(ref_out)
    assert 0 < ref_spk.sum() < ref_spk.numel()

    neuron = IF(threshold=theta)
    spk, mem_if = run_loop(neuron, x)
    assert torch.equal(spk, ref_spk)
    assert torch.equal(mem_if[-1], mem)  # dyadic inputs: no rounding either way
    spk2, _ = run_loop(IF(threshold=theta), x, pass_mem=True)
    assert torch.equal(spk2, ref_spk)
    seq_spk, _ = IF(threshold=theta, sequence=True)(x)
    assert torch.equal(seq_spk, ref_spk)

    # the θ/2 start survives every reset: wrapped utils.reset, stock utils.reset, reset_hidden
    net = nn.Sequential(nn.Identity(), IF(threshold=theta, init_hidden=True))
    first = torch.stack([net(s) for s in x])
    assert torch.equal(first, ref_spk)
    for do_reset in (snntorch.utils.reset, snntorch.utils.reset.__wrapped__,
                     lambda _: snntorch.Leaky.reset_hidden(), adapter.reset):
        do_reset(net)
        assert torch.equal(torch.stack([net(s) for s in x]), ref_spk)
    # nested only, where stock utils.reset does not look: the wrapped reset still resets it
    nested = nn.Sequential(nn.Identity(), nn.Sequential(IF(threshold=theta, init_hidden=True)))
    for _ in range(2):
        snntorch.utils.reset(nested)
        assert torch.equal(torch.stack([nested(s) for s in x]), ref_spk)


@pytest.mark.parametrize("scope", ["neuron", "sample", "layer"])
def test_temporal_permutation_keeps_counts(scope):
    spk = (torch.rand(8, 6, 10, generator=torch.Generator().manual_seed(0)) < 0.4).float()
    a, b = TemporalPermutation(scope, seed=3), TemporalPermutation(scope, seed=3)
    out = a(spk)
    assert torch.equal(out.sum(0), spk.sum(0)) and not torch.equal(out, spk)
    assert torch.equal(out, b(spk))
    with pytest.raises(ValueError, match="scope"):
        TemporalPermutation("time")


# ----------------------------------------------------------------------------------------------
# converter
# ----------------------------------------------------------------------------------------------
def _digits(dtype=torch.float32):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=dtype).unsqueeze(1) / 16.0
    return x, torch.tensor(d.target)


@pytest.fixture(scope="module")
def qcfs_digits_cnn():
    """A small QCFS CNN (nested Sequential, BN, avg-pool, dropout) trained briefly on digits."""
    torch.manual_seed(0)
    x, y = _digits()
    ann = nn.Sequential(
        nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), QCFS(L=4, lam=2.0)),
        nn.AvgPool2d(2),
        nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), QCFS(L=4, lam=2.0)),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.1),
        nn.Linear(64, 32),
        QCFS(L=4, lam=2.0),
        nn.Linear(32, 10),
    )
    opt = torch.optim.Adam(ann.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        idx = torch.randint(0, len(y), (128,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(ann(x[idx]), y[idx]).backward()
        opt.step()
    ann = ann.eval().double()  # float64: no potential sits on a rounding boundary by accident
    with torch.no_grad():
        assert (ann(x.double()).argmax(1) == y).float().mean() > 0.85  # a meaningful model
    return ann, x.double(), y


#: the oracle on the CPU, and on a GPU with either TPP backend (model and images on the device)
DEVICES = ORACLE_DEVICES


@pytest.mark.parametrize("device, backend", DEVICES)
@pytest.mark.parametrize("T_", [1, 2, 4, 8])
def test_exact_tpp_conversion_equals_qcfs_ann(qcfs_digits_cnn, T_, device, backend):
    ann, x, _ = qcfs_digits_cnn  # float64
    with torch.no_grad(), qcfs_levels(ann, T_):
        ref = ann(x).to(device)  # computed on the CPU
    if device != "cpu":
        ann, x = copy.deepcopy(ann).to(device), x.to(device)
    net = convert(ann, num_steps=T_, count="exact", seed=0, backend=backend)
    assert sum(isinstance(m, TPP) and m.backend == backend for m in net) == 3
    with torch.no_grad():
        out = net(x.expand(T_, *x.shape))
    assert out.device.type == device
    assert torch.equal(out.sum(0).argmax(1), ref.argmax(1))  # image for image
    # the logits too: one hidden count off would move them by ~θ/T·|w| >> 1e-9
    torch.testing.assert_close(out.mean(0), ref, rtol=0, atol=1e-9)


def test_exact_tpp_conversion_time_loop(qcfs_digits_cnn):
    ann, x, _ = qcfs_digits_cnn
    x = x[:300]
    net = convert(ann, num_steps=T, count="exact", seed=0, sequence=False, streaming="delayed")
    n_steps = steps_needed(net, T)
    assert n_steps == 4 * T
    adapter.reset(net)
    with torch.no_grad():
        out = torch.stack([net(x) for _ in range(n_steps)])
        with qcfs_levels(ann, T):
            ref = ann(x)
    torch.testing.assert_close(out[-T:].mean(0), ref, rtol=0, atol=1e-9)  # the last window
    # before it, every TPP layer is silent (warm-up): the output is the last layer's bias only
    bias = net[-1].bias.expand(len(x), 10)
    assert all(torch.equal(o, bias) for o in out[:-T])


def test_bernoulli_conversion_time_loop_equals_sequence(qcfs_digits_cnn):
    # same seed ⇒ same spikes in both modes, through three TPP layers: the warm-up windows of the
    # deeper layers draw no random numbers. (Float64: the summation orders differ, far below any
    # spike decision; one different spike would move the logits by ~θ/T·|w| >> 1e-9.)
    ann, x, _ = qcfs_digits_cnn
    x = x[:300]
    loop = convert(ann, num_steps=T, seed=3, sequence=False, streaming="delayed")
    seq = convert(ann, num_steps=T, seed=3)
    assert [m.warmup_windows for m in loop if isinstance(m, TPP)] == [0, 1, 2]
    with torch.no_grad():
        out_loop = torch.stack([loop(x) for _ in range(steps_needed(loop))])[-T:]
        out_seq = seq(x.expand(T, *x.shape))
        other = convert(ann, num_steps=T, seed=4)(x.expand(T, *x.shape))
    torch.testing.assert_close(out_loop, out_seq, rtol=0, atol=1e-9)
    assert (other - out_seq).abs().max() > 1e-3  # a different seed does give different spikes


def test_warmup_windows_stay_silent_and_draw_nothing():
    x = torch.rand(3 * T, 4, 6, generator=torch.Generator().manual_seed(2))
    late = TPP(num_steps=T, seed=9, warmup_windows=1, streaming="delayed")
    spk, _ = run_loop(late, x)
    assert not spk[: 2 * T].any()
    ref, _ = TPP(num_steps=T, seed=9, sequence=True)(x[T:2 * T])  # no draws for window 1
    assert torch.equal(spk[2 * T:], ref) and ref.any()
    late.reset_mem()
    spk_again, _ = run_loop(late, x)
    assert not spk_again[: 2 * T].any()  # the warm-up starts again after a reset


def test_converter_neurons_are_registered_snntorch_neurons(qcfs_digits_cnn):
    ann, _, _ = qcfs_digits_cnn
    net = convert(ann, num_steps=T, seed=0)
    neurons = [m for m in net.modules() if isinstance(m, snntorch.SpikingNeuron)]
    assert len(neurons) == 3
    assert all(any(n is i for i in snntorch.SpikingNeuron.instances) for n in neurons)
    lams = [m.threshold for m in ann.modules() if isinstance(m, QCFS)]
    for neuron, lam in zip(neurons, lams):
        assert float(neuron.threshold) == lam == float(neuron.graded_spikes_factor)
        assert neuron.threshold.dtype == torch.float64
    # the ANN's layers are copies, not shared, and dropout is gone
    assert not any(isinstance(m, nn.Dropout) for m in net.modules())
    assert net[0].module is not ann[0][0] and torch.equal(net[0].module.weight, ann[0][0].weight)
    # per-layer seeds: two TPP layers never share a random stream
    assert len({n.seed for n in neurons}) == 3


@pytest.mark.parametrize("neuron", ["if", "tpp"])
def test_relu_conversion_with_calibration(neuron):
    torch.manual_seed(0)
    x, y = _digits()
    x = x.flatten(1)
    ann = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    batches = [(x[:500], y[:500])]
    with pytest.raises(ValueError, match="calibration"):
        convert(ann, num_steps=T, neuron=neuron)
    net = convert(ann, batches, num_steps=T, neuron=neuron, mode="max")
    cell = net[1]
    assert isinstance(cell, IF if neuron == "if" else TPP)
    with torch.no_grad():
        assert float(cell.threshold) == pytest.approx(float(ann[1](ann[0](x[:500])).max()))
        out = net(x.expand(T, *x.shape))
    assert out.shape == (T, len(y), 10) and isinstance(net[0], TimeFlatten)
    # snnTorch's own accuracy on the summed output works on the converted net
    assert 0.0 <= SF.accuracy_rate(out, y) <= 1.0
    if neuron == "if":  # deterministic: the time-loop net gives the same output
        loop = convert(ann, batches, num_steps=T, neuron="if", sequence=False)
        with torch.no_grad():
            out_loop = torch.stack([loop(x) for _ in range(T)])
        torch.testing.assert_close(out_loop, out)


def test_converter_permutation_layers():
    ann = nn.Sequential(nn.Linear(4, 4), QCFS(L=4, lam=1.0), nn.Linear(4, 2))
    net = convert(ann, num_steps=T, neuron="if", permutation="neuron", seed=0)
    assert isinstance(net[2], TemporalPermutation)
    with pytest.raises(ValueError, match="sequence"):
        convert(ann, num_steps=T, permutation="neuron", sequence=False, streaming="delayed")


def test_converter_refuses_unsupported_modules():
    with pytest.raises(TypeError, match=r"'1'.*torch\.nn\.modules\.activation\.Tanh"):
        convert(nn.Sequential(nn.Linear(3, 3), nn.Tanh()), num_steps=T)
    with pytest.raises(TypeError, match=r"'0\.1'.*LSTM"):
        convert(nn.Sequential(nn.Sequential(nn.Linear(3, 3), nn.LSTM(3, 3))), num_steps=T)
    with pytest.raises(TypeError, match="nn.Module"):
        convert(lambda x: x, num_steps=T)
    with pytest.raises(TypeError, match="threshold"):
        convert(nn.Sequential(nn.Linear(3, 3)), num_steps=T, threshold=1.0)
    with pytest.raises(TypeError, match="warmup_windows"):
        convert(nn.Sequential(nn.Linear(3, 3)), num_steps=T, warmup_windows=1)
    with pytest.raises(ValueError, match="num_steps"):
        convert(nn.Sequential(nn.Linear(3, 3)), num_steps=0)
    with pytest.raises(ValueError, match="neuron"):
        convert(nn.Sequential(nn.Linear(3, 3)), num_steps=T, neuron="lif")
    assert snntorch.SpikingNeuron.instances == []
    pooled = nn.Sequential(nn.Conv2d(1, 2, 3), QCFS(L=2, lam=1.0), nn.MaxPool2d(2))
    assert convert(pooled, num_steps=T)[1].pool is not None  # TPP pools its window potential
    assert isinstance(convert(pooled, num_steps=T, neuron="if")[2].module, nn.MaxPool2d)


# ----------------------------------------------------------------------------------------------
# the window-synchronous time loop (the default)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("count", ["exact", "bernoulli"])
def test_tutorial_time_loop_on_a_sequential_cnn_equals_sequence_mode(qcfs_digits_cnn, count):
    """snnTorch's tutorial loop with num_steps = T on a converted Sequential CNN: step t is
    sequence mode's step t (float64; bernoulli with the same draws), and exact counts give the
    QCFS ANN with L = T."""
    ann, x, _ = qcfs_digits_cnn
    x = x[:200]
    loop = convert(ann, num_steps=T, count=count, seed=1, sequence=False)
    seq = convert(ann, num_steps=T, count=count, seed=1)
    snntorch.utils.reset(loop)
    with torch.no_grad():
        steps = torch.stack([loop(x) for step in range(T)])
        assert torch.equal(steps, seq(x.expand(T, *x.shape)))
        if count == "exact":
            with qcfs_levels(ann, T):
                torch.testing.assert_close(steps.mean(0), ann(x), rtol=0, atol=1e-9)
        with tpp_plugin.count_mode(loop, T):  # the loop steps aside: one ANN-sized pass
            counted = loop(x)
    if count == "exact":
        torch.testing.assert_close(counted, steps.mean(0), rtol=0, atol=1e-9)


def test_single_tpp_neuron_time_loop_is_synchronous_by_default():
    x = torch.rand(5, 3, generator=torch.Generator().manual_seed(0))
    loop = TPP(num_steps=T, count="bernoulli", seed=2)
    seq = TPP(num_steps=T, count="bernoulli", seed=2, sequence=True)
    out = [loop(x) for _ in range(T)]
    spk_seq, mem_seq = seq(x.expand(T, 5, 3))
    assert torch.equal(torch.stack([s for s, _ in out]), spk_seq)
    assert torch.equal(torch.stack([m for _, m in out]), mem_seq)
    assert steps_needed(loop) == T
    loop(x)
    with pytest.raises(ValueError, match="differs from the first call.*streaming='delayed'"):
        loop(x + 1)
    loop.reset_mem()
    loop(x + 1)  # a new window
