"""Conversion through SpikingJelly's own converters with `neuron='tpp'`, the QCFS path and the
exact-count oracle. Runs on SpikingJelly 2.0.0 and (second pass of `make test`) 0.0.0.0.14."""

import copy

import pytest
import torch
from gpu_helpers import ORACLE_DEVICES
from spikingjelly.activation_based import ann2snn, functional, neuron  # noqa: E402
from torch import nn

import tpp_plugin
from tpp_plugin.adapters.spikingjelly import (
    IS_LEGACY,
    TemporalPermutation,
    TPPNode,
    convert_qcfs,
    insert_permutation,
    swap_neurons,
)
from tpp_plugin.experiments.demo import spikingjelly_accuracy


def rate_convert(ann, loader, **hook):
    if IS_LEGACY:
        return ann2snn.Converter(loader, mode="99.9%", **hook)(ann)
    return ann2snn.Converter(ann2snn.RateCodingRecipe(loader, mode="99.9%", **hook)).convert(ann)


def modules_of(net, cls):
    return [m for m in net.modules() if type(m) is cls]


@torch.no_grad()
def predictions(snn, x, T):
    functional.set_step_mode(snn, "m")
    functional.reset_net(snn)
    out = snn(x.unsqueeze(0).expand(T, *x.shape)).mean(0)
    functional.reset_net(snn)
    return out.argmax(1)


@torch.no_grad()
def predictions_single_step(snn, x, T):
    functional.set_step_mode(snn, "s")
    functional.reset_net(snn)
    out = sum(snn(x) for _ in range(T)) / T
    functional.reset_net(snn)
    return out.argmax(1)


# ---------------------------------------------------------------- the converter keyword
def test_neuron_tpp_hook_builds_tpp_nodes(relu_cnn, digits_loaders):
    train, _ = digits_loaders
    snn = rate_convert(relu_cnn, train, neuron="tpp", neuron_kwargs={"count": "exact", "seed": 0})
    nodes = modules_of(snn, TPPNode)
    assert len(nodes) == 5 and not modules_of(snn, neuron.IFNode)
    assert all(n.count == "exact" and n.v_threshold == 1.0 for n in nodes)
    assert len({n.seed for n in nodes}) == 5  # independent streams per layer


def test_neuron_if_is_the_default_behaviour(relu_cnn, digits):
    train = [(digits[0][:128], digits[1][:128])]
    default = rate_convert(relu_cnn, train)
    explicit = rate_convert(relu_cnn, train, neuron="if")
    x = digits[2][:64]
    for T in (4, 16):
        expected = predictions_single_step(default, x, T)  # plain 0.0.0.0.14 output: 's' only
        assert torch.equal(predictions_single_step(explicit, x, T), expected)
        assert torch.equal(predictions(explicit, x, T), expected)


def test_neuron_class_and_argument_errors(relu_cnn, digits):
    train = [(digits[0][:64], digits[1][:64])]
    snn = rate_convert(relu_cnn, train, neuron=TPPNode, neuron_kwargs={"count": "exact"})
    assert len(modules_of(snn, TPPNode)) == 5
    with pytest.raises(ValueError, match="neuron"):
        rate_convert(relu_cnn, train, neuron="lif")
    with pytest.raises(TypeError, match="neuron_kwargs"):
        rate_convert(relu_cnn, train, neuron_kwargs={"count": "exact"})


@pytest.mark.skipif(IS_LEGACY, reason="neuron_factory exists on 2.x only")
def test_neuron_and_neuron_factory_are_exclusive(digits):
    with pytest.raises(TypeError, match="neuron_factory"):
        ann2snn.RateCodingRecipe([], neuron="tpp", neuron_factory=lambda s: TPPNode())


def test_converted_tpp_net_runs_in_both_step_modes(relu_cnn, digits):
    train = [(digits[0][:128], digits[1][:128])]
    T = 4
    snn = rate_convert(relu_cnn, train, neuron="tpp", neuron_kwargs={"count": "exact", "T": T})
    x = digits[2][:16]
    multi = predictions(snn, x, T)
    functional.set_step_mode(snn, "s")
    functional.reset_net(snn)
    steps = (5 + 1) * T  # 5 TPP layers: (L + 1)·T steps, the last window holds the answer
    outs = torch.stack([snn(x) for _ in range(steps)])
    assert torch.equal(outs[-T:].mean(0).argmax(1), multi)
    functional.reset_net(snn)
    assert all(n.spike_buffer is None and n.t == 0 for n in modules_of(snn, TPPNode))


def test_tpp_beats_default_if_at_low_T(relu_cnn, digits_loaders):
    """The method's headline (DESIGN §1) on the digits CNN: with SpikingJelly's default IF
    (v starts at 0) a 5-layer net is silent at T=4; TPP is close to the ANN."""
    train, test = digits_loaders
    ann_acc = tpp_plugin.experiments.models.ann_accuracy(relu_cnn, test)
    if_acc = spikingjelly_accuracy(rate_convert(relu_cnn, train, neuron="if"), test, 4)
    tpp = rate_convert(relu_cnn, train, neuron="tpp", neuron_kwargs={"count": "exact", "seed": 0})
    tpp_acc = spikingjelly_accuracy(tpp, test, 4)
    assert tpp_acc > if_acc + 0.3
    assert tpp_acc > ann_acc - 0.1


