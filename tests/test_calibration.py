"""T-aware threshold calibration (tpp_plugin.calibration) and its SpikingJelly conversion
(TPPCalibrationRecipe on 2.x, convert_calibrated on both lines). Runs on SpikingJelly 2.0.0 and
(second pass of `make test`) 0.0.0.0.14."""

import copy

import pytest
import torch
from gpu_helpers import ORACLE_DEVICES
from sj_helpers import multi_step, single_step_loop
from spikingjelly.activation_based import ann2snn, functional
from torch import nn

import tpp_plugin
from tpp_plugin.adapters.spikingjelly import (
    IS_LEGACY,
    ChannelScaler,
    TPPNode,
    calibrated_thresholds,
    convert_calibrated,
)
from tpp_plugin.calibration import (
    CalibrationOptions,
    CalibrationResult,
    activation_nodes,
    calibrate_for_T,
    calibration_report,
    format_report,
    quantise,
    quantised_ann,
)
from tpp_plugin.calibration.quantiser import Probe
from tpp_plugin.calibration.search import bin_statistics, exact_count_errors
from tpp_plugin.experiments.models import cnn5, cnn5_maxpool, resnet, vgg

needs_recipes = pytest.mark.skipif(IS_LEGACY, reason="recipes exist on 2.x only")


def models():
    torch.manual_seed(0)
    nets = {"maxpool": cnn5_maxpool(image_size=8, channels=4), "resnet": resnet(image_size=8,
                                                                                 channels=4),
            "vgg": vgg(image_size=8, channels=4), "cnn5": cnn5(image_size=8, channels=4)}
    for net in nets.values():  # non-trivial batch-norm statistics, so fusion matters
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.1, 0.1)
    return {k: v.eval().double() for k, v in nets.items()}


def inputs(n=64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, dtype=torch.float64, generator=gen)




# ---------------------------------------------------------------- the quantiser
def test_quantise_rounds_to_T_levels_of_the_threshold_per_channel():
    a = torch.tensor([[[-1.0, 0.1, 0.13, 0.5, 0.9, 7.0]], [[0.2, 0.26, 0.4, 1.1, 2.0, 9.0]]])
    a = a.transpose(0, 1)  # [1, 2, 6]: two channels along dim 1
    theta = torch.tensor([1.0, 2.0])
    q = quantise(a, theta, T=4)
    # T levels of θ/T on [0, θ]: channel 0 in steps of 0.25 up to 1, channel 1 of 0.5 up to 2
    assert torch.equal(q[0, 0], torch.tensor([0.0, 0.0, 0.25, 0.5, 1.0, 1.0]))
    assert torch.equal(q[0, 1], torch.tensor([0.0, 0.5, 0.5, 1.0, 2.0, 2.0]))
    assert torch.equal(quantise(a, 1.0, T=1), (a >= 0.5).float())
    with pytest.raises(ValueError, match="channel_dim=3 is out of range"):
        quantise(a, theta, T=4, channel_dim=3)


# ---------------------------------------------------------------- the oracle
#: the oracle on the CPU, and on a GPU with either TPP backend (the neurons keep the scalar
#: threshold 1 between the scalers, so the 'cupy' kernel takes channel-wise calibrations too)
DEVICES = ORACLE_DEVICES


