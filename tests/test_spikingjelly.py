"""TPPNode and TemporalPermutation against SpikingJelly's module contract.

Runs on whichever SpikingJelly is importable; `make test` runs it on 2.0.0 and again on
0.0.0.0.14 (side folder first on PYTHONPATH).
"""

import pytest
import torch

import tpp_plugin  # noqa: F401  (registers into SpikingJelly)
from tpp_plugin.adapters.spikingjelly import (
    IS_LEGACY,
    NeuronFactory,
    TemporalPermutation,
    TPPNode,
    make_neuron,
)

sj = pytest.importorskip("spikingjelly.activation_based")
from spikingjelly.activation_based import base, functional, layer, neuron  # noqa: E402


def stream(module, x_seq, T):
    """Feed x_seq step by step, then T zero steps; drop the first window (the delay)."""
    outs = [module(x) for x in x_seq] + [module(torch.zeros_like(x_seq[0])) for _ in range(T)]
    return torch.stack(outs)[T:]


def test_registered_names():
    assert neuron.TPPNode is TPPNode
    assert layer.TemporalPermutation is TemporalPermutation
    assert isinstance(TPPNode(), base.MemoryModule)


def test_single_step_is_default_like_every_spikingjelly_neuron():
    assert TPPNode().step_mode == "s" and TemporalPermutation().step_mode == "s"


@pytest.mark.parametrize("T", [1, 2, 4, 8])
@pytest.mark.parametrize("count", ["bernoulli", "exact"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_streaming_equals_multi_step_bit_for_bit(T, count, dtype):
    x_seq = torch.rand(2 * T, 3, 5, dtype=dtype) * 1.5
    single = TPPNode(count=count, T=T, seed=11, streaming="delayed")
    multi = TPPNode(count=count, T=T, seed=11, step_mode="m")
    out_m = multi(x_seq)
    assert out_m.dtype == dtype and out_m.shape == x_seq.shape
    assert torch.equal(stream(single, x_seq, T), out_m)


@pytest.mark.parametrize("T", [1, 3, 8])
def test_streaming_delays_output_by_one_window(T):
    node = TPPNode(T=T, count="exact", streaming="delayed")
    outs = torch.stack([node(torch.full((4,), 1.0)) for _ in range(2 * T)])
    assert torch.all(outs[:T] == 0)
    assert torch.all(outs[T:].sum(0) == T)  # Σx = T·θ -> T spikes in the next window


def test_multi_step_windows_are_independent_and_exact():
    x_seq = torch.full((8, 2, 3), 0.5)  # T=4 windows: Σx = 2θ each
    out = TPPNode(count="exact", T=4, step_mode="m", seed=0)(x_seq)
    assert torch.all(out[:4].sum(0) == 2) and torch.all(out[4:].sum(0) == 2)


def test_whole_sequence_is_one_window_without_T():
    out = TPPNode(count="exact", step_mode="m")(torch.full((5, 7), 0.6))
    assert torch.all(out.sum(0) == 3)


def test_threshold_scales_counts():
    out = TPPNode(v_threshold=0.5, count="exact", step_mode="m")(torch.full((4, 10), 0.25))
    assert torch.all(out.sum(0) == 2)


def test_same_seed_same_spikes_different_seed_differs():
    x_seq = torch.rand(8, 64)
    def run(seed):
        return TPPNode(step_mode="m", seed=seed)(x_seq)
    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(5), run(6))


def test_generator_argument_is_used():
    x_seq = torch.rand(8, 64)
    a = TPPNode(step_mode="m", generator=torch.Generator().manual_seed(3))(x_seq)
    b = TPPNode(step_mode="m", seed=3)(x_seq)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="seed or generator"):
        TPPNode(seed=1, generator=torch.Generator())


def test_reset_net_clears_state():
    net = torch.nn.Sequential(TPPNode(T=4, streaming="delayed"),
                              TemporalPermutation(T=4, streaming="delayed"))
    for _ in range(6):
        net(torch.rand(2, 3))
    node, perm = net
    assert node.t == 2 and node.spike_buffer is not None and perm.spike_buffer is not None
    functional.reset_net(net)
    assert node.t == 0 and node.v == 0.0 and node.spike_buffer is None
    assert perm.t == 0 and perm.window is None and perm.spike_buffer is None


def test_set_step_mode_both_ways():
    net = torch.nn.Sequential(TPPNode(T=4, count="exact", streaming="delayed"),
                              TemporalPermutation(T=4, streaming="delayed"))
    functional.set_step_mode(net, "m")
    assert all(m.step_mode == "m" for m in net)
    out_m = net(torch.full((4, 2, 3), 0.5))
    assert torch.all(out_m.sum(0) == 2)
    functional.reset_net(net)
    functional.set_step_mode(net, "s")
    assert all(m.step_mode == "s" for m in net)
    outs = [net(torch.full((2, 3), 0.5)) for _ in range(12)]  # 2 modules -> 2 windows of delay
    assert torch.all(torch.stack(outs[8:]).sum(0) == 2)


def test_store_v_seq_records_residual_potential():
    node = TPPNode(count="exact", step_mode="m", store_v_seq=True)
    out = node(torch.full((4, 3), 0.5))
    assert node.v_seq.shape == out.shape
    assert torch.allclose(node.v_seq[-1], torch.zeros(3))
    assert torch.allclose(node.v_seq[0], 2.0 - out[0])


