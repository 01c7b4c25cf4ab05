"""snnTorch converter on non-Sequential models (torch.fx), shared activations and max pooling.

The oracle: a network of exact-count TPP neurons computes the ANN with every activation *call*
rounded to ``T`` levels of its own threshold, ``θ·clamp(floor(a·T/θ + ½), 0, T)/T``, max-pools
included (float64, so no potential sits on a rounding boundary by accident). CPU, fixed seeds.
"""

from __future__ import annotations

import copy

import pytest
import snntorch
import torch
from gpu_helpers import ORACLE_DEVICES
from torch import fx, nn

import tpp_plugin
from tpp_plugin import registry
from tpp_plugin.adapters import snntorch as adapter
from tpp_plugin.adapters.snntorch import IF, TPP, convert, steps_needed
from tpp_plugin.experiments.models import cnn5_maxpool, resnet

SIZE = 8


pytestmark = pytest.mark.usefixtures("one_thread", "fresh_snntorch")


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return x, torch.tensor(d.target)


def _train(ann, steps=60):
    torch.manual_seed(0)
    x, y = _digits()
    opt = torch.optim.Adam(ann.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    ann.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (64,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(ann(x[idx]), y[idx]).backward()
        opt.step()
    ann = ann.eval().double()
    return ann, x.double(), y


@pytest.fixture(scope="module")
def trained():
    """Briefly trained small ResNet and max-pool CNN (digits, 8×8, 4 channels), float64."""
    torch.manual_seed(0)
    nets = {"resnet": _train(resnet(image_size=SIZE, channels=4)),
            "cnn5_maxpool": _train(cnn5_maxpool(image_size=SIZE, channels=4))}
    for ann, x, y in nets.values():
        with torch.no_grad():
            assert (ann(x).argmax(1) == y).float().mean() > 0.5  # a meaningful model
    return nets


@torch.no_grad()
def call_maxima(ann, x):
    """Max of each activation call's output on ``x``: the thresholds of ``mode='max'``."""
    maxima = []
    handles = [m.register_forward_hook(lambda m, i, o: maxima.append(float(o.max())))
               for m in ann.modules() if isinstance(m, nn.ReLU)]
    try:
        ann(x)
    finally:
        for h in handles:
            h.remove()
    return maxima


@torch.no_grad()
def quantised_ann(ann, x, thresholds, T, before_pool=True):
    """The ANN with the ``k``-th activation call rounded to ``T`` levels of ``thresholds[k]``
    (round half up, as the exact count does); ``before_pool=False`` rounds after a following
    max-pool instead (the same, since rounding is monotone)."""
    calls = iter(thresholds)

    def rounded(a, theta):
        return theta * torch.clamp(torch.floor(a * T / theta + 0.5), 0, T) / T

    def hook(_m, _i, out):
        return rounded(out, next(calls))

    if before_pool:
        handles = [m.register_forward_hook(hook) for m in ann.modules() if isinstance(m, nn.ReLU)]
    else:  # round at the max-pool's output for ReLU → MaxPool pairs
        handles = []
        mods = list(ann)
        for i, m in enumerate(mods):
            if isinstance(m, nn.ReLU):
                nxt = mods[i + 1] if i + 1 < len(mods) else None
                target = nxt if isinstance(nxt, nn.MaxPool2d) else m
                handles.append(target.register_forward_hook(hook))
    try:
        return ann(x)
    finally:
        for h in handles:
            h.remove()


def thresholds_of(net):
    return [float(m.threshold) for m in net.modules() if isinstance(m, (TPP, IF))]


# ----------------------------------------------------------------------------------------------
# the oracle: exact-count TPP == quantised ANN, image for image
# ----------------------------------------------------------------------------------------------
#: the oracle on the CPU, and on a GPU with either TPP backend (converted on the CPU, then the
#: network and the images moved to the device; the reference stays on the CPU)
DEVICES = ORACLE_DEVICES


@pytest.mark.parametrize("device, backend", DEVICES)
@pytest.mark.parametrize("model", ["resnet", "cnn5_maxpool"])
@pytest.mark.parametrize("T", [1, 2, 4])
def test_exact_tpp_equals_quantised_ann(trained, model, T, device, backend):
    ann, x, _ = trained[model]
    calib, x = x[:256], x[256:556]
    net = convert(ann, [calib], num_steps=T, count="exact", seed=0, backend=backend)
    expected_type = nn.Sequential if model == "cnn5_maxpool" else fx.GraphModule
    assert isinstance(net, expected_type)
    theta = call_maxima(ann, calib)
    # one neuron per activation call, each with its own threshold (the resnet calls 9, with 4
    # ReLU modules; the max-pool CNN's two max-pools are inside two neurons)
    assert len(theta) == (9 if model == "resnet" else 5)
    assert thresholds_of(net) == pytest.approx(theta, rel=1e-6)  # calibrated in float32
    theta = thresholds_of(net)
    assert not any(isinstance(m, nn.MaxPool2d) and not isinstance(p, TPP)
                   for p in net.modules() for m in p.children())
    with torch.no_grad():
        out = net.to(device)(x.to(device).expand(T, *x.shape)).mean(0)
    assert out.device.type == device
    out = out.cpu()
    ref = quantised_ann(ann, x, theta, T)
    assert torch.equal(out.argmax(1), ref.argmax(1))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-9)
    # and the spiking net is a real approximation of the ANN: not the ANN itself at T=1
    if T == 1:
        with torch.no_grad():
            assert (out - ann(x)).abs().max() > 1e-3


def test_rounding_commutes_with_max_pool(trained):
    ann, x, _ = trained["cnn5_maxpool"]
    theta = call_maxima(ann, x[:256])
    for T in (1, 2, 4):
        before = quantised_ann(ann, x[256:556], theta, T)
        after = quantised_ann(ann, x[256:556], theta, T, before_pool=False)
        torch.testing.assert_close(before, after, rtol=0, atol=1e-12)


def test_max_pool_becomes_tpp_pool_and_if_keeps_it(trained):
    ann, x, _ = trained["cnn5_maxpool"]
    net = convert(ann, [x[:256]], num_steps=2, count="exact", seed=0)
    pools = [m.pool for m in net if isinstance(m, TPP) and m.pool is not None]
    assert len(pools) == 2 and all(isinstance(p, nn.MaxPool2d) for p in pools)
    assert len(net) == len(ann) - 2  # the two max-pools live inside neurons now
    if_net = convert(ann, [x[:256]], num_steps=2, neuron="if")
    assert sum(isinstance(m, nn.MaxPool2d) for m in if_net.modules()) == 2
    # max-pool → activation is merged too (pool the potential, then fire), and both sides of
    # one activation at once
    swapped = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.MaxPool2d(2), nn.ReLU(),
                            nn.Flatten(), nn.Linear(32, 3)).double().eval()
    net = convert(swapped, [x[:64]], num_steps=4, count="exact", seed=0)
    assert isinstance(net[1], TPP) and isinstance(net[1].pool, nn.MaxPool2d)
    both = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.MaxPool2d(2), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 3)).double().eval()
    net_both = convert(both, [x[:64]], num_steps=4, count="exact", seed=0)
    assert [type(p) for p in net_both[1].pool] == [nn.MaxPool2d, nn.MaxPool2d]
    with torch.no_grad():
        out = net_both(x[:64].expand(4, 64, 1, 8, 8)).mean(0)
    ref = quantised_ann(both, x[:64], thresholds_of(net_both), 4)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-9)
    theta = thresholds_of(net)
    assert theta == pytest.approx(call_maxima(swapped, x[:64]), rel=1e-6)
    with torch.no_grad():
        out = net(x[:64].expand(4, 64, 1, 8, 8)).mean(0)
    torch.testing.assert_close(out, quantised_ann(swapped, x[:64], theta, 4), rtol=0, atol=1e-9)