@pytest.mark.parametrize("device, backend", DEVICES)
@pytest.mark.parametrize("granularity", ["channel", "layer"])
@pytest.mark.parametrize("T", [1, 2, 4])
@pytest.mark.parametrize("name", ["maxpool", "resnet", "vgg"])
def test_exact_tpp_with_calibrated_thresholds_equals_the_quantised_ann(name, T, granularity,
                                                                      device, backend):
    """The oracle, float64: exact-count TPP with calibrated (channel-wise or per-layer)
    thresholds and bias shifts == the ANN with each ReLU call rounded to T levels of its
    thresholds, image for image — multi-step, the single-step loop and count mode. On a GPU
    the SNN and the images are on the device (calibrated and the reference computed on the
    CPU)."""
    ann = models()[name]
    before = copy.deepcopy(ann.state_dict())
    x = inputs()
    snn, result = convert_calibrated(ann, [x[:32], x[32:]], T, granularity=granularity,
                                     neuron_kwargs={"count": "exact", "seed": 0},
                                     return_result=True)
    assert all(torch.equal(v, ann.state_dict()[k]) for k, v in before.items())  # ANN untouched
    n_calls = {"maxpool": 5, "resnet": 9, "vgg": 8}[name]
    assert len(result.thresholds) == n_calls
    shape = () if granularity == "layer" else None
    for theta in result.thresholds:
        assert theta.dim() == (0 if shape == () else 1) and bool((theta > 0).all())
    with torch.no_grad():
        expected = quantised_ann(ann, result, T)(x).to(device)
    snn, x = snn.to(device), x.to(device)
    for node in (m for m in snn.modules() if isinstance(m, TPPNode)):
        node.backend = backend
    got = multi_step(snn, x, T).mean(0)
    assert got.device.type == device
    assert torch.equal(got.argmax(1), expected.argmax(1))
    assert torch.allclose(got, expected, atol=1e-9)
    assert torch.allclose(single_step_loop(snn, x, T).mean(0), got, atol=1e-9)
    with torch.no_grad(), tpp_plugin.count_mode(snn, T):
        assert torch.allclose(snn(x), got, atol=1e-9)
    # the network's own output scales are the calibrated ones
    scales = result.output_scales or result.thresholds
    for mine, theirs in zip(scales, calibrated_thresholds(snn)):
        assert torch.allclose(mine.double(), theirs.double().cpu().reshape(mine.shape))


def test_quantised_ann_output_lies_on_the_threshold_grid():
    ann = models()["cnn5"]
    x = inputs()
    result = calibrate_for_T(ann, [x], T=3)
    qann = quantised_ann(ann, result, 3)
    seen = []
    for node in activation_nodes(ann_traced := torch.fx.symbolic_trace(ann)):
        seen.append(node.name)
    assert seen == result.names
    outs = []
    for m in qann.modules():
        if isinstance(m, Probe):
            m.register_forward_hook(lambda mod, i, o: outs.append((mod, o)))
    with torch.no_grad():
        qann(x)
    assert len(outs) == len(result.thresholds) and ann_traced is not None
    for (_probe, out), theta in zip(outs, result.output_scales or result.thresholds):
        levels = out * 3 / theta.view(1, -1, *([1] * (out.dim() - 2))).double()
        assert torch.allclose(levels, levels.round(), atol=1e-9)
        assert float(levels.min()) >= 0 and float(levels.max()) <= 3 + 1e-9


@needs_recipes
@pytest.mark.parametrize("count", ["exact", "bernoulli"])
def test_recipe_is_used_like_spikingjellys_and_runs_in_multi_step_mode(count):
    ann = models()["maxpool"].float()
    before = copy.deepcopy(ann.state_dict())
    loader = [(torch.rand(32, 1, 8, 8), torch.zeros(32, dtype=torch.long)) for _ in range(2)]
    recipe = ann2snn.TPPCalibrationRecipe(loader, T=4, neuron="tpp",
                                          neuron_kwargs={"count": count})
    snn = ann2snn.Converter(recipe).convert(ann)
    assert all(torch.equal(v, ann.state_dict()[k]) for k, v in before.items())
    from spikingjelly.activation_based.ann2snn.modules import ChannelVoltageScaler

    assert sum(isinstance(m, ChannelVoltageScaler) for m in snn.modules()) == 10
    nodes = [m for m in snn.modules() if isinstance(m, TPPNode)]
    assert len(nodes) == 5 and all(n.count == count and n.T == 4 for n in nodes)
    assert sum(n.pool is not None for n in nodes) == 2  # max-pools absorbed
    functional.set_step_mode(snn, "m")
    with torch.no_grad():
        out = snn(torch.rand(4, 3, 1, 8, 8))
    assert out.shape == (4, 3, 10)
    assert isinstance(recipe.result, CalibrationResult) and recipe.result.T == 4


@pytest.mark.parametrize("count", ["exact", "bernoulli"])
def test_window_synchronous_single_step_loop_equals_multi_step_for_a_calibrated_net(count):
    ann = models()["resnet"]
    x = inputs(16)
    snn = convert_calibrated(ann, [inputs(32, seed=3)], 4,
                             neuron_kwargs={"count": count, "seed": 5})
    twin = copy.deepcopy(snn)
    for batch in (x, x[:5]):
        assert torch.equal(single_step_loop(snn, batch, 4), multi_step(twin, batch, 4))


