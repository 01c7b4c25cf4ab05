"""Count-domain evaluation (tpp_plugin.count_mode) against the full [T, N, ...] simulation.

Draw for draw (``bernoulli='draw-equal'``, and ``count='exact'``):

Equality tests run in float64. The full simulation adds the T step currents of a neuron one by
one, count mode multiplies one mean current by T; the two potentials differ by rounding only,
which in float64 (~1e-16 relative) does not move any of these potentials across a decision
boundary, so spike counts per layer and predictions must match exactly. (In float32 a potential
within ~1e-7 of a boundary could count one spike differently.)
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as nnF
from torch import nn

import tpp_plugin
from tpp_plugin.count_domain import check_count_domain

sj = pytest.importorskip("spikingjelly.activation_based")
from spikingjelly.activation_based import ann2snn, functional  # noqa: E402

from tpp_plugin.adapters.spikingjelly import (  # noqa: E402
    IS_LEGACY,
    TemporalPermutation,
    TPPNode,
    insert_permutation,
)

N_IMAGES = 160


@pytest.fixture(scope="module")
def batch(digits):
    x_train, _, x_test, _ = digits
    return x_train[:256], x_test[:N_IMAGES].double()


def sj_convert(ann, calibration, **hook):
    ann = copy.deepcopy(ann)  # the 0.0.0.0.14 converter reuses the ANN's layers
    if IS_LEGACY:
        loader = [(calibration, torch.zeros(len(calibration), dtype=torch.long))]
        return ann2snn.Converter(loader, mode="99.9%", **hook)(ann)
    recipe = ann2snn.RateCodingRecipe([calibration], mode="99.9%", **hook)
    return ann2snn.Converter(recipe).convert(ann)


def reseed(net):
    tpp_plugin.reseed(net, 100)  # the public reseed: seeds spawned from 100


def record_counts(net, neuron_type, to_counts):
    """Forward hooks that store each TPP layer's spike counts; returns (counts, handles)."""
    counts, handles = [], []
    for module in net.modules():
        if isinstance(module, neuron_type):
            handles.append(module.register_forward_hook(
                lambda m, args, out: counts.append(to_counts(m, out))))
    return counts, handles


def full_and_count_sj(snn, x, T):
    functional.set_step_mode(snn, "m")
    reseed(snn)
    in_count_mode = []
    counts, handles = record_counts(  # spike trains [T, N, ...] vs rates count/T [N, ...]
        snn, TPPNode, lambda m, out: out * T if in_count_mode else out.sum(0))
    with torch.no_grad():
        full = snn(x.unsqueeze(0).expand(T, *x.shape)).mean(0)
    functional.reset_net(snn)
    full_counts, counts[:] = list(counts), []
    reseed(snn)
    in_count_mode.append(True)
    with torch.no_grad(), tpp_plugin.count_mode(snn, T=T, bernoulli="draw-equal"):
        fast = snn(x)
    for h in handles:
        h.remove()
    return full, full_counts, fast, counts


@pytest.mark.parametrize("T", [1, 4, 8])
@pytest.mark.parametrize("count", ["bernoulli", "exact"])
def test_spikingjelly_count_mode_equals_full_simulation(relu_cnn, batch, T, count):
    calibration, x = batch
    snn = sj_convert(relu_cnn, calibration, neuron="tpp",
                     neuron_kwargs={"count": count, "seed": 0}).double()
    full, full_counts, fast, fast_counts = full_and_count_sj(snn, x, T)
    assert len(full_counts) == len(fast_counts) == 5
    for a, b in zip(full_counts, fast_counts):
        assert torch.equal(a, b)
    assert torch.equal(full.argmax(1), fast.argmax(1))
    assert torch.allclose(full, fast, rtol=0, atol=1e-9)
    assert all(m.step_mode == "m" for m in snn.modules() if isinstance(m, TPPNode))
    assert "forward" not in vars(next(m for m in snn.modules() if isinstance(m, TPPNode)))


