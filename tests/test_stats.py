"""tpp_plugin.spike_stats: spikes against a brute-force count of the spike tensors (both
frameworks; multi-step, single-step and count mode), SOPs against a hand computation of the
fan-out, MACs and energy, and bad energy constants."""

import copy
import math

import pytest
import torch
from torch import nn

import tpp_plugin
from tpp_plugin.stats import E_AC_PJ, E_MAC_PJ

sj = pytest.importorskip("spikingjelly.activation_based")
from spikingjelly.activation_based import ann2snn, functional, layer  # noqa: E402

from tpp_plugin.adapters.spikingjelly import IS_LEGACY, TPPNode  # noqa: E402

T = 4
H = W = 4


def small_sj_net(count="bernoulli"):
    """conv(1→2, 3×3, pad 1) → TPP → conv(2→3, 3×3, pad 1) → TPP → flatten → linear(48→5)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        layer.Conv2d(1, 2, 3, padding=1), TPPNode(count=count, seed=0),
        layer.Conv2d(2, 3, 3, padding=1), TPPNode(count=count, seed=1),
        layer.Flatten(), layer.Linear(3 * H * W, 5),
    ).double()
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.uniform_(m.weight, 0.0, 0.6)  # positive: plenty of spikes in both layers
    return net


def images(n=7):
    return torch.rand(n, 1, H, W, generator=torch.Generator().manual_seed(1),
                      dtype=torch.float64)


def hand_sops(spike_maps):
    """Σ spikes × fan-out, fan-outs by hand: a pixel (i, j) of a 3×3 'same' convolution is read
    by r(i)·r(j) output positions, r = 2 on the border and 3 inside, in each of the 3 output
    channels; every input of the linear layer reaches its 5 outputs."""
    r = [2, 3, 3, 2]
    first, second = spike_maps
    sops = 0.0
    for c in range(2):
        for i in range(H):
            for j in range(W):
                sops += first[c, i, j].item() * 3 * r[i] * r[j]
    sops += second.sum().item() * 5
    return sops


def reseed(net):
    for m in net.modules():
        if isinstance(m, TPPNode):
            m.manual_seed(m.seed)


def brute_force(net, run, neuron_type, to_counts):
    """Per-neuron spike counts of every spiking layer, summed over images and time."""
    maps, handles = [], []
    for m in net.modules():
        if isinstance(m, neuron_type):
            maps.append(None)
            i = len(maps) - 1

            def hook(mod, args, out, i=i):
                out = out[0] if isinstance(out, tuple) else out
                c = to_counts(mod, out)
                maps[i] = c if maps[i] is None else maps[i] + c
            handles.append(m.register_forward_hook(hook))
    run()
    for h in handles:
        h.remove()
    return maps


def check(summary, maps, n_images):
    assert summary["images"] == n_images
    assert [lay["spikes"] for lay in summary["layers"]] == [int(m.sum().item()) for m in maps]
    assert summary["spikes"] == sum(int(m.sum().item()) for m in maps) > 0
    assert summary["spikes_per_image"] == pytest.approx(summary["spikes"] / n_images)
    for lay, m in zip(summary["layers"], maps):
        assert lay["neurons"] == m.numel()
        assert lay["firing_rate"] == pytest.approx(m.sum().item() / (m.numel() * T * n_images))
    assert summary["sops"] == pytest.approx(hand_sops(maps))
    assert summary["ann_macs_per_image"] == 2 * 16 * 9 + 3 * 16 * 18 + 48 * 5
    assert summary["snn_macs_per_image"] == 2 * 16 * 9  # the conv that sees the image
    energy = summary["energy"]
    assert energy["ann_pj_per_image"] == pytest.approx(E_MAC_PJ * summary["ann_macs_per_image"])
    assert energy["snn_pj_per_image"] == pytest.approx(
        E_MAC_PJ * 288 + E_AC_PJ * summary["sops"] / n_images)


@pytest.mark.parametrize("count", ["bernoulli", "exact"])
def test_spikingjelly_multi_step(count):
    net, x = small_sj_net(count), images()
    functional.set_step_mode(net, "m")
    x_seq = x.unsqueeze(0).expand(T, *x.shape)

    def run():
        with torch.no_grad(), tpp_plugin.spike_stats(net) as stats:
            net(x_seq)
        functional.reset_net(net)
        return stats.summary()

    reseed(net)
    maps = brute_force(net, lambda: net(x_seq), TPPNode, lambda m, out: out.sum((0, 1)))
    functional.reset_net(net)
    reseed(net)
    check(run(), maps, len(x))


def test_spikingjelly_count_mode_and_two_batches():
    """Count mode (one-draw bernoulli): the rates count/T are counted as count spikes."""
    net, x = small_sj_net(), images(9)
    reseed(net)
    maps = brute_force(net, lambda: _count_mode_run(net, x), TPPNode,
                       lambda m, out: torch.round(out * T).sum(0))
    reseed(net)
    with tpp_plugin.spike_stats(net) as stats:
        _count_mode_run(net, x)
    check(stats.summary(), maps, len(x))
    assert stats.summary()["layers"][0]["neurons"] == 32


def _count_mode_run(net, x):
    with torch.no_grad(), tpp_plugin.count_mode(net, T):
        for part in (x[:5], x[5:]):  # two batches accumulate
            net(part)


def test_spikingjelly_single_step_stream():
    """Single-step streaming: per-call spikes [N, ...]; images from the layers' window T."""
    net, x = small_sj_net("exact"), images(3)
    for m in net.modules():
        if isinstance(m, TPPNode):
            m.T = T
            if hasattr(m, "streaming"):  # lines with a window-synchronous default
                m.streaming = "delayed"  # causal streaming: one window of delay per layer
    steps = 3 * T  # (L + 1)·T for two TPP layers

    def run():
        with torch.no_grad():
            for _ in range(steps):
                net(x)
        functional.reset_net(net)

    maps = brute_force(net, run, TPPNode, lambda m, out: out.sum(0))
    with tpp_plugin.spike_stats(net) as stats:
        run()
    s = stats.summary()
    assert [lay["spikes"] for lay in s["layers"]] == [int(m.sum()) for m in maps]
    assert s["images"] == steps * len(x) / T
    assert s["sops"] == pytest.approx(hand_sops(maps))