def test_legacy_channel_scaler_scales_channels_in_both_step_modes():
    s = ChannelScaler(torch.tensor([1.0, 2.0, 3.0]))
    x = torch.rand(4, 3, 5)
    assert torch.allclose(s(x), x * torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1))
    s.step_mode = "m"
    x_seq = torch.rand(2, 4, 3, 5)
    assert torch.allclose(s(x_seq), x_seq * torch.tensor([1.0, 2.0, 3.0]).view(1, 1, 3, 1))
    with pytest.raises(ValueError, match="cannot scale"):
        s(torch.rand(2, 4, 2, 5))
    with pytest.raises(ValueError):
        ChannelScaler(torch.tensor([1.0, -1.0]))


# ---------------------------------------------------------------- the algorithm
def test_calibration_is_deterministic_for_fixed_batches_and_seed():
    ann = models()["resnet"]
    batches = [inputs(40, seed=2), inputs(40, seed=3)]
    a = calibrate_for_T(ann, batches, T=2, max_samples=50, seed=7, max_rows=500)
    b = calibrate_for_T(ann, batches, T=2, max_samples=50, seed=7, max_rows=500)
    for x, y in zip(a.thresholds + [s for s in a.bias_shifts if s is not None],
                    b.thresholds + [s for s in b.bias_shifts if s is not None]):
        assert torch.equal(x, y)
    assert a.weights and sorted(a.weights) == sorted(b.weights)
    for name, (weight, bias) in a.weights.items():
        assert torch.equal(weight, b.weights[name][0]) and torch.equal(bias, b.weights[name][1])
    assert a.settings["samples"] == 50


# ---------------------------------------------------------------- weight reconstruction
def test_refit_keeps_the_anns_weights_when_the_input_is_unchanged():
    """With the ANN's own input the ANN's weights fit exactly, so the ridge solution is them."""
    from tpp_plugin.calibration.refit import fit_weights

    torch.manual_seed(5)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1).double()
    x = torch.randn(20, 3, 9, 9, dtype=torch.float64)
    fitted = fit_weights(conv, x, conv(x).detach(), ridge=0.1, max_rows=10_000, seed=0)
    assert torch.allclose(fitted.weight, conv.weight, atol=1e-8)
    assert torch.allclose(fitted.bias, conv.bias, atol=1e-8)
    linear = nn.Linear(6, 5, bias=False).double()  # features last, on a [N, L, D] input
    x = torch.randn(30, 7, 6, dtype=torch.float64)
    fitted = fit_weights(linear, x, linear(x).detach(), ridge=0.1, max_rows=10_000, seed=0)
    assert torch.allclose(fitted.weight, linear.weight, atol=1e-8)
    assert torch.allclose(fitted.bias, torch.zeros(5, dtype=torch.float64), atol=1e-8)
    grouped = nn.Conv2d(4, 4, 3, groups=2).double()
    x = torch.randn(4, 4, 6, 6, dtype=torch.float64)
    assert fit_weights(grouped, x, grouped(x), ridge=0.1, max_rows=100, seed=0) is grouped
    wide = nn.Linear(40, 3).double()  # more inputs than max_features: kept as it is
    x = torch.randn(10, 40, dtype=torch.float64)
    assert fit_weights(wide, x, wide(x), 0.1, 100, 0, max_features=39) is wide
    assert fit_weights(wide, x, wide(x), 0.1, 100, 0, max_features=40) is not wide


def test_refit_weights_reduce_the_next_layers_error_and_reach_the_quantised_ann():
    torch.manual_seed(6)
    ann = nn.Sequential(nn.Linear(10, 24), nn.ReLU(), nn.Linear(24, 4)).double().eval()
    x = torch.randn(400, 10, dtype=torch.float64)
    T = 2
    result = calibrate_for_T(ann, [x], T, bias_correction=False, output_correction=False)
    plain = calibrate_for_T(ann, [x], T, bias_correction=False, output_correction=False,
                            reconstruct=False)
    assert sorted(result.weights) == ["2"] and plain.weights is None  # layer 0 sees the input
    assert result.settings["reconstruct"] and not plain.settings["reconstruct"]
    with torch.no_grad():
        a_q = quantise(ann[0](x), result.thresholds[0], T, scale=result.output_scales[0])
        weight, bias = result.weights["2"]
        error_refit = (a_q @ weight.T + bias - ann(x)).pow(2).sum()
        error_ann = (ann[2](a_q) - ann(x)).pow(2).sum()
        assert float(error_refit) < 0.9 * float(error_ann)
        qann = quantised_ann(ann, result, T)
        layer = qann.get_submodule("2")
        assert torch.equal(layer.weight, weight.to(layer.weight))
        assert torch.allclose(qann(x), a_q @ weight.T + bias, atol=1e-9)