# ----------------------------------------------------------------------------------------------
# a ReLU module used twice in a Sequential
# ----------------------------------------------------------------------------------------------
def test_relu_used_twice_in_a_sequential_gets_two_neurons():
    torch.manual_seed(0)
    x, _ = _digits()
    x = x.flatten(1).double()
    relu = nn.ReLU()
    ann = nn.Sequential(nn.Linear(64, 32), relu, nn.Linear(32, 32), relu,
                        nn.Linear(32, 10)).double().eval()
    T = 8
    net = convert(ann, [x[:512]], num_steps=T, count="exact", seed=0)
    neurons = [m for m in net if isinstance(m, TPP)]
    assert len(neurons) == 2 and neurons[0] is not neurons[1]
    theta = call_maxima(ann, x[:512])
    assert thresholds_of(net) == pytest.approx(theta, rel=1e-6)
    theta = thresholds_of(net)
    assert theta[0] != pytest.approx(theta[1])  # two calls, two different statistics
    with torch.no_grad():
        out = net(x.expand(T, *x.shape)).mean(0)
        ann_out = ann(x)
    torch.testing.assert_close(out, quantised_ann(ann, x, theta, T), rtol=0, atol=1e-9)
    # within the quantisation error of the ANN: at most half a level per hidden unit
    err = (out - ann_out).abs().max()
    bound = sum(t / T / 2 for t in theta) * max(float(m.weight.detach().abs().sum(1).max())
                                                 for m in ann if isinstance(m, nn.Linear))
    assert err < bound


