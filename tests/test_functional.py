"""The math of tpp_plugin.functional: statistics of firing, permutation, QCFS, validation.

Statistical tests use fixed seeds; tolerances are 4 standard errors (SE from the sample itself),
and chi-square tests compare against the 99.9 % quantile of the chi-square distribution.
"""

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.stats import chi2

from tpp_plugin import functional as F

N = 100_000  # neurons per statistical test (>= 1e5)


def chi_square_uniform(counts: torch.Tensor) -> float:
    expected = counts.sum() / counts.numel()
    return float(((counts - expected) ** 2 / expected).sum())


# ---------------------------------------------------------------- tpp_fire: counts
@pytest.mark.parametrize("T", [1, 2, 4, 8, 32])
@pytest.mark.parametrize("threshold", [1.0, 0.37])
def test_exact_count_is_rounded_clamped_potential(T, threshold, gen):
    v = (torch.rand(N, generator=gen) * (T + 4) - 2) * threshold
    spikes = F.tpp_fire(v, T, threshold, count="exact", generator=gen)
    expected = torch.floor(v / threshold + 0.5).clamp(0, T)
    assert spikes.shape == (T, N)
    assert torch.equal(spikes.sum(0), expected)
    assert set(spikes.unique().tolist()) <= {0.0, 1.0}


def rule_expected_count(w: float, T: int) -> float:
    """E[count] of the sequential rule p_t = clamp(w_t / (T - t + 1), 0, 1), w_t = w - spikes so
    far, by exact dynamic programming over the number of spikes already fired."""
    prob = {0: 1.0}
    for t in range(T):
        nxt: dict = {}
        for c, pc in prob.items():
            p = min(max((w - c) / (T - t), 0.0), 1.0)
            nxt[c + 1] = nxt.get(c + 1, 0.0) + pc * p
            nxt[c] = nxt.get(c, 0.0) + pc * (1 - p)
        prob = nxt
    return sum(c * pc for c, pc in prob.items())


@pytest.mark.parametrize("T", [1, 4, 8])
@pytest.mark.parametrize("w", [-1.0, 0.0, 1.0, 2.0, 3.0, 40.0])
def test_bernoulli_mean_count_is_clamped_potential_for_whole_thresholds(T, w, gen):
    """DESIGN fact 1/2: with v = kθ (and outside [0, Tθ]) the mean count is clamp(v/θ, 0, T),
    within 4 standard errors (SE = sample std / sqrt(N)); exact where the count is certain."""
    threshold = 0.5
    counts = F.tpp_fire(torch.full((N,), w * threshold), T, threshold, generator=gen).sum(0)
    target = min(max(w, 0.0), T)
    se = counts.std().item() / math.sqrt(N)
    assert abs(counts.mean().item() - target) <= 4 * se


@pytest.mark.parametrize("T", [2, 4, 8])
@pytest.mark.parametrize("w", [0.3, 1.5, 2.7, 3.9, 7.2])
def test_bernoulli_mean_count_matches_rule_expectation(T, w, gen):
    """For fractional v/θ the sequential rule over-fires: its mean count is the rule's exact
    expectation (dynamic programming above), not clamp(v/θ, 0, T). Tolerance: 4 SE."""
    threshold = 0.5
    counts = F.tpp_fire(torch.full((N,), w * threshold), T, threshold, generator=gen).sum(0)
    se = counts.std().item() / math.sqrt(N)
    assert abs(counts.mean().item() - rule_expected_count(w, T)) <= 4 * se
    assert abs(F.expected_count(torch.tensor(w), T).item() - rule_expected_count(w, T)) < 1e-6


def test_expected_count_matches_both_rules():
    v = torch.tensor([-1.0, 0.4, 0.5, 2.6, 9.0])
    exact = F.expected_count(v, 4, count="exact")
    assert torch.equal(exact, torch.tensor([0.0, 0.0, 1.0, 3.0, 4.0]).double())
    whole = torch.tensor([-1.0, 0.0, 1.0, 3.0, 9.0])
    expected = torch.tensor([0.0, 0.0, 1.0, 3.0, 4.0], dtype=torch.float64)
    assert torch.allclose(F.expected_count(whole, 4), expected)
    assert F.expected_count(torch.tensor(0.3), 8) > 0.5  # over-firing of fractional potentials