def test_converted_network_spikes_match_brute_force(relu_cnn, digits):
    """A SpikingJelly-converted digits CNN (average pooling between spiking layers): spikes per
    layer equal a brute-force count, and the fan-out follows the pooling (exact)."""
    x_train, _, x_test, _ = digits
    ann = copy.deepcopy(relu_cnn)
    if IS_LEGACY:
        snn = ann2snn.Converter([(x_train[:256], None)], mode="99.9%", neuron="tpp",
                                neuron_kwargs={"seed": 0})(ann)
    else:
        recipe = ann2snn.RateCodingRecipe([x_train[:256]], mode="99.9%", neuron="tpp",
                                          neuron_kwargs={"seed": 0})
        snn = ann2snn.Converter(recipe).convert(ann)
    functional.set_step_mode(snn, "m")
    x = x_test[:50]
    x_seq = x.unsqueeze(0).expand(T, *x.shape)
    reseed(snn)
    maps = brute_force(snn, lambda: snn(x_seq), TPPNode, lambda m, out: out.sum((0, 1)))
    functional.reset_net(snn)
    reseed(snn)
    with torch.no_grad(), tpp_plugin.spike_stats(snn) as stats:
        snn(x_seq)
    functional.reset_net(snn)
    s = stats.summary()
    assert [lay["spikes"] for lay in s["layers"]] == [int(m.sum()) for m in maps]
    assert all(lay["fan_out_exact"] for lay in s["layers"])
    # layer 2 (32 channels at 8×8) → 2×2 average pool → 3×3 conv (32→32, pad 1) on 4×4: an inner
    # pooled pixel is read by 9 positions × 32 channels, shared by its 2×2 inputs
    assert s["layers"][1]["next_layer"] is not None
    assert 0 < s["layers"][1]["fan_out"] <= 9 * 32
    assert s["layers"][-1]["fan_out"] == 10  # hidden linear → 10 classes
    assert s["ann_macs_per_image"] > s["snn_macs_per_image"] > 0


def test_linear_and_conv_fan_out_by_hand():
    """A neuron of a [2, 4, 4] layer reaches 3·r(i)·r(j) synapses of a 3×3 same convolution;
    a neuron before Linear(48, 5) reaches 5."""
    net = small_sj_net("exact")
    functional.set_step_mode(net, "m")
    with torch.no_grad(), tpp_plugin.spike_stats(net) as stats:
        net(images().unsqueeze(0).expand(T, 7, 1, H, W))
    layer1, layer2 = (stats._fan_out(lay, *stats._next_weighted(lay))[0]
                      for lay in stats.layers)
    r = torch.tensor([2.0, 3.0, 3.0, 2.0], dtype=torch.float64)
    assert torch.equal(layer1, (3 * torch.outer(r, r)).expand(2, H, W))
    assert torch.equal(layer2, torch.full((3, H, W), 5.0, dtype=torch.float64))