# ----------------------------------------------------------------------------------------------
# count mode, time loop
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model, count", [("resnet", "exact"), ("resnet", "bernoulli"),
                                          ("cnn5_maxpool", "bernoulli")])
def test_count_mode_on_converted_resnet(trained, model, count):
    ann, x, _ = trained[model]
    calib, x = x[:256], x[256:456]
    T = 4
    net = convert(ann, [calib], num_steps=T, count=count, seed=0)

    def reseed():
        for m in net.modules():
            if isinstance(m, TPP):
                m.manual_seed(m.seed)

    reseed()
    with torch.no_grad():
        full = net(x.expand(T, *x.shape)).mean(0)
    reseed()
    with torch.no_grad(), tpp_plugin.count_mode(net, T, bernoulli="draw-equal"):
        fast = net(x)
    assert torch.equal(full.argmax(1), fast.argmax(1))
    torch.testing.assert_close(full, fast, rtol=0, atol=1e-9)
    with torch.no_grad():  # restored on exit: sequences again
        assert net(x.expand(T, *x.shape)).shape == (T, len(x), 10)


def test_time_loop_max_pool_equals_sequence(trained):
    ann, x, _ = trained["cnn5_maxpool"]
    calib, x = x[:256], x[256:356]
    T = 2
    loop = convert(ann, [calib], num_steps=T, seed=5, sequence=False,
                   streaming="delayed")
    seq = convert(ann, [calib], num_steps=T, seed=5)
    assert sum(m.pool is not None for m in loop if isinstance(m, TPP)) == 2
    with torch.no_grad():
        out_loop = torch.stack([loop(x) for _ in range(steps_needed(loop))])[-T:]
        torch.testing.assert_close(out_loop, seq(x.expand(T, *x.shape)), rtol=0, atol=1e-9)