# ---------------------------------------------------------------- swapping and permutation
def test_swap_neurons_keeps_thresholds_and_step_mode(relu_cnn, digits):
    snn = rate_convert(relu_cnn, [(digits[0][:64], digits[1][:64])])
    functional.set_step_mode(snn, "m")
    swap_neurons(snn, "tpp", count="exact", seed=3)
    nodes = modules_of(snn, TPPNode)
    # per-layer seeds spawned from 3 (docs/design.md, "Seeds")
    assert len(nodes) == 5 and [n.seed for n in nodes] == tpp_plugin.functional.spawn_seeds(3, 5)
    assert all(n.step_mode == "m" for n in nodes)
    swap_neurons(snn, "if", v_init=0.5)
    assert len(modules_of(snn, neuron.IFNode)) == 5
    with pytest.raises(ValueError, match="IFNode"):
        swap_neurons(nn.Sequential(nn.Linear(2, 2)))


def test_insert_permutation_after_if(relu_cnn, digits):
    train = [(digits[0][:256], digits[1][:256])]
    snn = rate_convert(relu_cnn, train, neuron="if")
    insert_permutation(snn, scope="neuron", seed=0)
    perms = modules_of(snn, TemporalPermutation)
    assert len(perms) == 5
    x = digits[2][:64]
    pred = predictions(snn, x, 8)
    assert pred.shape == (64,)
    assert all(p.spike_buffer is None for p in perms)  # reset_net reached them


def test_insert_permutation_preserves_first_layer_counts():
    first = nn.Sequential(neuron.IFNode(v_reset=None, step_mode="m"))
    permuted = insert_permutation(
        nn.Sequential(neuron.IFNode(v_reset=None, step_mode="m")), seed=0
    )
    x_seq = torch.rand(8, 4, 6) * 0.7
    a, b = first(x_seq), permuted(x_seq)
    assert torch.equal(a.sum(0), b.sum(0)) and not torch.equal(a, b)


# ---------------------------------------------------------------- QCFS path and the oracle
#: where the oracle runs: the CPU in float32; on a GPU in float64 (in float32, cuDNN's default
#: TF32 convolutions would round the ANN and the SNN differently), with either TPP backend
DEVICES = ORACLE_DEVICES


@pytest.mark.parametrize("device, backend", DEVICES)
@pytest.mark.parametrize("T", [1, 2, 4, 8])
def test_exact_tpp_equals_qcfs_ann_with_L_equal_T(qcfs_cnn, digits, T, device, backend):
    """DESIGN §1 fact 3: exact-count TPP == the QCFS ANN with L = T, image for image."""
    x, ann = digits[2], qcfs_cnn
    if device != "cpu":
        x, ann = x.to(device, torch.float64), copy.deepcopy(qcfs_cnn).to(device, torch.float64)
    snn = convert_qcfs(ann, "tpp", {"count": "exact", "seed": T}).to(device, x.dtype)
    for node in modules_of(snn, TPPNode):
        node.backend = backend
    with tpp_plugin.qcfs_levels(ann, T), torch.no_grad():
        ann_pred = ann(x).argmax(1)
    assert torch.equal(predictions(snn, x, T), ann_pred)


def test_qcfs_conversion_thresholds_and_defaults(qcfs_cnn):
    lams = [m.threshold for m in qcfs_cnn.modules() if isinstance(m, tpp_plugin.QCFS)]
    snn = convert_qcfs(qcfs_cnn, "if")
    ifs = modules_of(snn, neuron.IFNode)
    assert len(ifs) == len(lams) and all(n.v == 0.5 for n in ifs)  # θ/2 start
    scalers = [m.scale.item() for name, m in snn.named_modules() if name.endswith("scaler1")]
    assert scalers == pytest.approx(lams)
    tpp = convert_qcfs(qcfs_cnn, "tpp")
    assert all(n.v_init == 0.0 and n.count == "bernoulli" for n in modules_of(tpp, TPPNode))
    assert any(isinstance(m, tpp_plugin.QCFS) for m in qcfs_cnn.modules())  # ANN untouched
    with pytest.raises(ValueError, match="QCFS"):
        convert_qcfs(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))


@pytest.mark.skipif(IS_LEGACY, reason="recipes exist on 2.x only")
def test_qcfs_recipe_is_registered_and_matches_convert_qcfs(qcfs_cnn, digits):
    assert ann2snn.QCFSRecipe is tpp_plugin.adapters.spikingjelly.QCFSRecipe
    recipe = ann2snn.QCFSRecipe(neuron="tpp", neuron_kwargs={"count": "exact"})
    snn = ann2snn.Converter(recipe).convert(qcfs_cnn)
    x = digits[2][:128]
    ref = convert_qcfs(qcfs_cnn, "tpp", {"count": "exact"})
    assert torch.equal(predictions(snn, x, 4), predictions(ref, x, 4))


@pytest.mark.skipif(not IS_LEGACY, reason="0.0.0.0.14 converter hook")
def test_legacy_converter_result_runs_multi_step(relu_cnn, digits):
    train = [(digits[0][:128], digits[1][:128])]
    snn = ann2snn.Converter(train, mode="max", neuron="if")(relu_cnn)
    pred = predictions(snn, digits[2][:32], 8)  # would fail on plain 0.0.0.0.14 output
    assert pred.shape == (32,)