class _ResidualMLP(nn.Module):
    """``relu(fc3(relu(fc2(h))) + h)`` with ``h = relu(fc1(x))``: a residual block on linear
    layers."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 12), nn.Linear(12, 12), nn.Linear(12, 12)
        self.head = nn.Linear(12, 3)
        self.relu1, self.relu2, self.relu3 = nn.ReLU(), nn.ReLU(), nn.ReLU()

    def forward(self, x):
        h = self.relu1(self.fc1(x))
        return self.head(self.relu3(self.fc3(self.relu2(self.fc2(h))) + h))


def test_refit_before_a_residual_add_matches_the_anns_sum_with_the_quantised_shortcut():
    """The layer feeding ``+ h`` is fitted to the ANN's sum minus the quantised ``h``, so it
    absorbs the shortcut's error too, not to the ANN's output of that layer."""
    from tpp_plugin.calibration.refit import fit_weights

    torch.manual_seed(7)
    ann = _ResidualMLP().double().eval()
    x = torch.randn(300, 6, dtype=torch.float64)
    T = 1
    result = calibrate_for_T(ann, [x], T, bias_correction=False, output_correction=False,
                             relu_steps=0)  # plain least squares (the ReLU-aware fit: below)
    assert sorted(result.weights) == ["fc2", "fc3", "head"]
    with torch.no_grad():
        h, h_q = ann.relu1(ann.fc1(x)), quantise(ann.fc1(x), result.thresholds[0], T,
                                                 scale=result.output_scales[0])
        w2, b2 = result.weights["fc2"]
        y, y_q = ann.relu2(ann.fc2(h)), quantise(h_q @ w2.T + b2, result.thresholds[1], T,
                                                 scale=result.output_scales[1])
        total = ann.fc3(y) + h  # the ANN's residual sum
        weight, bias = result.weights["fc3"]
        kwargs = {"ridge": 0.1, "max_rows": 16384, "seed": 0}
        expected = fit_weights(ann.fc3, y_q, total - h_q, **kwargs)
        assert torch.allclose(weight, expected.weight, atol=1e-9)
        assert torch.allclose(bias, expected.bias, atol=1e-9)
        layer_only = fit_weights(ann.fc3, y_q, ann.fc3(y), **kwargs)  # the old target
        assert not torch.allclose(weight, layer_only.weight, atol=1e-3)
        error = (y_q @ weight.T + bias + h_q - total).pow(2).sum()
        error_layer_only = (layer_only(y_q) + h_q - total).pow(2).sum()
        assert float(error) < 0.95 * float(error_layer_only)


def test_refit_feeding_a_relu_ignores_the_error_the_relu_zeroes():
    """``relu_steps``: a refitted layer feeding a ReLU (here also through the residual sum) is
    fitted for what the ReLU passes on — its error after the ReLU drops below plain least
    squares' — while the classifier head, which feeds no ReLU, gets the same fit either way."""
    torch.manual_seed(7)
    ann = _ResidualMLP().double().eval()
    x = torch.randn(300, 6, dtype=torch.float64)
    # a weak ridge, so the fit (not the pull towards the ANN's weights) decides
    kwargs = {"T": 1, "bias_correction": False, "output_correction": False, "ridge": 0.01}
    aware = calibrate_for_T(ann, [x], relu_steps=8, **kwargs)
    plain = calibrate_for_T(ann, [x], relu_steps=0, **kwargs)
    assert aware.settings["relu_steps"] == 8
    with torch.no_grad():
        h_q = quantise(ann.fc1(x), plain.thresholds[0], 1, scale=plain.output_scales[0])
        target = torch.relu(ann.fc2(ann.relu1(ann.fc1(x))))
        errors = {}
        for name, result in (("aware", aware), ("plain", plain)):
            assert torch.equal(result.thresholds[0], plain.thresholds[0])  # before any refit
            weight, bias = result.weights["fc2"]
            errors[name] = float((torch.relu(h_q @ weight.T + bias) - target).pow(2).sum())
        assert errors["aware"] < 0.98 * errors["plain"]  # 0.963 measured
        assert not torch.allclose(aware.weights["fc3"][0], plain.weights["fc3"][0])
    with pytest.raises(ValueError, match="relu_steps"):
        calibrate_for_T(ann, [x], T=1, relu_steps=-1)