@pytest.mark.parametrize("count", ["bernoulli", "exact"])
def test_time_loop_resnet_equals_sequence(trained, count):
    ann, x, _ = trained["resnet"]
    calib, x = x[:256], x[256:356]
    T = 4
    loop = convert(ann, [calib], num_steps=T, count=count, seed=3, sequence=False,
                   streaming="delayed")
    seq = convert(ann, [calib], num_steps=T, count=count, seed=3)
    n_steps = steps_needed(loop)
    assert n_steps == (9 + 1) * T  # the longest path passes all 9 TPP layers
    assert steps_needed(seq, T) == T  # sequence-mode neurons do not delay
    # the shortcuts wait for the main path: one window per TPP layer they skip
    delays = [m for m in loop.modules() if isinstance(m, adapter._WindowDelay)]
    assert sorted(d.windows for d in delays) == [1, 1, 1, 1]
    warmups = sorted(m.warmup_windows for m in loop.modules() if isinstance(m, TPP))
    assert warmups == list(range(9))
    adapter.reset(loop)
    with torch.no_grad():
        out_loop = torch.stack([loop(x) for _ in range(n_steps)])
        out_seq = seq(x.expand(T, *x.shape))
    torch.testing.assert_close(out_loop[-T:], out_seq, rtol=0, atol=1e-9)
    # before the last window the TPP layers are silent: only the classifier's bias comes out
    fc_bias = loop.fc.bias.expand(len(x), 10)
    assert all(torch.equal(o, fc_bias) for o in out_loop[:-T])
    # snntorch's own reset clears the delays too: a second run warms up again, and with exact
    # counts gives the same window mean (the spike positions are new random draws)
    snntorch.utils.reset(loop)
    assert all(len(d._queue) == 0 for d in delays)
    if count == "exact":
        with torch.no_grad():
            again = torch.stack([loop(x) for _ in range(n_steps)])
        assert all(torch.equal(o, fc_bias) for o in again[:-T])
        torch.testing.assert_close(again[-T:].mean(0), out_loop[-T:].mean(0), rtol=0, atol=1e-9)


def test_graph_if_and_permutation(trained):
    ann, x, _ = trained["resnet"]
    ann, x = copy.deepcopy(ann).float(), x.float()  # snnTorch's Leaky fires float32 spikes
    calib, x = x[:256], x[256:356]
    T = 4
    if_net = convert(ann, [calib], num_steps=T, neuron="if", permutation="neuron", seed=0)
    assert sum(isinstance(m, IF) for m in if_net.modules()) == 9
    assert sum(isinstance(m, adapter.TemporalPermutation) for m in if_net.modules()) == 9
    with torch.no_grad():
        out = if_net(x.expand(T, *x.shape))
    assert out.shape == (T, len(x), 10)
    # the IF time loop needs no delays (IF neurons do not wait for a window) and agrees with
    # the sequence (no permutation: deterministic)
    loop = convert(ann, [calib], num_steps=T, neuron="if", sequence=False)
    seq = convert(ann, [calib], num_steps=T, neuron="if")
    assert not any(isinstance(m, adapter._WindowDelay) for m in loop.modules())
    with torch.no_grad():
        out_loop = torch.stack([loop(x) for _ in range(T)])
        torch.testing.assert_close(out_loop, seq(x.expand(T, *x.shape)), rtol=0, atol=1e-9)


# ----------------------------------------------------------------------------------------------
# graph features: view/reshape with x.size(0), several windows, custom modules
# ----------------------------------------------------------------------------------------------
class ViewNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.act = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(3 * 4 * 4, 6)
        self.act2 = nn.ReLU()
        self.ident = nn.Identity()
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = self.pool(self.act(self.conv(x)))
        h = h.view(h.size(0), -1)
        h = self.act2(self.fc(self.drop(h)))
        h = self.ident(h).reshape(h.shape[0], 6) + 0.0
        return self.out(h)


def test_sequential_of_residual_blocks_takes_the_graph_path():
    from tpp_plugin.experiments.models import BasicBlock

    torch.manual_seed(0)
    ann = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), BasicBlock(4, 4),
                        BasicBlock(4, 8, stride=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 3)).double().eval()
    x = torch.rand(16, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    T = 4
    net = convert(ann, [x], num_steps=T, count="exact", seed=0)
    assert isinstance(net, fx.GraphModule)  # the adds of the blocks are kept
    assert len(thresholds_of(net)) == 5
    with torch.no_grad():
        out = net(x.expand(T, *x.shape)).mean(0)
    ref = quantised_ann(ann, x, thresholds_of(net), T)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-9)