# ---------------------------------------------------------------- tpp_fire: positions
@pytest.mark.parametrize("T,k", [(4, 1), (8, 2), (8, 5), (16, 3)])
def test_spike_positions_uniform_over_slots(T, k, gen):
    spikes = F.tpp_fire(torch.full((N,), float(k)), T, count="exact", generator=gen)
    per_slot = spikes.sum(1)
    assert per_slot.sum() == N * k
    assert chi_square_uniform(per_slot) < chi2.ppf(0.999, T - 1)


@pytest.mark.parametrize("count", ["exact", "bernoulli"])
def test_k_subset_is_uniform_over_all_subsets(count, gen):
    """v = kθ: the k spikes land on each of the C(T, k) subsets equally often."""
    T, k = 5, 2
    spikes = F.tpp_fire(torch.full((N,), float(k)), T, count=count, generator=gen)
    assert torch.all(spikes.sum(0) == k)
    codes = (spikes.T * (2 ** torch.arange(T, dtype=torch.float32))).sum(1).long()
    subsets = [sum(2**i for i in c) for c in itertools.combinations(range(T), k)]
    hist = torch.stack([(codes == s).sum() for s in subsets]).float()
    assert hist.sum() == N
    assert chi_square_uniform(hist) < chi2.ppf(0.999, len(subsets) - 1)


# ---------------------------------------------------------------- determinism and shapes
def test_same_seed_same_spikes_and_different_seed_differs():
    v = torch.rand(3, 50) * 6

    def draw(seed):
        return F.tpp_fire(v, 6, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(draw(7), draw(7))
    assert not torch.equal(draw(7), draw(8))


def test_pre_drawn_uniforms_reproduce_internal_draw():
    v = torch.rand(4, 9) * 5
    u = F.window_uniforms(v.shape, 5, v.device, generator=torch.Generator().manual_seed(3))
    a = F.tpp_fire(v, 5, uniforms=u)
    b = F.tpp_fire(v, 5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_accumulate_is_sequential_sum():
    x = torch.randn(7, 100)
    v = torch.tensor(0.25)
    for t in range(7):
        v = v + x[t]
    assert torch.equal(F.tpp_accumulate(x, 0.25), v)


def test_tpp_forward_shapes_dtypes_and_v_seq():
    x = torch.rand(4, 2, 3, dtype=torch.float64)
    s = F.tpp_forward(x, 0.5, count="exact", generator=torch.Generator().manual_seed(0))
    assert s.shape == x.shape and s.dtype == torch.float64
    spikes, v_seq = F.tpp_fire(x.sum(0), 4, 0.5, count="exact", return_v_seq=True)
    k = torch.floor(x.sum(0) / 0.5 + 0.5).clamp(0, 4)
    assert torch.allclose(v_seq[-1], (k - spikes.sum(0)) * 0.5)
    assert torch.allclose(v_seq[-1], torch.zeros_like(v_seq[-1]))


def test_half_precision_input(gen):
    v = torch.full((1000,), 3.0, dtype=torch.float16)
    s = F.tpp_fire(v, 8, count="exact", generator=gen)
    assert s.dtype == torch.float16 and torch.all(s.sum(0) == 3)


def test_tensor_threshold_per_channel(gen):
    theta = torch.tensor([0.5, 1.0, 2.0]).view(3, 1)
    v = torch.full((3, 1000), 2.0)
    counts = F.tpp_fire(v, 8, theta, count="exact", generator=gen).sum(0)
    assert torch.equal(counts[:, 0], torch.tensor([4.0, 2.0, 1.0]))


# ---------------------------------------------------------------- permutation
@pytest.mark.parametrize("scope", ["neuron", "sample", "layer"])
def test_permutation_preserves_every_count(scope, gen):
    x = (torch.rand(8, 16, 5, 3, generator=gen) < 0.4).float()
    y = F.permute_time(x, scope, generator=gen)
    assert torch.equal(y.sum(0), x.sum(0))
    assert not torch.equal(x, y)


def test_neuron_scope_positions_uniform(gen):
    T = 8
    x = torch.zeros(T, N)
    x[0] = 1.0
    y = F.permute_time(x, "neuron", generator=gen)
    assert chi_square_uniform(y.sum(1)) < chi2.ppf(0.999, T - 1)


def test_sample_and_layer_scope_share_permutations(gen):
    T = 6
    x = torch.arange(T, dtype=torch.float32).view(T, 1, 1).expand(T, 50, 20).contiguous()
    y = F.permute_time(x, "sample", generator=gen)
    assert torch.equal(y, y[:, :, :1].expand_as(y))  # one permutation per sample
    assert not torch.equal(y[:, :, 0], y[:, :1, 0].expand(T, 50))  # samples differ
    z = F.permute_time(x, "layer", generator=gen)
    assert torch.equal(z, z[:, :1, :1].expand_as(z))


# ---------------------------------------------------------------- qcfs
def test_qcfs_values_and_straight_through_gradient():
    x = torch.tensor([-0.3, 0.1, 0.3, 0.6, 0.99, 3.0], requires_grad=True)
    lam = torch.tensor(1.0, requires_grad=True)
    y = F.qcfs(x, lam, 4)
    assert torch.allclose(y, torch.tensor([0.0, 0.0, 0.25, 0.5, 1.0, 1.0]))
    y.sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0, 0.0]))
    assert lam.grad is not None and lam.grad != 0