def test_refit_of_a_layer_feeding_no_relu_is_plain_least_squares():
    ann = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).double().eval()
    x = torch.randn(200, 6, dtype=torch.float64)
    fits = [calibrate_for_T(ann, [x], T=2, relu_steps=steps).weights["2"] for steps in (0, 8)]
    assert all(torch.equal(a, b) for a, b in zip(*fits))


def test_each_channel_gets_the_grid_threshold_with_the_smallest_error():
    """One ReLU layer, objective='activation', no bias correction: brute force over the grid."""
    torch.manual_seed(3)
    ann = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    x = torch.randn(200, 6, dtype=torch.float64)
    T, grid = 2, 16
    result = calibrate_for_T(ann, [x], T, objective="activation", bias_correction=False,
                             grid=grid, max_values=None, search="exact")
    binned = calibrate_for_T(ann, [x], T, objective="activation", bias_correction=False,
                             grid=grid, max_values=None, bins=4096)
    with torch.no_grad():
        a = ann[0](x)
    target = a.clamp(min=0)
    top = target.amax(0)
    for c in range(5):
        errors = []
        for k in range(1, grid + 1):
            theta = k / grid * top[c]
            errors.append(float(((quantise(a[:, c], theta, T) - target[:, c]) ** 2).sum()))
        chosen = float(result.thresholds[0][c])
        best = min(range(grid), key=lambda k: errors[k])
        assert chosen == pytest.approx((best + 1) / grid * float(top[c]), rel=1e-5)
        assert errors[best] <= errors[-1]  # never worse than the maximum (fraction 1)
        # the histogram search finds a candidate within a whisker of the best
        k_binned = round(float(binned.thresholds[0][c]) / float(top[c]) * grid) - 1
        assert errors[k_binned] <= errors[best] * 1.02 + 1e-12


@pytest.mark.parametrize("T", [1, 2, 3, 8])
@pytest.mark.parametrize("free_scale", [False, True])
def test_exact_count_search_equals_the_per_bin_errors(T, free_scale):
    """The prefix-sum search (T bin boundaries per candidate) gives, for every candidate
    fraction and offset, the error of quantising each bin's centre directly."""
    torch.manual_seed(T)
    a = torch.randn(5, 3000, dtype=torch.float64) * torch.rand(5, 1, dtype=torch.float64) * 3
    target = (a + 0.3 * torch.randn_like(a)).clamp(min=0)
    # fractions and offsets off the binary grid: no bin centre sits exactly on a boundary
    bins, fractions = 64, torch.arange(1, 17, dtype=torch.float64) / 16 * 0.9876543
    offsets = torch.linspace(-0.5, 0.5, 5, dtype=torch.float64) * 0.987
    top, stats = bin_statistics(a, target, None, "channel", bins)
    n, s, ss = (t[:, 1:] for t in stats)
    assert torch.equal(stats[0].sum(1), torch.full((5,), 3000.0, dtype=torch.float64))
    errors, steps = exact_count_errors(n, s, ss.sum(-1), -stats[1][:, 0], top, T, fractions,
                                       offsets, 0.0, free_scale, a.shape[1])
    centres = (torch.arange(bins, dtype=torch.float64) + 0.5) / bins * top.unsqueeze(1)
    for k, f in enumerate(fractions):
        theta = f * top
        for j, u in enumerate(offsets):
            level = torch.floor(centres * T / theta.unsqueeze(1) + u + 0.5).clamp(0, T)
            step = theta / T
            if free_scale:
                num, den = (level * s).sum(1), (level * level * n).sum(1)
                step = torch.where((num > 0) & (den > 0), num / den.clamp(min=1e-300), step)
                assert torch.allclose(steps[k, j], step, rtol=1e-9)
            q = level * step.unsqueeze(1)
            expected = (n * q * q - 2 * q * s + ss).sum(1)
            assert torch.allclose(errors[k, j], expected, rtol=1e-9, atol=1e-9)


