"""Count-domain evaluation (tpp_plugin.count_mode) against the full [T, N, ...] simulation.

Equality tests run in float64. The full simulation adds the T step currents of a neuron one by
one, count mode multiplies one mean current by T; the two potentials differ by rounding only,
which in float64 (~1e-16 relative) does not move any of these potentials across a decision
boundary, so spike counts per layer and predictions must match exactly. (In float32 a potential
within ~1e-7 of a boundary could count one spike differently.)
"""

import copy

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
    with torch.no_grad(), tpp_plugin.count_mode(snn, T=T):
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
    with torch.no_grad(), tpp_plugin.count_mode(net):  # T from the layers' num_steps
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
