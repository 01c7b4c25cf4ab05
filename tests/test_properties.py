"""Property-based tests (Hypothesis) of the TPP neuron and the permutation.

Shapes (zero-size included), dtypes, window lengths, thresholds, seeds and counts are drawn by
Hypothesis; the properties are exact (bit-for-bit), so no statistical tolerance is involved.
Each test is bounded (``max_examples``, small shapes) so the default suite stays fast.
"""

import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import tpp_plugin  # noqa: E402
from tpp_plugin import functional as F  # noqa: E402

snt = pytest.importorskip("tpp_plugin.adapters.snntorch")

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]

shapes = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)
windows = st.integers(1, 12)
seeds = st.integers(0, 2**64 - 1)
counts = st.sampled_from(F.COUNT_MODES)
dtypes = st.sampled_from(DTYPES)
thresholds = st.sampled_from([1.0, 0.37, 1e-3, 7.5, 1e4])


@st.composite
def potentials(draw, shape=None, dtype=None):
    """A finite potential tensor in a dtype: small values, rounding-boundary values, and huge
    ones (beyond 2**24 and up to the dtype's largest finite value)."""
    shape = draw(shapes) if shape is None else shape
    dtype = draw(dtypes) if dtype is None else dtype
    finfo = torch.finfo(dtype)
    scale = draw(st.sampled_from([1.0, 8.0, 2.0**25, float(finfo.max) / 4]))
    n = math.prod(shape)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    v = (torch.rand(n, generator=g, dtype=torch.float64) * 2.2 - 0.2) * scale
    return v.clamp(-float(finfo.max), float(finfo.max)).to(dtype).view(shape)


def generator(seed):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------
# count == fire.sum(0)
# ------------------------------------------------------------------------------------------------
@SETTINGS
@given(v=potentials(), T=windows, threshold=thresholds, count=counts, seed=seeds)
def test_count_equals_fired_spikes(v, T, threshold, count, seed):
    fired = F.tpp_fire(v, T, threshold, count, generator(seed))
    assert fired.shape == (T, *v.shape) and fired.dtype == v.dtype
    counted = F.tpp_count(v, T, threshold, count, generator(seed))
    assert torch.equal(fired.sum(0, dtype=torch.float64), counted.double())
    assert bool(((counted >= 0) & (counted <= T)).all())


@SETTINGS
@given(v=potentials(), T=windows, threshold=thresholds, seed=seeds)
def test_exact_count_is_rounded_potential(v, T, threshold, seed):
    w = v.to(torch.float64 if v.dtype == torch.float64 else torch.float32) / threshold
    expected = torch.floor(w + 0.5).clamp(0, T)
    assert torch.equal(F.tpp_count(v, T, threshold, "exact").to(expected.dtype), expected)
    spikes = F.tpp_fire(v, T, threshold, "exact", generator(seed))
    assert torch.equal(spikes.sum(0).to(expected.dtype), expected)


@SETTINGS
@given(v=potentials(dtype=torch.float32), T=windows, count=counts, seed=seeds,
       data=st.data())
def test_tensor_threshold_equals_scalar_threshold(v, T, count, seed, data):
    threshold = data.draw(thresholds)
    th = torch.full(v.shape[-1:] if v.dim() else (), threshold)
    a = F.tpp_fire(v, T, threshold, count, generator(seed))
    b = F.tpp_fire(v, T, th, count, generator(seed))
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# streaming == multi-step
# ------------------------------------------------------------------------------------------------
@SETTINGS
@given(v=potentials(dtype=torch.float32), T=windows, count=counts, seed=seeds)
def test_predrawn_window_uniforms_equal_drawing_inside(v, T, count, seed):
    """Randomness drawn at the window boundary: a streaming caller that pre-draws the window's
    uniforms gets the spikes of a one-shot call."""
    g = generator(seed)
    rounding = None  # 'unbiased' draws its rounding uniforms first, then the window's
    if count == "unbiased":
        rounding = F._rounding_uniforms(v.numel(), "cpu", g, torch.float32).view(v.shape)
    u = F.window_uniforms(v.shape, T, "cpu", v.dtype, g)
    assert torch.equal(F.tpp_fire(v, T, 1.0, count, uniforms=u, rounding=rounding),
                       F.tpp_fire(v, T, 1.0, count, generator(seed)))


@SETTINGS
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=2).map(tuple),
       T=st.integers(1, 5), k=st.integers(1, 3), count=counts, seed=st.integers(0, 2**63),
       data=st.data())