def test_calibration_leaves_values_shared_with_other_nodes_intact():
    """The calibration overwrites an activation's input only when nothing else holds it: here
    the second ReLU's input is a view of a value the skip layer still reads (the ANN side would
    be corrupted otherwise, and with it the output bias correction)."""

    class ViewSkip(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc0, self.fc1 = nn.Linear(6, 8), nn.Linear(8, 8)
            self.relu0, self.relu1 = nn.ReLU(), nn.ReLU()
            self.fc2, self.skip = nn.Linear(8, 3), nn.Linear(8, 3)

        def forward(self, x):
            y = self.fc1(self.relu0(self.fc0(x)))
            return self.fc2(self.relu1(y.view(-1, 8))) + self.skip(y)

    torch.manual_seed(7)
    ann = ViewSkip().double().eval()
    x = torch.randn(300, 6, dtype=torch.float64)
    result = calibrate_for_T(ann, [x], T=2, reconstruct=False)
    with torch.no_grad():
        assert torch.allclose(quantised_ann(ann, result, 2)(x).mean(0), ann(x).mean(0),
                              atol=1e-9)


def test_bias_correction_matches_the_anns_mean_input_per_channel():
    torch.manual_seed(4)
    ann = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5), nn.ReLU(),
                        nn.Linear(5, 3)).double().eval()
    x = torch.randn(300, 6, dtype=torch.float64)
    result = calibrate_for_T(ann, [x], T=1)
    assert result.bias_targets == ["0", "2"]
    qann = quantised_ann(ann, result, 1)
    seen = []
    qann.get_submodule("2").register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        qann(x)
        ann_mean = ann[2](ann[1](ann[0](x))).mean(0)
    assert torch.allclose(seen[0].mean(0), ann_mean, atol=1e-9)
    off = calibrate_for_T(ann, [x], T=1, bias_correction=False)
    assert off.bias_shifts == [None, None]


def test_calibration_for_T_improves_on_the_percentile_threshold_at_low_T():
    """What the calibration is for: a lower output error than '99.9%' thresholds at T=2."""
    torch.manual_seed(0)
    ann = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                        nn.Linear(32, 4)).double().eval()
    x = torch.randn(512, 12, dtype=torch.float64)
    result = calibrate_for_T(ann, [x[:256]], T=2)
    percentile = [layer["p99.9"] for layer in result.layers]
    with torch.no_grad():
        ref = ann(x[256:])
        err_cal = (quantised_ann(ann, result, 2)(x[256:]) - ref).pow(2).mean()
        err_pct = (quantised_ann(ann, percentile, 2)(x[256:]) - ref).pow(2).mean()
    assert float(err_cal) < 0.8 * float(err_pct)


# ---------------------------------------------------------------- report
def test_report_lists_thresholds_errors_and_shares_per_layer():
    ann = models()["maxpool"]
    x = inputs()
    snn, result = convert_calibrated(ann, [x], 2, return_result=True)
    report = calibration_report(result, {"net": calibrated_thresholds(snn)})
    assert report["T"] == 2 and len(report["layers"]) == 5
    for layer in report["layers"]:
        assert set(layer["references"]) == {"net", "99.9%"}
        assert layer["threshold"]["min"] <= layer["threshold"]["median"] <= layer["threshold"][
            "max"]
        assert layer["references"]["net"] == (layer["output_scale"] or layer["threshold"])
        assert 0 <= layer["clipped"] <= 1 and 0 <= layer["zeroed"] <= 1
        assert layer["rounding_error"] >= 0
    table = format_report(report)
    assert all(name in table for name in result.names) and "θ 99.9%" in table
    with pytest.raises(ValueError, match="has 1 thresholds for 5 ReLU calls"):
        calibration_report(result, {"bad": [1.0]})
    import json

    json.dumps(report)