@pytest.mark.parametrize("kwargs, match", [
    ({"e_ac": 0.0}, "e_ac must be a finite energy > 0"),
    ({"e_mac": -4.6}, "e_mac must be a finite energy > 0"),
    ({"e_ac": float("nan")}, "e_ac must be a finite energy > 0"),
])
def test_bad_energy_constants_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tpp_plugin.spike_stats(small_sj_net(), **kwargs)


def test_energy_constants_are_arguments():
    net = small_sj_net()
    functional.set_step_mode(net, "m")
    with torch.no_grad(), tpp_plugin.spike_stats(net, e_ac=1.0, e_mac=2.0) as stats:
        net(images().unsqueeze(0).expand(T, 7, 1, H, W))
    s = stats.summary()
    assert s["energy"]["ann_pj_per_image"] == 2.0 * s["ann_macs_per_image"]
    assert s["energy"]["snn_pj_per_image"] == pytest.approx(
        2.0 * s["snn_macs_per_image"] + s["sops_per_image"])


def test_a_network_without_spiking_neurons_is_refused():
    with pytest.raises(ValueError, match="no spiking neuron"):
        tpp_plugin.spike_stats(nn.Sequential(nn.Linear(2, 2)))


# ------------------------------------------------------------------------------------ snnTorch
snt = pytest.importorskip("tpp_plugin.adapters.snntorch")


def small_ann():
    torch.manual_seed(0)
    ann = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 3, 3, padding=1),
                        nn.ReLU(), nn.Flatten(), nn.Linear(3 * H * W, 5))
    for m in ann.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.uniform_(m.weight, 0.0, 0.6)
    return ann


def snn_counts(m, out):
    return (out != 0).to(torch.float64).sum((0, 1))


@pytest.mark.parametrize("neuron", ["tpp", "if"])
def test_snntorch_sequence(neuron):
    x = images().float()
    net = snt.convert(small_ann(), [x], num_steps=T, neuron=neuron, seed=0)
    x_seq = x.unsqueeze(0).expand(T, *x.shape)
    neuron_type = snt.TPP if neuron == "tpp" else snt.IF

    def run():
        snt.reset(net)
        with torch.no_grad():
            net(x_seq)

    for m in net.modules():
        if isinstance(m, snt.TPP):
            m.manual_seed(m.seed)
    maps = brute_force(net, run, neuron_type, snn_counts)
    for m in net.modules():
        if isinstance(m, snt.TPP):
            m.manual_seed(m.seed)
    with tpp_plugin.spike_stats(net) as stats:
        run()
    check(stats.summary(), maps, len(x))


def test_snntorch_count_mode():
    x = images().float()
    net = snt.convert(small_ann(), [x], num_steps=T, count="exact", seed=0)

    def run():
        with torch.no_grad(), tpp_plugin.count_mode(net):
            net(x)

    maps = brute_force(net, run, snt.TPP,
                       lambda m, out: torch.round(out / m.graded_spikes_factor * T).sum(0))
    with tpp_plugin.spike_stats(net) as stats:
        run()
    check(stats.summary(), maps, len(x))
    assert math.isclose(stats.summary()["layers"][1]["fan_out"], 5.0)


@pytest.mark.parametrize("window, batch", [(8, 16), (2**22, 8)])
def test_per_neuron_counts_are_exact_in_either_summation(window, batch):
    """Whole counts are summed in float32 while every partial sum stays below 2²⁴ (exact),
    in float64 beyond: either way the per-neuron totals equal a float64 sum."""
    from tpp_plugin.stats import _Layer

    torch.manual_seed(0)
    counts = torch.randint(0, window + 1, (batch, 3, 5)).to(torch.float64)
    out = (counts / window).to(torch.float32)  # what a count-mode neuron passes on (s = 1)
    recorded = _Layer("layer", nn.Identity())
    recorded.add(out, window)
    expected = (out.double() * window).round().sum(0)
    assert torch.equal(recorded.per_neuron, expected)
    assert recorded.spikes == int(expected.sum())