def test_exact_count_mode_predictions_do_not_depend_on_the_seed(relu_cnn, batch):
    calibration, x = batch
    snn = sj_convert(relu_cnn, calibration, neuron="tpp",
                     neuron_kwargs={"count": "exact", "seed": 0}).double()
    functional.set_step_mode(snn, "m")
    with torch.no_grad():
        full = snn(x.unsqueeze(0).expand(4, *x.shape)).mean(0)
    functional.reset_net(snn)
    with torch.no_grad(), tpp_plugin.count_mode(snn, 4):  # no reseeding: exact draws nothing
        assert torch.equal(full.argmax(1), snn(x).argmax(1))


def test_permutation_after_tpp_is_allowed(relu_cnn, batch):
    calibration, x = batch
    snn = sj_convert(relu_cnn, calibration, neuron="tpp",
                     neuron_kwargs={"count": "bernoulli", "seed": 0}).double()
    insert_permutation(snn, seed=7)
    assert any(isinstance(m, TemporalPermutation) for m in snn.modules())
    full, full_counts, fast, fast_counts = full_and_count_sj(snn, x, 4)
    assert all(torch.equal(a, b) for a, b in zip(full_counts, fast_counts))
    assert torch.equal(full.argmax(1), fast.argmax(1))


def test_if_network_is_refused_naming_the_neuron(relu_cnn, batch):
    snn = sj_convert(relu_cnn, batch[0], neuron="if")
    named_if = r"module '[^']+' \(spikingjelly\.[a-z_.]*IFNode\) is a spiking"
    with pytest.raises(ValueError, match=named_if):
        with tpp_plugin.count_mode(snn, 4):
            pass


def max_pool_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 10),
    ).eval()


def test_converted_max_pool_network_runs_in_count_mode(batch):
    """The converter moves ReLU → MaxPool into the TPP neuron (pooling window potentials), which
    count mode supports: exact counts equal the full simulation."""
    snn = sj_convert(max_pool_cnn(), batch[0], neuron="tpp",
                     neuron_kwargs={"seed": 0, "count": "exact"})
    assert any(isinstance(m, TPPNode) and m.pool is not None for m in snn.modules())
    x = batch[1][:16].float()
    functional.set_step_mode(snn, "m")
    with torch.no_grad():
        full = snn(x.unsqueeze(0).expand(4, *x.shape)).mean(0)
        functional.reset_net(snn)
        with tpp_plugin.count_mode(snn, 4):
            counted = snn(x)
    assert torch.allclose(counted, full, atol=1e-5)


def test_max_pool_on_spikes_is_refused_naming_the_module():
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), TPPNode(step_mode="m", seed=0),
                        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16, 10))
    with pytest.raises(ValueError, match=r"module '2' .*MaxPool2d.*not affine"):
        with tpp_plugin.count_mode(net, 4):
            pass
    assert all("forward" not in m.__dict__ for m in net)  # nothing was patched


class FunctionalOps(nn.Module):
    """Non-affine ops written as function calls in forward (fx call_function / call_method)."""

    def __init__(self, op):
        super().__init__()
        self.conv, self.tpp, self.op = nn.Conv2d(1, 2, 3, padding=1), TPPNode(seed=0), op
        self.fc = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x):
        s = self.tpp(self.conv(x))
        if self.op == "max_pool":
            s = nnF.max_pool2d(s, 2)
        elif self.op == "relu_method":
            s = s.relu()[..., ::2, ::2]
        elif self.op == "square":
            s = (s * s)[..., ::2, ::2]
        else:
            s = nnF.avg_pool2d(s * 2.0, 2) + 1.0
        return self.fc(torch.flatten(s, 1))


@pytest.mark.parametrize("op, node", [("max_pool", "max_pool2d"), ("relu_method", "relu"),
                                      ("square", "mul")])
def test_non_affine_graph_nodes_are_refused(op, node):
    with pytest.raises(ValueError, match=rf"graph node .*{node}.*not affine"):
        check_count_domain(FunctionalOps(op))


