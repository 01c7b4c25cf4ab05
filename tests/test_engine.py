"""The window engine (tpp_plugin.engine) and the contract (tpp_plugin.contract): one
implementation of windows in time, random streams and graph passes for both frameworks.

* the step functions on their own (synchronous, delayed, the branch delay);
* SpikingJelly's and snnTorch's TPP neurons fire identical spikes for the same seed and input,
  for every count rule, also after moving the modules (dtype, device) and back: one random-stream
  rule;
* both frameworks' modules implement the contract, which framework-neutral code relies on;
* ``neuron='TPP'`` (any case) works in both frameworks' converters.
"""

import pytest
import torch
from torch import nn

from tpp_plugin import contract
from tpp_plugin.engine import (
    RandomStream,
    WindowState,
    delay_step,
    delayed_step,
    pair_max_pools,
    synchronous_step,
)

T = 4


# ----------------------------------------------------------------------------------------------
# the step functions
# ----------------------------------------------------------------------------------------------
def test_synchronous_step_returns_the_window_computed_at_its_first_call():
    calls = []

    def run_window(x_seq):
        calls.append(x_seq.shape)
        return x_seq.cumsum(0)

    x, state, out = torch.tensor([1.0, 2.0]), WindowState(), []
    for _ in range(T):
        y, state = synchronous_step((x,), state, T, run_window, what="net", reset="reset",
                                    sequence="seq")
        out.append(y)
    assert calls == [(T, 2)]  # one window computation for T calls
    assert torch.equal(torch.stack(out), x.expand(T, 2).cumsum(0))
    assert state == WindowState(windows=1)  # a window boundary: nothing kept


def test_synchronous_step_refuses_a_changed_input_and_keeps_its_state():
    x = torch.zeros(3)
    _, state = synchronous_step((x,), WindowState(), T, lambda s: s, what="the net",
                                reset="Reset it", sequence="feed sequences")
    with pytest.raises(ValueError, match=r"the net: .*call 2/4 differs.*Reset it.*feed sequences"):
        synchronous_step((x + 1,), state, T, lambda s: s, what="the net", reset="Reset it",
                         sequence="feed sequences")
    with pytest.raises(ValueError, match=r"shape \(4,\), the window started with \(3,\)"):
        synchronous_step((torch.zeros(4),), state, T, lambda s: s, what="net", reset="r",
                         sequence="s")
    assert state.t == 1  # the caller's state is untouched by a failed step


def test_delayed_step_emits_each_window_one_window_late_and_honours_warmup():
    fired = []

    def fire(acc):
        fired.append(acc.clone())
        return acc.expand(T, *acc.shape).clone()

    def integrate(acc, x, t):
        return x.clone() if acc is None else acc + x

    state, out = WindowState(), []
    for step in range(3 * T):
        y, state = delayed_step(torch.tensor([float(step)]), state, T, integrate, fire,
                                lambda: torch.zeros(1), warmup=1)
        out.append(float(y))
    # window 1 (warm-up) is integrated, not fired; window 2 (steps 4..7, sum 22) comes out late
    assert len(fired) == 2 and float(fired[0]) == 22.0
    assert out[: 2 * T] == [0.0] * (2 * T) and out[2 * T:] == [22.0] * T


def test_delay_step_delays_by_whole_steps():
    queue, out = (), []
    for step in range(6):
        y, queue = delay_step(torch.tensor(float(step + 1)), queue, 2)
        out.append(float(y))
    assert out == [0.0, 0.0, 1.0, 2.0, 3.0, 4.0] and len(queue) == 2


def test_pair_max_pools_takes_the_pools_a_neuron_can_absorb():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pre, self.act, self.post, self.other = (nn.MaxPool2d(2), nn.ReLU(),
                                                         nn.MaxPool2d(2), nn.ReLU())

        def forward(self, x):
            y = self.post(self.act(self.pre(x)))
            return y + self.other(y)

    gm = torch.fx.symbolic_trace(Net())
    nodes = {n.target: n for n in gm.graph.nodes}
    is_pool = lambda n: n.op == "call_module" and n.target in ("pre", "post")  # noqa: E731
    paired = pair_max_pools([nodes["act"], nodes["other"]], is_pool)
    assert paired == {nodes["act"]: [nodes["pre"], nodes["post"]]}


# ----------------------------------------------------------------------------------------------
# one random-stream rule
# ----------------------------------------------------------------------------------------------
def test_random_stream_keeps_one_stream_per_device_across_moves():
    stream = RandomStream(seed=5)
    cpu = stream.generator_for("cpu")
    first = torch.rand(3, generator=cpu)
    assert stream.generator_for(torch.device("cpu")) is cpu  # the same stream, continued
    stream.reseed(5)
    assert torch.equal(torch.rand(3, generator=stream.generator_for("cpu")), first)
    with pytest.raises(TypeError, match="seed"):
        RandomStream(seed="a")
    with pytest.raises(ValueError, match="seed or generator"):
        RandomStream(seed=1, generator=torch.Generator())