def test_view_reshape_dropout_identity_are_time_aware():
    torch.manual_seed(1)
    ann = ViewNet().double().eval()
    x = torch.rand(32, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    T = 4
    net = convert(ann, [x], num_steps=T, count="exact", seed=0)
    assert isinstance(net, fx.GraphModule)
    assert not any(isinstance(m, nn.Dropout) for m in net.modules())
    theta = thresholds_of(net)
    assert theta == pytest.approx(call_maxima(ann, x), rel=1e-6)
    with torch.no_grad():
        out = net(x.expand(2 * T, *x.shape))  # two windows in one sequence
    assert out.shape == (2 * T, 32, 3)
    ref = quantised_ann(ann, x, theta, T)
    torch.testing.assert_close(out[:T].mean(0), ref, rtol=0, atol=1e-9)
    torch.testing.assert_close(out[T:].mean(0), ref, rtol=0, atol=1e-9)


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------
class SharedPool(nn.Module):
    """ReLU → MaxPool, but the ReLU's output also feeds a second branch."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(2 * 4 * 4 + 2 * 8 * 8, 3)

    def forward(self, x):
        a = self.relu(self.conv(x))
        return self.fc(torch.cat([torch.flatten(self.pool(a), 1), torch.flatten(a, 1)], 1))


class Tanh(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.relu = nn.ReLU()

    def forward(self, x):
        return torch.tanh(self.relu(self.fc(x)))


class FunctionalReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(torch.nn.functional.relu(x))


class Product(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.relu = nn.ReLU()

    def forward(self, x):
        a = self.relu(self.fc(x))
        return a * a


class Growing(nn.Module):
    """Calls its ReLU once more on every forward: the trace and the calibration disagree."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.relu = nn.ReLU()
        self.n = 0

    def forward(self, x):
        self.n += 1
        for _ in range(self.n):
            x = self.relu(self.fc(x))
        return x


class Branching(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else x


def test_errors_name_what_cannot_convert():
    x = torch.rand(8, 1, 8, 8)
    with pytest.raises(ValueError, match=r"max pooling 'pool'.*next to an activation"):
        convert(SharedPool(), [x], num_steps=4)
    # a max-pool on spikes that no activation is next to
    pool_after_linear = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(2, 2, 1), nn.MaxPool2d(2))
    with pytest.raises(ValueError, match=r"max pooling '3'"):
        convert(pool_after_linear, [x], num_steps=4)
    snntorch.SpikingNeuron.init()
    with pytest.raises(TypeError, match=r"graph node 'tanh'.*activation function"):
        convert(Tanh(), [torch.rand(8, 4)], num_steps=4)
    with pytest.raises(TypeError, match=r"graph node 'relu'.*activation function.*nn.ReLU"):
        convert(FunctionalReLU(), num_steps=4)  # even before any neuron: it would stay a ReLU
    with pytest.raises(TypeError, match=r"graph node 'mul'.*not affine"):
        convert(Product(), [torch.rand(8, 4)], num_steps=4)
    with pytest.raises(ValueError, match=r"called ReLU 2 times, but 1 calls were expected"):
        convert(Growing(), [torch.rand(8, 4)], num_steps=4)
    with pytest.raises(TypeError, match=r"cannot trace .*Branching"):
        convert(Branching(), num_steps=4)
    unknown = Tanh()
    unknown.relu = nn.GELU()
    with pytest.raises(TypeError, match=r"module 'relu' of type torch\.nn\.modules.*GELU"):
        convert(unknown, num_steps=4)
    assert snntorch.SpikingNeuron.instances == []  # nothing was built
    convert(pool_after_linear, [x], num_steps=4, neuron="if")  # IF: max-pool on spikes, allowed


def test_spike_grad_is_refused():
    from snntorch import surrogate

    with pytest.raises(TypeError, match="spike_grad.*no surrogate gradient"):
        TPP(num_steps=4, spike_grad=surrogate.fast_sigmoid())
    with pytest.raises(TypeError, match="surrogate_disable=False"):
        TPP(num_steps=4, surrogate_disable=False)
    ann = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    with pytest.raises(TypeError, match="spike_grad"):
        convert(ann, [torch.rand(4, 3)], num_steps=4, spike_grad=surrogate.fast_sigmoid())
    assert snntorch.SpikingNeuron.instances == []
    TPP(num_steps=4, surrogate_disable=True)  # asking for no surrogate is fine


# ----------------------------------------------------------------------------------------------
# NIR export
# ----------------------------------------------------------------------------------------------
def test_nir_export_guard_names_the_module():
    """The guard the plugin puts around snntorch.export_nir (tested without nir installed)."""
    calls = []

    def export(module, sample_data, *args, **kwargs):
        calls.append(module)
        return "graph"

    def extract(module):
        return "node"

    guarded_export = adapter._wrap_export_to_nir(export)
    guarded_extract = adapter._wrap_extract_module(extract)
    net = nn.Sequential(nn.Linear(3, 3), nn.Sequential(TPP(num_steps=4, init_hidden=True)))
    with pytest.raises(TypeError, match=r"module '1\.0' \(tpp_plugin.*TPP\).*no NIR primitive"):
        guarded_export(net, torch.zeros(1, 3))
    with pytest.raises(TypeError, match=r"TPP.*no NIR primitive"):
        guarded_extract(net[1][0])
    perm = nn.Sequential(nn.Linear(3, 3), adapter.TemporalPermutation())
    with pytest.raises(TypeError, match=r"module '1'.*TemporalPermutation"):
        guarded_export(perm, torch.zeros(1, 3))
    seq_if = nn.Sequential(adapter.TimeFlatten(nn.Linear(3, 3)), IF(init_hidden=True))
    with pytest.raises(TypeError, match=r"module '0'.*TimeFlatten.*sequence=False"):
        guarded_export(seq_if, torch.zeros(1, 3))
    assert calls == []
    plain = nn.Sequential(nn.Linear(3, 3), snntorch.Leaky(0.9, init_hidden=True))
    assert guarded_export(plain, torch.zeros(1, 3)) == "graph" and calls == [plain]
    assert guarded_extract(plain[0]) == "node"


def test_nir_export_of_a_tpp_net_raises_a_clear_error():
    pytest.importorskip("nir")
    pytest.importorskip("nirtorch")
    registry.unregister("snntorch")
    registry.register("snntorch")  # snntorch.export_nir is importable: the plugin guards it
    from snntorch.export_nir import export_to_nir

    relu = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    net = convert(relu, [torch.rand(8, 4)], num_steps=4, sequence=False, streaming="delayed",
                  seed=0)
    with pytest.raises(TypeError, match=r"module '1' \(.*TPP\).*no NIR primitive"):
        export_to_nir(net, torch.zeros(1, 4))
    import snntorch.export_nir

    registry.unregister("snntorch")  # the exporter is snnTorch's own again
    try:
        for name in ("export_to_nir", "_extract_snntorch_module"):
            assert not hasattr(getattr(snntorch.export_nir, name), "__tpp_plugin_wrapper__")
    finally:
        registry.register("snntorch")


# ----------------------------------------------------------------------------------------------
# torchvision's own ResNet: shared inplace ReLUs, `out += identity`, stem ReLU → MaxPool
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["resnet18", pytest.param("resnet50", marks=pytest.mark.slow)])
def test_torchvision_resnet_exact_and_streamed(arch):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    ann = getattr(torchvision.models, arch)(num_classes=10).double().eval()
    for m in ann.modules():  # running statistics away from the identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    x = torch.rand(6, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    T = 2
    net = convert(ann, [x], num_steps=T, count="exact", seed=0)
    neurons = [m for m in net.modules() if isinstance(m, TPP)]
    assert len(neurons) == (17 if arch == "resnet18" else 49)
    assert sum(m.pool is not None for m in neurons) == 1  # the stem's max-pool
    with torch.no_grad():
        out = net(x.expand(T, *x.shape)).mean(0)
    ref = quantised_ann(ann, x, thresholds_of(net), T)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-9)
    loop = convert(ann, [x], num_steps=T, count="exact", seed=0, sequence=False)
    adapter.reset(loop)
    with torch.no_grad():
        rec = torch.stack([loop(x) for _ in range(steps_needed(loop))])
    torch.testing.assert_close(rec[-T:].mean(0), out, rtol=0, atol=1e-9)