def test_snntorch_time_loop_equals_sequence(shape, T, k, count, seed, data):
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    x = (torch.rand(k * T, *shape, generator=g) * 2 - 0.3) / 4
    seq = snt.TPP(num_steps=T, count=count, seed=seed, sequence=True, init_hidden=True)
    loop = snt.TPP(num_steps=T, count=count, seed=seed, init_hidden=True, streaming="delayed")
    expected = seq(x)
    steps = [loop(x[t]) for t in range(k * T)] + [loop(torch.zeros(shape)) for _ in range(T)]
    assert torch.equal(torch.stack(steps[T:]), expected)


@SETTINGS
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=2).map(tuple),
       T=st.integers(1, 5), k=st.integers(1, 3), count=counts, seed=st.integers(0, 2**63),
       data=st.data())
def test_snntorch_synchronous_time_loop_equals_sequence(shape, T, k, count, seed, data):
    """The default time loop: an input constant within each window gives sequence mode's
    spikes step for step, with no delay, window after window."""
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    per_window = (torch.rand(k, *shape, generator=g) * 2 - 0.3) / 4
    x = per_window.repeat_interleave(T, dim=0)
    seq = snt.TPP(num_steps=T, count=count, seed=seed, sequence=True, init_hidden=True)
    loop = snt.TPP(num_steps=T, count=count, seed=seed, init_hidden=True)
    assert torch.equal(torch.stack([loop(x[t]) for t in range(k * T)]), seq(x))


# ------------------------------------------------------------------------------------------------
# count mode == full simulation
# ------------------------------------------------------------------------------------------------
@SETTINGS
@given(n=st.integers(0, 6), T=st.integers(1, 8), count=counts, seed=st.integers(0, 2**63),
       threshold=st.sampled_from([1.0, 0.375, 2.5]), data=st.data())
def test_count_mode_equals_full_simulation(n, T, count, seed, threshold, data):
    """Dyadic inputs in float64: the window sum and T·mean are both exact, so the counts agree
    bit for bit (the only caveat of count mode is rounding of the potential)."""
    q = data.draw(st.lists(st.integers(-8, 40), min_size=3 * n, max_size=3 * n))
    x = torch.tensor(q, dtype=torch.float64).view(n, 3) / 8
    net = torch.nn.Sequential(snt.TPP(threshold=threshold, num_steps=T, count=count, seed=seed,
                                      sequence=True, init_hidden=True)).double()
    with torch.no_grad():
        full = net(x.expand(T, *x.shape)).mean(0)
        tpp_plugin.reseed(net)
        with tpp_plugin.count_mode(net, T=T, bernoulli="draw-equal"):
            counted = net(x)
    assert torch.equal(full, counted)


# ------------------------------------------------------------------------------------------------
# permutation preserves counts
# ------------------------------------------------------------------------------------------------
@SETTINGS
@given(T=st.integers(1, 9), shape=st.lists(st.integers(0, 4), min_size=1, max_size=3).map(tuple),
       scope=st.sampled_from(F.PERMUTATION_SCOPES), spikes=st.booleans(), seed=seeds,
       dtype=st.sampled_from([torch.float16, torch.float32, torch.float64]))
def test_permutation_preserves_counts_and_values(T, shape, scope, spikes, seed, dtype):
    g = torch.Generator().manual_seed(seed % 2**31)
    x = torch.rand(T, *shape, generator=g)
    x = ((x < 0.4) if spikes else x * 10).to(dtype)
    out = F.permute_time(x, scope, generator(seed))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out.sum(0, dtype=torch.float64), x.sum(0, dtype=torch.float64)) or (
        not spikes and torch.allclose(out.double().sum(0), x.double().sum(0))
    )
    assert torch.equal(out.sort(0).values, x.sort(0).values)
    module = snt.TemporalPermutation(scope, seed=seed % 2**63)
    if x.numel():
        assert torch.equal(module(x).sort(0).values, x.sort(0).values)


# ------------------------------------------------------------------------------------------------
# a rejected input changes nothing
# ------------------------------------------------------------------------------------------------
def _bad_inputs(shape):
    """Inputs a neuron fed with ``shape`` must refuse."""
    wrong = (*shape[:-1], shape[-1] + 1)
    return {
        "wrong_shape": torch.ones(wrong),
        "nan": torch.full(shape, math.nan),
        "inf": torch.full(shape, math.inf),
        "int": torch.ones(shape, dtype=torch.int64),
        "complex": torch.ones(shape, dtype=torch.cfloat),
        "list": [1.0] * shape[0],
        "meta": torch.ones(shape, device="meta"),
    }