# ---------------------------------------------------------------- the options record
def test_an_options_record_and_keyword_arguments_calibrate_alike():
    """``calibrate_for_T(ann, loader, T, CalibrationOptions(...))`` is the keyword call; keyword
    arguments override the record's fields; the signature lists every option (the converters
    read it to check their keyword arguments)."""
    import dataclasses
    import inspect

    ann = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.rand(64, 4)
    by_keyword = calibrate_for_T(ann, [x], 2, granularity="layer", seed=3, max_samples=40)
    options = CalibrationOptions(granularity="layer", seed=3, max_samples=40)
    by_record = calibrate_for_T(ann, [x], 2, options)
    overridden = calibrate_for_T(ann, [x], 2, dataclasses.replace(options, seed=1), seed=3)
    for result in (by_record, overridden):
        assert all(torch.equal(a, b) for a, b in zip(result.thresholds, by_keyword.thresholds))
        assert result.settings == by_keyword.settings
    assert by_keyword.settings["granularity"] == "layer"
    names = list(inspect.signature(calibrate_for_T).parameters)
    assert names == ["ann", "batches", "T", "options"] + [
        f.name for f in dataclasses.fields(CalibrationOptions)]
    assert CalibrationOptions().grid == inspect.signature(calibrate_for_T).parameters[
        "grid"].default == 64
    assert CalibrationOptions(bias_correction=True).bias_correction == "search"
    with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
        calibrate_for_T(ann, [x], 2, bogus=1)
    with pytest.raises(ValueError, match="refine must be"):
        CalibrationOptions(refine="everything")
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.grid = 8


# ---------------------------------------------------------------- errors
def test_bad_inputs_are_refused_naming_the_problem():
    ann = models()["cnn5"]
    x = inputs(8)
    with pytest.raises(ValueError, match="T must be >= 1"):
        calibrate_for_T(ann, [x], T=0)
    with pytest.raises(ValueError, match="loader yielded no batch"):
        calibrate_for_T(ann, [], T=2)
    with pytest.raises(ValueError, match="no nn.ReLU"):
        calibrate_for_T(nn.Sequential(nn.Flatten(), nn.Linear(64, 3)).double(), [x], T=2)
    with pytest.raises(ValueError, match="channel_dim=4 is out of range"):
        calibrate_for_T(ann, [x], T=2, channel_dim=4)
    broken = copy.deepcopy(ann)
    broken[2].weight.data[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="ReLU call .* non-finite"):
        calibrate_for_T(broken, [x], T=2)
    with pytest.raises(ValueError, match="calibration inputs contain NaN"):
        calibrate_for_T(ann, [torch.full_like(x, float("inf"))], T=2)
    with pytest.raises(ValueError, match="refine must be"):
        calibrate_for_T(ann, [x], T=2, refine="everything")
    with pytest.raises(ValueError, match="objective must be one of"):
        calibrate_for_T(ann, [x], T=2, objective="kl")
    with pytest.raises(TypeError, match="unknown calibration argument"):
        convert_calibrated(ann, [x], 2, bogus=1)
    with pytest.raises(ValueError, match="got 2 thresholds for a model with 5 ReLU calls"):
        quantised_ann(ann, [1.0, 1.0], 2)
    with pytest.raises(ValueError, match="ridge must be a positive number"):
        calibrate_for_T(ann, [x], T=2, ridge=0.0)
    with pytest.raises(ValueError, match="max_rows must be a positive integer"):
        calibrate_for_T(ann, [x], T=2, max_rows=0)
    with pytest.raises(ValueError, match="bins must be a positive integer"):
        calibrate_for_T(ann, [x], T=2, bins=0)
    with pytest.raises(ValueError, match="max_features must be a positive integer"):
        calibrate_for_T(ann, [x], T=2, max_features=0)


# ---------------------------------------------------------------- bernoulli-aware calibration
@pytest.mark.parametrize("T", [1, 4, 8])
def test_expected_count_table_matches_the_exact_dynamic_programme(T):
    from tpp_plugin import functional as F

    w = torch.linspace(-1, T + 1, 997, dtype=torch.float64)
    assert torch.allclose(F.expected_count_fast(w, T), F.expected_count(w, T), atol=1e-4)
    single = F.expected_count_fast(w.float(), T, dtype=torch.float32)
    assert single.dtype == torch.float32
    assert torch.allclose(single.double(), F.expected_count_fast(w, T), atol=1e-5 * T)