def test_qcfs_equals_rounded_clamp():
    x = torch.randn(10_000) * 3
    for L in (1, 2, 4, 16):
        ref = torch.floor(x * L / 1.7 + 0.5).clamp(0, L) * 1.7 / L
        assert torch.allclose(F.qcfs(x, 1.7, L), ref)


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "call, exc, name",
    [
        (lambda: F.tpp_fire(torch.tensor([1, 2]), 4), TypeError, "v"),
        (lambda: F.tpp_fire(torch.tensor([float("nan")]), 4), ValueError, "v"),
        (lambda: F.tpp_fire(torch.tensor([float("inf")]), 4), ValueError, "v"),
        (lambda: F.tpp_fire(torch.ones(3), 0), ValueError, "T"),
        (lambda: F.tpp_fire(torch.ones(3), 2.5), TypeError, "T"),
        (lambda: F.tpp_fire(torch.ones(3), 4, threshold=0.0), ValueError, "threshold"),
        (lambda: F.tpp_fire(torch.ones(3), 4, threshold=-1.0), ValueError, "threshold"),
        (lambda: F.tpp_fire(torch.ones(3), 4, threshold=float("inf")), ValueError, "threshold"),
        (lambda: F.tpp_fire(torch.ones(3), 4, threshold="1"), TypeError, "threshold"),
        (lambda: F.tpp_fire(torch.ones(3), 4, count="round"), ValueError, "count"),
        (lambda: F.tpp_forward(torch.tensor(1.0)), ValueError, "x_seq"),
        (lambda: F.tpp_forward(torch.ones(3, dtype=torch.int32)), TypeError, "x_seq"),
        (lambda: F.permute_time(torch.ones(4, 2), "pixel"), ValueError, "scope"),
        (lambda: F.permute_time(torch.tensor(1.0)), ValueError, "x_seq"),
        (lambda: F.permute_time(torch.ones(4), "sample"), ValueError, "x_seq"),
        (lambda: F.qcfs(torch.ones(2), 1.0, 0), ValueError, "L"),
    ],
)
def test_bad_input_raises_clear_error_naming_argument(call, exc, name):
    with pytest.raises(exc, match=rf"\b{name}\b"):
        call()


def test_generator_must_be_a_generator():
    with pytest.raises(TypeError, match="generator"):
        F.tpp_fire(torch.ones(3), 4, generator=42)
    with pytest.raises(TypeError, match="generator"):
        F.permute_time(torch.ones(4, 2), generator="seed")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_generator_on_wrong_device_is_reported():
    with pytest.raises(ValueError, match="generator"):
        F.tpp_fire(torch.ones(3, device="cuda"), 4, generator=torch.Generator())