def test_affine_graph_nodes_pass_and_count_mode_runs():
    net = FunctionalOps("affine").double()
    assert [name for name, _ in check_count_domain(net)] == ["tpp"]
    x = torch.rand(5, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad(), tpp_plugin.count_mode(net, T=4):
        assert net(x).shape == (5, 3)


def test_T_is_required_when_layers_do_not_fix_it(relu_cnn, batch):
    snn = sj_convert(relu_cnn, batch[0], neuron="tpp")
    with pytest.raises(ValueError, match="pass T="):
        with tpp_plugin.count_mode(snn):
            pass


# ------------------------------------------------------------------------------------ snnTorch
snt = pytest.importorskip("tpp_plugin.adapters.snntorch")


def snn_counts(m, out):
    return (out != 0).sum(0).to(out.dtype)


@pytest.mark.parametrize("T", [1, 4, 8])
@pytest.mark.parametrize("count", ["bernoulli", "exact"])
def test_snntorch_count_mode_equals_full_simulation(relu_cnn, batch, T, count):
    calibration, x = batch
    net = snt.convert(relu_cnn, [calibration], num_steps=T, mode="99.9%", count=count,
                      seed=0).double()

    def reseed_snn():
        tpp_plugin.reseed(net)  # every TPP restarts from its own seed

    counts, handles = record_counts(net, snt.TPP, snn_counts)
    reseed_snn()
    with torch.no_grad():
        full = net(x.unsqueeze(0).expand(T, *x.shape)).mean(0)
    full_counts, counts[:] = list(counts), []
    for h in handles:
        h.remove()
    counts, handles = record_counts(
        net, snt.TPP, lambda m, out: torch.round(out / m.graded_spikes_factor * T))
    reseed_snn()
    # T from the layers' num_steps
    with torch.no_grad(), tpp_plugin.count_mode(net, bernoulli="draw-equal"):
        fast = net(x)
    for h in handles:
        h.remove()
    assert len(full_counts) == len(counts) == 5
    assert all(torch.equal(a, b) for a, b in zip(full_counts, counts))
    assert torch.equal(full.argmax(1), fast.argmax(1))
    assert torch.allclose(full, fast, rtol=0, atol=1e-9)


def test_snntorch_refusals(relu_cnn, batch):
    calibration, _ = batch
    if_net = snt.convert(relu_cnn, [calibration], num_steps=4, neuron="if")
    with pytest.raises(ValueError, match=r"module '1'.*IF"):
        check_count_domain(if_net)
    pooled = snt.convert(max_pool_cnn(), [calibration], num_steps=4, seed=0)
    assert len(check_count_domain(pooled)) == 2  # the max-pool is inside a TPP neuron (pool=)
    on_spikes = nn.Sequential(snt.TPP(num_steps=4, sequence=True, init_hidden=True),
                              nn.MaxPool2d(2))
    with pytest.raises(ValueError, match=r"module '1'.*MaxPool2d"):
        check_count_domain(on_spikes)
    tpp_net = snt.convert(relu_cnn, [calibration], num_steps=4, seed=0)
    with pytest.raises(ValueError, match="window 4, but T=8"):
        with tpp_plugin.count_mode(tpp_net, T=8):
            pass


# ------------------------------------------------- bernoulli counts in one draw ('one-draw')
from tpp_plugin import functional as F  # noqa: E402

N_PER_LEVEL = 100_000
LEVELS = [-0.7, 0.0, 0.1, 0.3, 0.5, 1.0, 2.3, 2.5, 3.9, 6.99]  # w = v/θ, T = 4 clamps the last


def _two_point_check(counts: torch.Tensor, w: float, T: int, n: int) -> None:
    """Counts of one level: support {clamp(⌊w⌋), clamp(⌈w⌉)} (both present when p is not tiny)
    and mean within 4 SE of expected_count; SE = sqrt(p(1-p)/n), p = E - ⌊E⌋ (the two-point
    variance), so a certain count must be exact."""
    low, high = min(max(math.floor(w), 0), T), min(max(math.ceil(w), 0), T)
    values = set(counts.unique().tolist())
    assert values <= {float(low), float(high)}, (w, T, values)
    mean = F.expected_count(torch.tensor(w), T).item()
    p = mean - math.floor(mean)
    if 0.01 < p < 0.99:
        assert values == {float(low), float(high)}
    se = math.sqrt(p * (1 - p) / n)
    assert abs(counts.double().mean().item() - mean) <= 4 * se + 1e-12, (w, T)


@pytest.mark.parametrize("T", [4, 8, 32])
@pytest.mark.parametrize("tensor_threshold", [False, True])
def test_one_draw_count_is_two_point_with_the_rule_mean(T, tensor_threshold, gen):
    theta = 0.5
    w = torch.tensor(LEVELS).repeat_interleave(N_PER_LEVEL)
    threshold = torch.full_like(w, theta) if tensor_threshold else theta
    counts = F.tpp_count_two_point(w * theta, T, threshold, gen)
    assert counts.dtype == torch.float32 and counts.shape == w.shape
    for i, level in enumerate(LEVELS):
        _two_point_check(counts[i * N_PER_LEVEL:(i + 1) * N_PER_LEVEL], level, T, N_PER_LEVEL)


@pytest.mark.parametrize("T, dtype", [(8, torch.float64), (128, torch.float32)])
def test_one_draw_count_float64_and_long_windows(T, dtype, gen):
    levels = [0.3, 7.5, T - 0.5, T + 3.0]
    w = torch.tensor(levels, dtype=dtype).repeat_interleave(N_PER_LEVEL)
    counts = F.tpp_count_two_point(w, T, 1.0, gen)
    assert counts.dtype == dtype
    for i, level in enumerate(levels):
        _two_point_check(counts[i * N_PER_LEVEL:(i + 1) * N_PER_LEVEL], level, T, N_PER_LEVEL)


def test_full_simulation_has_the_same_two_point_law(gen):
    """The same check on tpp_fire's counts: both samplers draw from one law."""
    T = 8
    for level in (0.3, 2.5, 6.99):
        counts = F.tpp_fire(torch.full((N_PER_LEVEL,), level), T, generator=gen).sum(0)
        _two_point_check(counts, level, T, N_PER_LEVEL)


@pytest.mark.parametrize("T", [1, 2, 4, 8, 32, 64])
def test_count_table_interpolation_error_is_below_the_stated_bound(T):
    """expected_count_table, interpolated linearly, against the dynamic programme of
    expected_count: below 3e-6 spikes (stated in its docstring)."""
    torch.manual_seed(T)
    w = torch.rand(4000, dtype=torch.float64) * T
    M = F.COUNT_TABLE_BINS
    table = F.expected_count_table(T)
    pos = w * M
    i = pos.floor().long().clamp(max=T * M - 1)
    interpolated = torch.div(i, M, rounding_mode="floor") + torch.lerp(
        table[i, 0], table[i, 1], pos - i)
    assert (interpolated - F.expected_count(w, T)).abs().max().item() < 3e-6
    # the sampler's own float32 tables interpolate to the same values (probabilities to 2**-16)
    g = torch.Generator().manual_seed(0)
    mean = F.tpp_count_two_point(w.float().repeat(50), T, 1.0, g).double().mean()
    expected = F.expected_count(w.float().double(), T).mean()
    se = 0.5 / math.sqrt(len(w) * 50)  # a two-point count's std is at most 1/2
    assert abs(mean.item() - expected.item()) <= 4 * se


def test_one_draw_count_is_reproducible_and_draws_one_word_per_four_neurons():
    v = torch.rand(1000) * 5
    a = F.tpp_count_two_point(v, 8, 1.0, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    b = F.tpp_count_two_point(v, 8, 1.0, g)
    assert torch.equal(a, b)
    after = torch.empty(1, dtype=torch.int64).random_(-(2**63), None, generator=g)
    g2 = torch.Generator().manual_seed(3)
    torch.empty(250, dtype=torch.int64).random_(-(2**63), None, generator=g2)
    assert torch.equal(after, torch.empty(1, dtype=torch.int64).random_(-(2**63), None,
                                                                        generator=g2))


@pytest.mark.parametrize("threshold, offset", [
    (0.5, 0.0), (0.5, 0.25), ("0-d", "0-d"), ("per-neuron", 0.0)])
def test_one_draw_count_in_cpu_chunks_draws_as_one_pass(monkeypatch, threshold, offset):
    """The CPU sampler takes the neurons _CPU_CHUNK at a time: the same counts, and the same
    generator advance, as one pass over all of them (a tail that is not whole words included)."""
    from tpp_plugin.functional import counts as counts_module

    x = torch.rand(2, 1003) * 1.2 - 0.1
    theta = {"0-d": torch.tensor(0.7), "per-neuron": torch.full_like(x, 0.6)}.get(
        threshold, threshold)
    v_init = torch.tensor(0.2) if offset == "0-d" else offset
    runs = []
    for chunk in (1 << 30, 8, 100):
        monkeypatch.setattr(counts_module, "_CPU_CHUNK", chunk)
        g = torch.Generator().manual_seed(7)
        counts = F._two_point_count(x, 8, theta, g, gain=8, offset=v_init)
        runs.append((counts, torch.empty(1, dtype=torch.int64).random_(generator=g)))
    for counts, after in runs[1:]:
        assert torch.equal(counts, runs[0][0]) and torch.equal(after, runs[0][1])
    assert len(runs[0][0].unique()) > 4


def test_count_mode_one_draw_first_layer_counts_follow_the_rule(relu_cnn, batch):
    """The first TPP layer sees the same potentials in both modes; in count mode (one-draw, the
    default) its total count must be Σ expected_count(v) within 4 SE, SE² = Σ p(1−p)."""
    calibration, x = batch
    T = 8
    snn = sj_convert(relu_cnn, calibration, neuron="tpp",
                     neuron_kwargs={"count": "bernoulli", "seed": 0}).double()
    first = next(m for m in snn.modules() if isinstance(m, TPPNode))
    seen = {}
    handle = first.register_forward_hook(
        lambda m, args, out: seen.update(v=args[0] * T, counts=out * T))
    with torch.no_grad(), tpp_plugin.count_mode(snn, T=T):
        snn(x)
    handle.remove()
    E = F.expected_count(seen["v"], T, first.v_threshold)
    p = E - E.floor()
    se = (p * (1 - p)).sum().sqrt().item()
    counts = seen["counts"].round()
    assert torch.allclose(counts, seen["counts"], atol=1e-9)
    assert abs(counts.sum().item() - E.sum().item()) <= 4 * se
    assert se > 1  # many neurons with a fractional potential: the test can fail


def test_count_mode_rejects_an_unknown_sampler(relu_cnn, batch):
    snn = sj_convert(relu_cnn, batch[0], neuron="tpp")
    with pytest.raises(ValueError, match="bernoulli must be one of"):
        with tpp_plugin.count_mode(snn, 4, bernoulli="fast"):
            pass


@pytest.mark.parametrize("threshold", [0.5, "tensor"])
def test_one_draw_count_of_a_mean_current_with_gain_and_offset(threshold):
    """Count mode's path (v = T·x + v_init formed inside the sampler) draws as the public
    function does on v (values chosen so that both potentials are exact in float32)."""
    x = torch.arange(-8, 40, dtype=torch.float32).repeat(50) / 8
    theta = torch.full_like(x, 0.5) if threshold == "tensor" else threshold
    a = F._two_point_count(x, 4, theta, torch.Generator().manual_seed(1), gain=4, offset=0.25)
    b = F.tpp_count_two_point(x * 4 + 0.25, 4, theta, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and len(a.unique()) > 3


def test_bench_count_mode_prints_both_samplers(capsys):
    """`bench --count-mode` smoke test (tiny run; timings are reported in docs, not asserted)."""
    import re

    from tpp_plugin import cli

    assert cli.main(["bench", "--count-mode", "--T", "2", "--shape", "2", "--repeats", "1",
                     "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert "draw-eq ms" in out and "acc count" in out
    rows = re.findall(r"^(SpikingJelly|snnTorch) TPP (bernoulli|exact)\s+2\s+(.*)$", out, re.M)
    assert len(rows) == 4
    for _, count, cells in rows:
        values = cells.replace("%", "").split()
        assert float(values[2]) > 0  # speed-up
        if count == "bernoulli":
            assert len(values) == 9 and float(values[5]) > 0  # draw-equal speed-up
        else:
            # exact: the same predictions, up to float32 rounding at a decision boundary
            assert "—" in values and float(values[-1]) >= 95.0