@SETTINGS
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=2).map(tuple),
       T=st.integers(2, 5), before=st.integers(0, 9), count=counts, seed=st.integers(0, 2**63),
       bad=st.sampled_from(["wrong_shape", "nan", "inf", "int", "complex", "list", "meta"]),
       threshold_tensor=st.booleans())
def test_rejected_input_leaves_state_and_stream_unchanged(shape, T, before, count, seed, bad,
                                                          threshold_tensor):
    # a new shape is refused only mid-stream, or against a tensor threshold
    assume(bad != "wrong_shape" or before > 0 or (threshold_tensor and shape[-1] > 1))
    th = torch.full(shape[-1:], 0.5) if threshold_tensor else 0.5

    def make():
        return snt.TPP(threshold=th, num_steps=T, count=count, seed=seed, init_hidden=True,
                       streaming="delayed")

    g = torch.Generator().manual_seed(seed % 2**31)
    xs = torch.rand(before + 2 * T, *shape, generator=g)
    a, b = make(), make()
    for t in range(before):
        a(xs[t])
        b(xs[t])
    with pytest.raises((TypeError, ValueError)):
        a(_bad_inputs(shape)[bad])
    out_a = [a(xs[t]) for t in range(before, len(xs))]
    out_b = [b(xs[t]) for t in range(before, len(xs))]
    assert all(torch.equal(p, q) for p, q in zip(out_a, out_b))


@SETTINGS
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=2).map(tuple),
       T=st.integers(1, 5), count=counts, seed=st.integers(0, 2**63),
       bad=st.sampled_from(["wrong_shape", "nan", "inf", "int", "complex", "list", "meta",
                            "empty", "overflow"]))
def test_rejected_sequence_leaves_stream_unchanged(shape, T, count, seed, bad):
    """Both frameworks' multi-step neurons (SpikingJelly's TPPNode, snnTorch's sequence mode)."""
    sj = pytest.importorskip("tpp_plugin.adapters.spikingjelly")
    assume(bad != "wrong_shape" or shape[-1] > 1)  # a (1,) threshold broadcasts to any shape
    assume(bad != "overflow" or T > 1)  # one finite float16 step cannot overflow
    th = torch.full(shape[-1:], 0.5)
    seq_shape = (2 * T, *shape)
    inputs = _bad_inputs(seq_shape)
    inputs["empty"] = torch.ones(0, *shape)
    overflow = torch.full(seq_shape, 0.25, dtype=torch.float16)
    overflow[T:] = 40000.0  # the second window overflows: the first must not draw
    inputs["overflow"] = overflow
    x = torch.rand(seq_shape, generator=torch.Generator().manual_seed(seed % 2**31))
    makers = [
        lambda: sj.TPPNode(v_threshold=th, T=T, count=count, seed=seed, step_mode="m"),
        lambda: snt.TPP(threshold=th, num_steps=T, count=count, seed=seed, sequence=True,
                        init_hidden=True),
    ]
    for make in makers:
        a, b = make(), make()
        with pytest.raises((TypeError, ValueError)):
            a(inputs[bad])
        assert torch.equal(a(x), b(x))


@SETTINGS
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=2).map(tuple),
       T=st.integers(1, 5), seed=st.integers(0, 2**63),
       scope=st.sampled_from(F.PERMUTATION_SCOPES),
       bad=st.sampled_from(["nan", "inf", "int", "complex", "list", "meta", "empty"]))
def test_rejected_permutation_input_leaves_stream_unchanged(shape, T, seed, scope, bad):
    """Both frameworks' permutation layers accept the same inputs and refuse before drawing."""
    sj = pytest.importorskip("tpp_plugin.adapters.spikingjelly")
    seq_shape = (T, *shape)
    inputs = _bad_inputs(seq_shape)
    inputs["empty"] = torch.ones(0, *shape)
    x = (torch.rand(seq_shape, generator=torch.Generator().manual_seed(seed % 2**31)) < 0.5)
    x = x.float()
    makers = [
        lambda: sj.TemporalPermutation(scope, seed=seed, step_mode="m"),
        lambda: snt.TemporalPermutation(scope, seed=seed),
    ]
    for make in makers:
        a, b = make(), make()
        with pytest.raises((TypeError, ValueError)):
            a(inputs[bad])
        assert torch.equal(a(x), b(x))