# ---------------------------------------------------------------- fast paths == references
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("T", [1, 3, 8, 300])
@pytest.mark.parametrize("count", ["bernoulli", "exact"])
@pytest.mark.parametrize("shape", [(64,), (3, 7)])  # 3·7·T is not a multiple of 4 for odd T
def test_fast_fire_equals_reference_bit_for_bit(dtype, T, count, shape):
    """tpp_fire (random numbers hidden in its output buffer, one small loop over T) equals the
    plain reference loop on window_uniforms drawn from the same seed; tpp_count equals its sum.
    T=300 exercises products r·(T−t) beyond float32's 24-bit mantissa."""
    v = ((torch.rand(shape, generator=torch.Generator().manual_seed(T)) * (T + 2)) - 1).to(dtype)
    threshold = torch.linspace(0.4, 1.3, shape[-1]) if len(shape) == 2 else 0.7

    def gen():
        return torch.Generator().manual_seed(99)

    fast = F.tpp_fire(v, T, threshold, count, gen())
    u = F.window_uniforms(v.shape, T, v.device, dtype, gen())
    assert torch.equal(fast, F.tpp_fire_reference(v, T, threshold, count, u))
    assert torch.equal(fast, F.tpp_fire(v, T, threshold, count, uniforms=u))
    assert torch.equal(F.tpp_count(v, T, threshold, count, gen()), fast.sum(0))


def test_uniforms_are_16_bit_and_uniform(gen):
    """u = r/2^16: on the grid, in [0, 1), mean 1/2 and 16 equal bins within 4 SE (binomial SE
    of a bin fraction sqrt(p(1-p)/n), and 1/sqrt(12 n) for the mean)."""
    u = F.window_uniforms((N,), 4, "cpu", generator=gen).flatten().double()
    n = u.numel()
    assert torch.equal(u * 2**16, torch.floor(u * 2**16))
    assert u.min() >= 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) <= 4 / math.sqrt(12 * n)
    frac = torch.bincount((u * 16).long(), minlength=16).double() / n
    assert torch.all((frac - 1 / 16).abs() <= 4 * math.sqrt((1 / 16) * (15 / 16) / n))


def test_step_by_step_draws_equal_one_window_draw():
    """On the CPU the 64-bit words of each step can be drawn separately (no [T, n] buffer)."""
    draws = F._step_draws(5, 12, "cpu", torch.Generator().manual_seed(4))
    steps = torch.stack([row.clone() for row in draws])  # rows share one buffer
    whole = F._draw_bits(5 * 12, "cpu", torch.Generator().manual_seed(4)).view(5, 12)
    assert torch.equal(steps, whole)


@pytest.mark.parametrize("T", [1, 2, 5, 8, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int64])
def test_fast_permutation_equals_reference_bit_for_bit(T, dtype):
    x = (torch.randn(T, 3, 5, generator=torch.Generator().manual_seed(T)) * 10).to(dtype)
    fast = F.permute_time(x, "neuron", generator=torch.Generator().manual_seed(8))
    bits = F.permutation_bits(T, 15, "cpu", torch.Generator().manual_seed(8))
    assert torch.equal(fast, F.permute_time_reference(x, bits))
    assert torch.equal(fast.sort(0).values, x.sort(0).values)  # a permutation of each train


@pytest.mark.parametrize("T", [8, 32])
def test_neuron_permutation_moves_a_pair_to_uniform_positions(T, gen):
    """Fisher–Yates without a sort: slot 0's value lands in each slot with probability 1/T, and
    the ordered pair (slots 0, 1) in each of the T(T-1) position pairs with probability
    1/(T(T-1)); every frequency within 4 binomial SE, sqrt(p(1-p)/N), of its probability."""
    x = torch.zeros(T, N)
    x[0], x[1] = 1.0, 2.0
    y = F.permute_time(x, "neuron", generator=gen)
    first = (y == 1).double().argmax(0)
    second = (y == 2).double().argmax(0)
    assert torch.all(y.sum(0) == 3)

    def within_4_se(counts, p):
        return torch.all((counts.double() / N - p).abs() <= 4 * math.sqrt(p * (1 - p) / N))

    assert within_4_se(torch.bincount(first, minlength=T), 1 / T)
    pairs = torch.bincount(first * T + second, minlength=T * T).view(T, T)
    assert torch.all(pairs.diagonal() == 0)
    off_diagonal = pairs[~torch.eye(T, dtype=torch.bool)]
    assert within_4_se(off_diagonal, 1 / (T * (T - 1)))