@pytest.mark.parametrize("count", ["bernoulli", "exact", "unbiased"])
def test_spikingjelly_and_snntorch_neurons_fire_the_same_spikes(count):
    sj = pytest.importorskip("tpp_plugin.adapters.spikingjelly")
    snt = pytest.importorskip("tpp_plugin.adapters.snntorch")
    x = torch.rand(T, 16, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    node = sj.TPPNode(v_threshold=0.3, count=count, step_mode="m", seed=11)
    tpp = snt.TPP(0.3, num_steps=T, count=count, sequence=True, init_hidden=True, seed=11)
    for _ in range(2):  # two calls: the streams advance alike
        a, b = node(x), tpp(x)
        assert torch.equal(a, b) and 0 < a.sum() < a.numel()
    # moving the modules (dtype, device) and back continues each device's stream
    node.to(torch.float64).to("cpu")
    tpp.to(torch.float64).to("cpu")
    third = node(x)
    assert torch.equal(third, tpp(x))
    # the streams continued (a fresh module repeats the first call; 128 neurons × 4 positions
    # make equal spike trains by chance negligible, even with exact counts)
    fresh = sj.TPPNode(v_threshold=0.3, count=count, step_mode="m", seed=11)(x)
    assert torch.equal(fresh.sum(0), a.sum(0)) or count != "exact"
    assert not torch.equal(fresh, third)


# ----------------------------------------------------------------------------------------------
# the contract
# ----------------------------------------------------------------------------------------------
def test_every_tpp_module_implements_the_contract():
    sj = pytest.importorskip("tpp_plugin.adapters.spikingjelly")
    snt = pytest.importorskip("tpp_plugin.adapters.snntorch")
    modules = [sj.TPPNode(T=4, step_mode="m"), sj.TemporalPermutation(T=4),
               snt.TPP(num_steps=4, sequence=True), snt.TemporalPermutation()]
    for module in modules:
        assert isinstance(module, contract.TPPLayer), type(module).__name__
        assert isinstance(module.random_stream, RandomStream)
    assert [contract.window_of(m) for m in modules] == [4, 4, 4, None]
    assert [contract.runs_sequences(m) for m in modules] == [True, False, True, True]
    from spikingjelly.activation_based import neuron

    assert not isinstance(neuron.IFNode(), contract.TPPLayer)
    assert contract.runs_sequences(neuron.IFNode(step_mode="m"))
    assert isinstance(modules[0], contract.types_of("tpp"))
    assert isinstance(modules[3], contract.types_of("permutation"))


def test_neuron_names_are_case_insensitive_in_both_frameworks():
    sj = pytest.importorskip("tpp_plugin.adapters.spikingjelly")
    snt = pytest.importorskip("tpp_plugin.adapters.snntorch")
    from tpp_plugin.qcfs import QCFS

    ann = nn.Sequential(nn.Linear(3, 4), QCFS(L=4, lam=1.0), nn.Linear(4, 2)).eval()
    net = snt.convert(ann, num_steps=4, neuron="TPP", seed=0)
    assert sum(isinstance(m, snt.TPP) for m in net.modules()) == 1
    snn = sj.convert_qcfs(ann, "Tpp", {"seed": 0})
    assert sum(isinstance(m, sj.TPPNode) for m in snn.modules()) == 1
    for bad in (lambda: snt.convert(ann, num_steps=4, neuron="lif"),
                lambda: sj.convert_qcfs(ann, "lif")):
        with pytest.raises(ValueError, match="unknown neuron 'lif'"):
            bad()


@pytest.mark.parametrize("count", ["bernoulli", "exact", "unbiased"])
def test_per_channel_thresholds_on_spikingjelly_cupy_path_as_snntorchs(emulated_kernel, count):
    """SpikingJelly's TPPNode(backend='cupy') takes a per-channel threshold as snnTorch's
    snn.TPP(backend='cupy') does (torch accumulates, the kernel fires v/θ): on the kernel's
    emulation, both fire the same spikes for the same seed, and exact counts equal the torch
    backend's neuron for neuron."""
    sj = pytest.importorskip("tpp_plugin.adapters.spikingjelly")
    snt = pytest.importorskip("tpp_plugin.adapters.snntorch")
    x = torch.rand(2 * T, 3, 4, 5, generator=torch.Generator().manual_seed(2)) * 1.5 - 0.2
    theta = torch.tensor([0.6, 0.9, 1.3, 0.45]).view(4, 1)
    node = sj.TPPNode(v_threshold=theta, count=count, T=T, step_mode="m", seed=7,
                      backend="cupy")
    tpp = snt.TPP(theta, num_steps=T, count=count, sequence=True, init_hidden=True, seed=7,
                  backend="cupy")
    spikes = node(x)
    assert torch.equal(spikes, tpp(x)) and 0 < spikes.sum() < spikes.numel()
    assert any(isinstance(c[2], float) and c[2] == 1.0 for c in emulated_kernel)  # fires v/θ
    if count == "exact":
        torch_node = sj.TPPNode(v_threshold=theta, count=count, T=T, step_mode="m", seed=7)
        reference = torch_node(x)
        assert torch.equal(spikes.view(2, T, 3, 4, 5).sum(1), reference.view(2, T, 3, 4, 5).sum(1))