# ----------------------------------------------------------------------------------------------
# the reproduce command on the residual and the max-pool model
# ----------------------------------------------------------------------------------------------
def test_reproduce_snntorch_resnet_and_cnn5_maxpool(tmp_path):
    import json

    from tpp_plugin.cli import main as cli_main

    code = cli_main(["reproduce", "--framework", "snntorch", "--model", "resnet", "cnn5_maxpool",
                     "--ann", "qcfs", "--subset", "200", "100", "--epochs", "1", "--T", "1", "2",
                     "--seeds", "1", "--no-plot", "--out", str(tmp_path)])
    assert code == 0
    for model, layers in (("resnet", 9), ("cnn5_maxpool", 5)):
        result = json.loads((tmp_path / f"digits-{model}-qcfs-L4-snntorch.json").read_text())
        assert result["config"]["spiking_layers"] == layers
        assert result["oracle"]["holds"] is True  # exact TPP == QCFS ANN with L=T, per image


@pytest.mark.parametrize("T", [1, 2, 4])
@pytest.mark.parametrize("build", [cnn5_maxpool, resnet])
def test_calibrated_conversion_equals_the_quantised_ann(build, T):
    """mode='tpp': per-channel thresholds, output steps and bias corrections chosen for T
    (tpp_plugin.calibration); exact TPP equals the calibration's quantised ANN (float64)."""
    from tpp_plugin.calibration import calibrate_for_T, quantised_ann

    torch.manual_seed(0)
    ann = build(image_size=SIZE, channels=4).double().eval()
    x = torch.rand(64, 1, SIZE, SIZE, dtype=torch.float64)
    net = convert(ann, [x], num_steps=T, mode="tpp", count="exact", seed=0)
    assert any(m.threshold.dim() == 3 for m in net.modules() if isinstance(m, TPP))  # [C, 1, 1]
    with torch.no_grad():
        got = net(x.expand(T, *x.shape)).mean(0)
        expected = quantised_ann(ann, calibrate_for_T(ann, [x], T, fuse=False), T)(x)
    assert torch.equal(got.argmax(1), expected.argmax(1))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="mode='tpp'.*calibration="):
        convert(ann, num_steps=T, mode="tpp")