def test_finite_check_catches_nan_inf_and_tolerates_sum_overflow():
    big = torch.full((4, 3), 3e38)  # finite, but the sum overflows
    assert F.check_tensor(big, "x") is big
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.ones(4, 3)
        x[2, 1] = bad
        with pytest.raises(ValueError, match="x"):
            F.check_tensor(x, "x")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_spike_trains_are_permuted_as_exact_count_firing(dtype):
    """A 0/1 train is redrawn as its count on a uniform subset: for a seed, exactly what
    tpp_fire(count, exact) fires (uniformity of positions: test_neuron_scope_positions_uniform)."""
    x = (torch.rand(8, 40, 3, generator=torch.Generator().manual_seed(1)) < 0.3).to(dtype)
    fast = F.permute_time(x, "neuron", generator=torch.Generator().manual_seed(4))
    fired = F.tpp_fire(x.sum(0), 8, 1.0, "exact", torch.Generator().manual_seed(4))
    assert fast.dtype == dtype and torch.equal(fast, fired)
    assert torch.equal(fast.sum(0), x.sum(0)) and not torch.equal(fast, x)
    # one non-binary value anywhere: the whole tensor takes the Fisher-Yates path
    x[0, 0, 0] = 0.5
    fy = F.permute_time(x, "neuron", generator=torch.Generator().manual_seed(4))
    assert torch.equal(fy.sort(0).values, x.sort(0).values)


# ---------------------------------------------------------------- count='unbiased'
@pytest.mark.parametrize("T", [4, 32])
def test_unbiased_count_has_mean_w_and_two_point_support(T):
    """floor(w) + Bernoulli(frac w): mean clamp(w, 0, T) within 4 standard errors on 10⁵
    neurons per level (SE = sqrt(f(1−f)/n)), plus the 2**-16 grid of the uniforms."""
    n = 100_000
    g = torch.Generator().manual_seed(7)
    for w in (0.3, 2.3, T - 0.5, -0.7, T + 3.2):
        v = torch.full((n,), w, dtype=torch.float64)
        counts = F.tpp_fire(v, T, 1.0, "unbiased", g).sum(0)
        target = min(max(w, 0.0), float(T))
        low = float(np.floor(target))
        assert set(counts.unique().tolist()) <= {low, low + 1}
        f = target - low
        se = max((f * (1 - f) / n) ** 0.5, 1e-12)
        assert abs(counts.mean().item() - target) <= 4 * se + 2**-16, (w, counts.mean())
        assert torch.allclose(F.expected_count(v[:1], T, count="unbiased"),
                              torch.tensor([target], dtype=torch.float64))


def test_unbiased_spike_positions_are_uniform():
    """A neuron's k spikes land on a uniformly random k-subset: each slot fires with k/T."""
    n, T = 100_000, 8
    spikes = F.tpp_fire(torch.full((n,), 3.0), T, 1.0, "unbiased",
                        torch.Generator().manual_seed(3))
    freq, p = spikes.mean(1).double(), 3 / T
    assert ((freq - p).abs() <= 4 * (p * (1 - p) / n) ** 0.5).all(), freq


@pytest.mark.parametrize("draw_steps", [True, False])
def test_unbiased_count_equals_fire_and_keeps_the_stream_in_step(draw_steps):
    v = torch.rand(3, 100) * 6 - 1
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    fired = F.tpp_fire(v, 4, 0.9, "unbiased", g1).sum(0)
    counted = F.tpp_count(v, 4, 0.9, "unbiased", g2, draw_steps=draw_steps)
    assert torch.equal(fired, counted)
    next_fire, next_count = torch.rand(1, generator=g1), torch.rand(1, generator=g2)
    assert torch.equal(next_fire, next_count) == draw_steps


def test_unbiased_reference_and_errors():
    v, T = torch.rand(64) * 5, 5
    uniforms, rounding = torch.rand(T, 64), torch.rand(64)
    assert torch.equal(F.tpp_fire(v, T, 1.0, "unbiased", uniforms=uniforms, rounding=rounding),
                       F.tpp_fire_reference(v, T, 1.0, "unbiased", uniforms, rounding))
    with pytest.raises(ValueError, match="rounding="):
        F.tpp_fire(v, T, 1.0, "unbiased", uniforms=uniforms)