@pytest.mark.parametrize("count", ["exact", "bernoulli", "unbiased"])
@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("granularity", ["channel", "layer"])
def test_the_calibrations_fast_quantiser_is_the_mean_quantiser(count, overwrite, granularity):
    """The calibration's quantised side (fewer passes, optionally in place) computes what
    ``quantised_ann``'s probes do, up to rounding in the last bits."""
    torch.manual_seed(8)
    x = torch.randn(16, 5, 3, 3, dtype=torch.float64) * 2
    probes = [Probe(0, "relu", 4, 1) for _ in range(2)]
    theta = torch.rand(5, dtype=torch.float64) + 0.5
    shift = 0.1 * torch.randn(5, dtype=torch.float64)
    for probe, fast in zip(probes, (False, True)):
        probe.theta = theta if granularity == "channel" else theta[0]
        probe.scale, probe.shift = 0.9 * theta, shift
        probe.count, probe.fast, probe.overwrite = count, fast, fast and overwrite
    reference = probes[0](x)
    given = x.clone()
    assert torch.allclose(probes[1](given), reference, atol=1e-12)
    assert torch.equal(given, x) != overwrite  # overwritten exactly when allowed


def test_bernoulli_aware_calibration_differs_and_is_deterministic():
    ann = models()["cnn5"]
    x = inputs()
    exact = calibrate_for_T(ann, [x], T=4)
    bern = calibrate_for_T(ann, [x], T=4, count="bernoulli")
    again = calibrate_for_T(ann, [x], T=4, count="bernoulli")
    assert bern.settings["count"] == "bernoulli"
    assert all(torch.equal(a, b) for a, b in zip(bern.thresholds, again.thresholds))
    assert any(not torch.equal(a, b) for a, b in zip(bern.thresholds, exact.thresholds))
    with pytest.raises(ValueError, match="count must be one of"):
        calibrate_for_T(ann, [x], T=4, count="poisson")


def test_unbiased_calibration_minimises_the_expected_error_of_its_two_point_count():
    """count='unbiased': a neuron at w = a·T/θ fires floor(w) or floor(w) + 1 times, the latter
    with probability frac(w); each channel gets the grid threshold with the smallest expected
    squared error (brute force over the grid)."""
    torch.manual_seed(7)
    ann = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2)).double().eval()
    x = torch.randn(300, 5, dtype=torch.float64)
    T, grid = 8, 16  # at T=8 the bernoulli rule's mean is far from w (0.59 spikes at w=0.3)
    result = calibrate_for_T(ann, [x], T, count="unbiased", bias_correction=False,
                             reconstruct=False, output_scale=False, grid=grid,
                             max_values=None, bins=8192)
    assert result.settings["count"] == "unbiased"
    with torch.no_grad():
        a = ann[0](x)
    target = a.clamp(min=0)
    for c in range(4):
        top = float(target[:, c].max())
        errors = []
        for k in range(1, grid + 1):
            theta = k / grid * top
            w = (a[:, c] * T / theta).clamp(0, T)
            low, p_up = w.floor(), w - w.floor()
            q_lo, q_hi = low * theta / T, (low + 1) * theta / T
            t = target[:, c]
            errors.append(float(((1 - p_up) * (q_lo - t) ** 2 + p_up * (q_hi - t) ** 2).sum()))
        k_chosen = round(float(result.thresholds[0][c]) / top * grid) - 1
        assert k_chosen == min(range(grid), key=errors.__getitem__)


@pytest.mark.parametrize("neuron, kwargs, expected", [
    ("tpp", {"count": "bernoulli"}, "bernoulli"),
    ("tpp", {"count": "unbiased"}, "unbiased"),
    ("tpp", {"count": "exact"}, "exact"),
    ("tpp", {}, "bernoulli"),  # TPPNode's default rule
    ("if", {}, "exact"),
])
def test_conversion_calibrates_for_the_neurons_count_rule(neuron, kwargs, expected):
    ann = models()["cnn5"]
    x = inputs(16)
    _, result = convert_calibrated(ann, [x], 2, neuron=neuron, neuron_kwargs=kwargs,
                                   return_result=True)
    assert result.settings["count"] == expected
    _, forced = convert_calibrated(ann, [x], 2, neuron=neuron, neuron_kwargs=kwargs,
                                   return_result=True, count="exact")
    assert forced.settings["count"] == "exact"