@pytest.mark.parametrize("build", [cnn5_maxpool, resnet])
def test_a_finetuned_calibration_as_mode_equals_its_quantised_ann(build):
    """A calibration fine-tuned against the ANN (calibrate_for_T(finetune_epochs=...)) passed as
    mode: its tuned weights, thresholds and output steps give exact TPP == its quantised ANN."""
    from tpp_plugin.calibration import calibrate_for_T, quantised_ann

    torch.manual_seed(0)
    ann = build(image_size=SIZE, channels=4).double().eval()
    x = torch.rand(64, 1, SIZE, SIZE, dtype=torch.float64)
    result = calibrate_for_T(ann, [x], 2, fuse=False, finetune_epochs=2, finetune_holdout=0.0)
    assert result.settings["finetune"]["epoch"] == 2 and result.weights
    net = convert(ann, [x], num_steps=2, mode=result, count="exact", seed=0)
    with torch.no_grad():
        got = net(x.expand(2, *x.shape)).mean(0)
        expected = quantised_ann(ann, result, 2)(x)
    assert torch.equal(got.argmax(1), expected.argmax(1))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-9)


def test_a_calibration_result_as_mode_builds_the_mode_tpp_network():
    """mode=<CalibrationResult>: one calibration, several networks (e.g. one per count); the
    network equals mode='tpp''s; a result for another T, or of a fused graph, is refused."""
    from tpp_plugin.calibration import calibrate_for_T

    torch.manual_seed(0)
    ann = cnn5_maxpool(image_size=SIZE, channels=4).double().eval()
    x = torch.rand(64, 1, SIZE, SIZE, dtype=torch.float64)
    result = calibrate_for_T(ann, [x], 2, fuse=False)
    with torch.no_grad():
        x_seq = x.expand(2, *x.shape)
        expected = convert(ann, [x], num_steps=2, mode="tpp", count="exact", seed=0)(x_seq)
        got = convert(ann, [x], num_steps=2, mode=result, count="exact", seed=0)(x_seq)
    assert torch.equal(got, expected)
    with pytest.raises(ValueError, match="made for T=2, but num_steps=4"):
        convert(ann, [x], num_steps=4, mode=result)
    with pytest.raises(ValueError, match="fuse=False"):
        convert(ann, [x], num_steps=2, mode=calibrate_for_T(ann, [x], 2))
    with pytest.raises(ValueError, match="pass calibration="):
        convert(ann, num_steps=2, mode=result)