def test_v_reset_must_be_none_and_factory_style_arguments_accepted():
    with pytest.raises(ValueError, match="v_reset"):
        TPPNode(v_reset=0.0)
    node = TPPNode(v_threshold=1.0, v_reset=None, surrogate_function=None, detach_reset=False)
    assert node.v_reset is None


def test_neuron_factory_call_and_create():
    factory = NeuronFactory("tpp", count="exact", seed=10)
    a, b = factory(2.0), factory.create(scale=3.0)
    # seeds spawned from 10 (docs/design.md, "Seeds"), not 10 + i
    assert isinstance(a, TPPNode) and [a.seed, b.seed] == tpp_plugin.functional.spawn_seeds(10, 2)
    assert a.v_threshold == 1.0
    node = make_neuron("if", v_init=0.5)
    assert isinstance(node, neuron.IFNode) and node.v_reset is None and node.v == 0.5
    functional.reset_net(node)
    assert node.v == 0.5


# ---------------------------------------------------------------- backends
# (the 'cupy' backend is tested in test_cupy.py)
def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="backend"):
        TemporalPermutation(backend="jax")
    node = TPPNode()
    with pytest.raises(ValueError, match="backend"):
        node.backend = "jax"
    assert node.backend == "torch" and node.supported_backends == ("torch", "cupy")


# ---------------------------------------------------------------- bad input
def test_single_step_without_T_says_how_to_fix():
    node = TPPNode()
    with pytest.raises(ValueError, match=r"T=.*set_step_mode\(net, 'm'\)"):
        node(torch.rand(4, 3))
    with pytest.raises(ValueError, match=r"set_step_mode"):
        TemporalPermutation()(torch.rand(4, 3))


@pytest.mark.parametrize("module", [TPPNode, TemporalPermutation])
def test_sequence_length_must_be_multiple_of_T(module):
    with pytest.raises(ValueError, match="T=4"):
        module(T=4, step_mode="m")(torch.rand(6, 2))


@pytest.mark.parametrize(
    "bad, exc, name",
    [
        (torch.tensor(1.0), ValueError, "x"),
        (torch.ones(3, dtype=torch.int64), TypeError, "x"),
        (torch.tensor([1.0, float("nan"), 0.0]), ValueError, "x"),
        (torch.tensor([1.0, float("inf"), 0.0]), ValueError, "x"),
        (torch.ones(4), ValueError, "shape"),
    ],
)
def test_bad_single_step_input_leaves_state_unchanged(bad, exc, name):
    node = TPPNode(T=4, seed=0, streaming="delayed")
    node(torch.full((3,), 0.2))
    node(torch.full((3,), 0.3))
    v, t = node.v.clone(), node.t
    with pytest.raises(exc, match=rf"\b{name}\b"):
        node(bad)
    assert node.t == t and torch.equal(node.v, v)


def test_bad_multi_step_input():
    node = TPPNode(step_mode="m")
    with pytest.raises(ValueError, match="x_seq"):
        node(torch.ones(4))  # no batch dimension: [T] alone is ambiguous
    with pytest.raises(ValueError, match="x_seq"):
        node(torch.tensor([[1.0], [float("nan")]]))
    with pytest.raises(TypeError, match="x_seq"):
        node(torch.ones(4, 2, dtype=torch.int32))


@pytest.mark.parametrize(
    "kwargs, exc, name",
    [
        ({"v_threshold": 0.0}, ValueError, "v_threshold"),
        ({"v_threshold": float("nan")}, ValueError, "v_threshold"),
        ({"count": "poisson"}, ValueError, "count"),
        ({"T": 0}, ValueError, "T"),
        ({"v_init": float("inf")}, ValueError, "v_init"),
        ({"seed": "0"}, TypeError, "seed"),
    ],
)
def test_bad_constructor_arguments(kwargs, exc, name):
    with pytest.raises(exc, match=rf"\b{name}\b"):
        TPPNode(**kwargs)


def test_mid_window_multi_step_call_is_refused():
    node = TPPNode(T=4, streaming="delayed")
    node(torch.rand(3))
    node.step_mode = "m"
    with pytest.raises(RuntimeError, match="reset_net"):
        node(torch.rand(4, 1, 3))


# ---------------------------------------------------------------- permutation layer
@pytest.mark.parametrize("scope", ["neuron", "sample", "layer"])
def test_permutation_streaming_equals_multi_step_and_preserves_counts(scope):
    T = 4
    x_seq = (torch.rand(2 * T, 3, 5) < 0.5).float()
    multi = TemporalPermutation(scope, T=T, seed=2, step_mode="m")(x_seq)
    assert torch.equal(multi[:T].sum(0), x_seq[:T].sum(0))
    single = stream(TemporalPermutation(scope, T=T, seed=2, streaming="delayed"), x_seq, T)
    assert torch.equal(single, multi)


def test_permutation_rejects_bad_scope():
    with pytest.raises(ValueError, match="scope"):
        TemporalPermutation("time")


def test_legacy_flag_matches_installed_line():
    import spikingjelly.activation_based.ann2snn as ann2snn

    assert IS_LEGACY == (not hasattr(ann2snn, "RateCodingRecipe"))