# ----------------------------------------------------------------------------------------------
# the tutorial time loop, window-synchronous (the default): num_steps calls == sequence mode
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("count", ["exact", "bernoulli"])
@pytest.mark.parametrize("model", ["resnet", "cnn5_maxpool"])
def test_tutorial_time_loop_equals_sequence_mode_step_for_step(trained, model, count):
    """``for step in range(num_steps)`` on a converted fx ResNet / max-pool CNN returns, step for
    step, what sequence mode returns (float64; bernoulli with the same draws: same seeds)."""
    ann, x, _ = trained[model]
    calib, x = x[:256], x[256:356]
    T = 4
    loop = convert(ann, [calib], num_steps=T, count=count, seed=3, sequence=False)
    seq = convert(ann, [calib], num_steps=T, count=count, seed=3)
    assert isinstance(loop, adapter.TimeLoop) and steps_needed(loop) == T
    snntorch.utils.reset(loop)
    with torch.no_grad():
        steps = torch.stack([loop(x) for _ in range(T)])
        expected = seq(x.expand(T, *x.shape))
    assert torch.equal(steps, expected)
    assert 0 < steps.abs().sum()
    # a second window after snnTorch's reset draws new spikes from the same streams
    snntorch.utils.reset(loop)
    with torch.no_grad():
        again = torch.stack([loop(x) for _ in range(T)])
        expected_again = seq(x.expand(T, *x.shape))
    assert torch.equal(again, expected_again)
    if count == "exact":  # count mode sees through the loop: one ANN-sized pass
        with torch.no_grad(), tpp_plugin.count_mode(loop, T):
            torch.testing.assert_close(loop(x), steps.mean(0), rtol=0, atol=1e-9)


def test_tutorial_time_loop_refuses_a_changed_input_inside_a_window(trained):
    ann, x, _ = trained["resnet"]
    loop = convert(ann, [x[:64]], num_steps=4, seed=0, sequence=False)
    with torch.no_grad():
        loop(x[:8])
        with pytest.raises(ValueError, match=r"call 2/4 differs.*snntorch.utils.reset.*delayed"):
            loop(x[8:16])
        snntorch.utils.reset(loop)
        loop(x[8:16])  # a new window takes a new input (and batch size)
