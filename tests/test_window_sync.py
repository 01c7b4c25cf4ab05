"""Users' own single-step loops: window-synchronous TPP, max-pool of window potentials, residual
nets, every SpikingJelly recipe that builds IF neurons. Runs on SpikingJelly 2.0.0 and (second
pass of `make test`) 0.0.0.0.14."""

import copy
import warnings

import pytest
import torch
from sj_helpers import multi_step, single_step_loop
from spikingjelly.activation_based import ann2snn, functional
from torch import nn

import tpp_plugin
from tpp_plugin.adapters.spikingjelly import (
    IS_LEGACY,
    TemporalPermutation,
    TPPNode,
    WindowSynchronizer,
    insert_permutation,
    steps_needed,
    swap_neurons,
    window_synchronous,
)
from tpp_plugin.experiments.models import cnn5_maxpool, resnet

needs_recipes = pytest.mark.skipif(IS_LEGACY, reason="recipes exist on 2.x only")


def rate_convert(ann, batches, mode="99.9%", momentum=0.1, **hook):
    ann = copy.deepcopy(ann)  # the 0.0.0.0.14 converter reuses the ANN's layers
    if IS_LEGACY:
        loader = [(x, torch.zeros(len(x), dtype=torch.long)) for x in batches]
        return ann2snn.Converter(loader, mode=mode, momentum=momentum, **hook)(ann)
    recipe = ann2snn.RateCodingRecipe(batches, mode=mode, momentum=momentum, **hook)
    return ann2snn.Converter(recipe).convert(ann)






def small_models():
    torch.manual_seed(0)
    return {"maxpool": cnn5_maxpool(image_size=8, channels=4).eval(),
            "resnet": resnet(image_size=8, channels=4).eval()}


# ---------------------------------------------------------------- one module
@pytest.mark.parametrize("T", [1, 2, 5])
@pytest.mark.parametrize("count", ["bernoulli", "exact"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("module", [TPPNode, TemporalPermutation])
def test_synchronous_single_step_equals_multi_step_without_delay(module, T, count, dtype):
    kwargs = {"count": count} if module is TPPNode else {}
    x = torch.rand(3, 7, dtype=dtype) * 2
    single = module(T=T, seed=4, **kwargs)
    steps = torch.stack([single(x) for _ in range(2 * T)])  # two windows, no reset
    multi = module(T=T, seed=4, step_mode="m", **kwargs)(x.unsqueeze(0).expand(2 * T, 3, 7))
    assert torch.equal(steps, multi)


def test_changed_input_within_a_window_is_refused_and_says_what_to_do():
    node = TPPNode(T=4, seed=0)
    node(torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"call 2/4 .*streaming='delayed'"):
        node(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"shape \(3, 3\)"):
        node(torch.ones(3, 3))
    functional.reset_net(node)
    assert node(torch.zeros(5, 3)).shape == (5, 3)  # a new window may have a new shape


def test_batch_size_may_change_at_a_window_boundary():
    node = TPPNode(T=2, seed=0, count="exact")
    outs = [node(torch.full((2, 3), 0.5)) for _ in range(2)]
    outs += [node(torch.full((4, 3), 0.5)) for _ in range(2)]
    assert [tuple(o.shape) for o in outs] == [(2, 3), (2, 3), (4, 3), (4, 3)]
    assert torch.all(outs[2] + outs[3] == 1)


def test_delayed_stream_refuses_a_new_shape_at_a_window_boundary():
    """A delayed stream still owes the previous window: a new shape must not get it."""
    perm = TemporalPermutation(T=2, seed=0, streaming="delayed")
    perm(torch.ones(3, 5))
    perm(torch.ones(3, 5))
    with pytest.raises(ValueError, match=r"reset_net"):
        perm(torch.ones(4, 5))
    functional.reset_net(perm)
    assert perm(torch.ones(4, 5)).shape == (4, 5)


def test_surrogate_function_is_refused():
    with pytest.raises(ValueError, match="surrogate"):
        TPPNode(surrogate_function=lambda x: x)
    with pytest.raises(ValueError, match="bad streaming|streaming must be"):
        TPPNode(streaming="lazy")


# ---------------------------------------------------------------- converted networks
@pytest.mark.parametrize("count", ["bernoulli", "exact"])
@pytest.mark.parametrize("name", ["maxpool", "resnet"])
def test_converted_net_single_step_loop_equals_multi_step(name, count):
    ann = small_models()[name]
    x = torch.rand(6, 1, 8, 8)
    T = 4
    snn = rate_convert(ann, [torch.rand(32, 1, 8, 8)], neuron="tpp",
                       neuron_kwargs={"T": T, "seed": 0, "count": count})
    twin = copy.deepcopy(snn)  # what SpikingJelly's step-mode benchmark compares
    for batch in (x, x[:3]):   # reset_net between batches, a new batch size
        assert torch.equal(single_step_loop(snn, batch, T), multi_step(twin, batch, T))


def test_single_step_loop_refuses_changed_input_in_a_converted_net():
    snn = rate_convert(small_models()["maxpool"], [torch.rand(32, 1, 8, 8)], neuron="tpp",
                       neuron_kwargs={"T": 4, "seed": 0})
    functional.reset_net(snn)
    with torch.no_grad():
        snn(torch.rand(2, 1, 8, 8))
        with pytest.raises(ValueError, match="window-synchronous TPP network.*2/4"):
            snn(torch.rand(2, 1, 8, 8))


def test_single_step_without_T_says_how_to_fix():
    snn = rate_convert(small_models()["maxpool"], [torch.rand(32, 1, 8, 8)], neuron="tpp")
    with pytest.raises(ValueError, match=r"neuron_kwargs=\{'T': T\}"):
        snn(torch.rand(2, 1, 8, 8))


def test_swapped_and_permuted_nets_are_synchronous_too():
    x = torch.rand(4, 1, 8, 8)
    snn = rate_convert(small_models()["resnet"], [torch.rand(32, 1, 8, 8)])  # IF
    insert_permutation(snn, T=4, seed=0)
    twin = copy.deepcopy(snn)
    assert torch.equal(single_step_loop(snn, x, 4), multi_step(twin, x, 4))
    swap_neurons(snn, "tpp", T=4, seed=1)
    swap_neurons(twin, "tpp", T=4, seed=1)
    assert sum(isinstance(m, WindowSynchronizer) for m in snn.modules()) == 1
    assert torch.equal(single_step_loop(snn, x, 4), multi_step(twin, x, 4))


def test_delayed_streaming_and_steps_needed_count_the_longest_path():
    """resnet: stem + 4 blocks of 2 TPP layers on the main path = 9 on the longest path."""
    T = 2
    snn = rate_convert(small_models()["resnet"], [torch.rand(32, 1, 8, 8)], neuron="tpp",
                       neuron_kwargs={"T": T, "seed": 0, "count": "exact"})
    assert steps_needed(snn) == T
    swap_neurons(snn, "tpp", T=T, count="exact", streaming="delayed")
    assert steps_needed(snn) == 10 * T
    assert not any(isinstance(m, WindowSynchronizer) for m in snn.modules())


def test_delayed_streaming_of_a_residual_net_keeps_windows_aligned():
    """Input that changes every window, streamed causally: the shortcut of each block passes
    fewer TPP layers than the main path and is delayed to match, so output window j + L is
    computed from input window j (L = 9 TPP layers on the longest path); exact counts make the
    window sums equal the multi-step ones."""
    T, L = 2, 9
    snn = rate_convert(small_models()["resnet"], [torch.rand(32, 1, 8, 8)], neuron="tpp",
                       neuron_kwargs={"T": T, "seed": 0, "count": "exact"})
    swap_neurons(snn, "tpp", T=T, count="exact", streaming="delayed", seed=0)
    assert sum(type(m).__name__ == "WindowDelay" for m in snn.modules()) == 4  # 4 blocks
    windows = [torch.rand(3, 1, 8, 8) for _ in range(3)]
    x_seq = torch.cat([w.unsqueeze(0).expand(T, *w.shape) for w in windows])
    with torch.no_grad():
        functional.reset_net(snn)
        functional.set_step_mode(snn, "m")
        multi = snn(x_seq).view(3, T, 3, 10).sum(1)
        functional.reset_net(snn)
        functional.set_step_mode(snn, "s")
        zeros = torch.zeros_like(windows[0])
        steps = [snn(x) for x in x_seq] + [snn(zeros) for _ in range(L * T)]
    streamed = torch.stack(steps).view(3 + L, T, 3, 10).sum(1)[L:]
    assert torch.allclose(streamed, multi, atol=1e-5)


def test_window_synchronous_rejects_mixed_streaming():
    net = nn.Sequential(TPPNode(T=2), TPPNode(T=2, streaming="delayed"))
    with pytest.raises(ValueError, match="mix"):
        window_synchronous(net)


# ---------------------------------------------------------------- max-pool
def test_max_pool_becomes_pooling_of_window_potentials():
    snn = rate_convert(small_models()["maxpool"], [torch.rand(32, 1, 8, 8)], neuron="tpp")
    pooled = [m for m in snn.modules() if isinstance(m, TPPNode) and m.pool is not None]
    assert len(pooled) == 2 and all(type(m.pool) is nn.MaxPool2d for m in pooled)
    assert not any(type(m).__name__ == "MaxPool2d" for m in snn.modules()
                   if not isinstance(m, nn.MaxPool2d) or m not in [p.pool for p in pooled])


def test_a_max_pool_on_spikes_without_a_neuron_next_to_it_is_refused():
    ann = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                        nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(64, 10)).eval()
    with pytest.raises(ValueError, match=r"max-pool '3(\.0)?' acts on spikes"):
        rate_convert(ann, [torch.rand(8, 1, 8, 8)], neuron="tpp")
    assert rate_convert(ann, [torch.rand(8, 1, 8, 8)], neuron="if") is not None  # IF: as before


def test_a_pooling_tpp_neuron_cannot_become_if():
    snn = rate_convert(small_models()["maxpool"], [torch.rand(32, 1, 8, 8)], neuron="tpp")
    with pytest.raises(ValueError, match="max-pools its window potential"):
        swap_neurons(snn, "if")


# ---------------------------------------------------------------- the oracle
def thresholds_in_graph_order(snn):
    """θ of each spiking layer, in graph order: the scale of the scaler after each neuron."""
    modules = dict(snn.named_modules())
    out = []
    for node in snn.graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], TPPNode):
            scaler = modules[next(iter(node.users)).target]
            out.append(float(scaler.scale))
    return out


def rounded_ann(ann, thresholds, T):
    """The ANN with each ReLU call's output rounded to T levels of its threshold."""
    ann, calls = copy.deepcopy(ann), iter(thresholds)

    def hook(module, args, out):
        theta = next(calls)
        return theta * torch.clamp(torch.floor(out * T / theta + 0.5), 0, T) / T

    for m in ann.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
            m.register_forward_hook(hook)
    return ann


@pytest.mark.parametrize("T", [1, 2, 4])
@pytest.mark.parametrize("name", ["maxpool", "resnet"])
def test_exact_tpp_equals_the_rounded_ann_image_for_image(name, T):
    """DESIGN oracle, float64: exact-count TPP == the calibrated ANN with T-level rounding —
    with max-pooling (of window potentials) and residual shortcuts."""
    torch.manual_seed(1)
    ann = small_models()[name].double()
    x = torch.rand(64, 1, 8, 8, dtype=torch.float64)
    snn = rate_convert(ann, [x], mode="max", neuron="tpp",
                       neuron_kwargs={"count": "exact", "seed": 0, "T": T})
    thetas = thresholds_in_graph_order(snn)
    assert len(thetas) == (5 if name == "maxpool" else 9)
    with torch.no_grad():
        expected = rounded_ann(ann, thetas, T)(x)
    got = multi_step(snn, x, T).mean(0)
    assert torch.equal(got.argmax(1), expected.argmax(1))
    assert torch.allclose(got, expected, atol=1e-9)
    assert torch.equal(single_step_loop(snn, x, T).mean(0), got)
    with torch.no_grad(), tpp_plugin.count_mode(snn, T):
        assert torch.allclose(snn(x), got, atol=1e-9)


# ---------------------------------------------------------------- SpikingJelly 2.x recipes
def recipes(batches):
    kwargs = {"neuron": "tpp", "neuron_kwargs": {"T": 4, "seed": 0}}
    return {
        "ltb": lambda: ann2snn.LocalThresholdBalancingRecipe(batches, **kwargs),
        "rate_half_channel": lambda: ann2snn.RateCodingRecipe(
            batches, channel_wise=True, half_threshold=True, **kwargs),
        "rate_channel": lambda: ann2snn.RateCodingRecipe(batches, channel_wise=True, **kwargs),
    }


@needs_recipes
@pytest.mark.parametrize("recipe", ["ltb", "rate_half_channel", "rate_channel"])
@pytest.mark.parametrize("name", ["maxpool", "resnet"])
def test_every_if_recipe_takes_neuron_tpp(recipe, name):
    batches = [torch.rand(32, 1, 8, 8)]
    snn = ann2snn.Converter(recipes(batches)[recipe]()).convert(small_models()[name])
    kinds = {type(m).__name__ for m in snn.modules() if "Node" in type(m).__name__}
    assert kinds == {"TPPNode"}
    x, twin = torch.rand(5, 1, 8, 8), copy.deepcopy(snn)
    assert torch.equal(single_step_loop(snn, x, 4), multi_step(twin, x, 4))
    with torch.no_grad(), tpp_plugin.count_mode(snn, 4):
        fast = snn(x)
    assert fast.shape == (5, 10)


@needs_recipes
def test_ltb_with_if_keeps_its_half_threshold_start():
    batches = [torch.rand(32, 1, 8, 8)]
    ann = small_models()["maxpool"]
    plain = ann2snn.Converter(ann2snn.LocalThresholdBalancingRecipe(batches)).convert(ann)
    as_if = ann2snn.Converter(
        ann2snn.LocalThresholdBalancingRecipe(batches, neuron="if")).convert(ann)
    x = torch.rand(5, 1, 8, 8)
    assert torch.allclose(single_step_loop(plain, x, 6), single_step_loop(as_if, x, 6))


@needs_recipes
def test_default_neuron_switches_ltb_and_warns_for_a_recipe_it_cannot_switch():
    batches = [torch.rand(16, 1, 8, 8)]
    ann = small_models()["maxpool"]
    with tpp_plugin.default_neuron("tpp", T=2, seed=0):
        snn = ann2snn.Converter(ann2snn.LocalThresholdBalancingRecipe(batches)).convert(ann)
    assert any(isinstance(m, TPPNode) for m in snn.modules())

    class OwnNeurons(ann2snn.ConversionRecipe):
        """A third-party recipe: it builds what it likes, and takes no neuron=."""

    with tpp_plugin.default_neuron("tpp"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ann2snn.Converter(OwnNeurons()).convert(copy.deepcopy(ann))
    assert any("OwnNeurons" in str(w.message) and "takes no neuron=" in str(w.message)
               for w in caught)


@needs_recipes
def test_unknown_recipe_keyword_is_a_clear_error():
    with pytest.raises(TypeError, match="neuron_kwargs needs neuron="):
        ann2snn.LocalThresholdBalancingRecipe([], neuron_kwargs={"seed": 0})
    with pytest.raises(ValueError, match="neuron must be one of"):
        ann2snn.LocalThresholdBalancingRecipe([], neuron="lif")


def test_count_mode_on_a_residual_net_equals_the_full_simulation():
    """torchvision-style resnet (shared ReLU, BN, AdaptiveAvgPool2d, Dropout, torch.flatten):
    bernoulli TPP in count mode draws what the full simulation draws (same seeds) and predicts
    the same, image for image (float64: no potential within rounding of a boundary)."""
    T = 4
    ann = small_models()["resnet"].double()
    x = torch.rand(48, 1, 8, 8, dtype=torch.float64)
    snn = rate_convert(ann, [x], neuron="tpp", neuron_kwargs={"seed": 0, "T": T})

    def reseed():
        for i, m in enumerate(m for m in snn.modules() if isinstance(m, TPPNode)):
            m.manual_seed(100 + i)

    reseed()
    full = multi_step(snn, x, T).mean(0)
    reseed()
    with torch.no_grad(), tpp_plugin.count_mode(snn, T, bernoulli="draw-equal"):
        fast = snn(x)
    assert torch.equal(fast.argmax(1), full.argmax(1))
    assert torch.allclose(fast, full, atol=1e-9)


# ---------------------------------------------------------------- bad calibration input
@pytest.mark.parametrize(
    "kwargs, batches, exc, match",
    [
        ({"mode": "bogus"}, None, ValueError, r"mode must be 'max'"),
        ({"momentum": 5}, None, ValueError, r"momentum must be"),
        ({}, [], ValueError, r"calibration dataloader is empty"),
        ({}, [torch.rand(4, 3, 8, 8)], ValueError, r"first batch of shape \(4, 3, 8, 8\)"),
    ],
)
def test_bad_calibration_through_the_hook_is_refused_clearly(kwargs, batches, exc, match):
    batches = [torch.rand(8, 1, 8, 8)] if batches is None else batches
    with pytest.raises(exc, match=match):
        rate_convert(small_models()["maxpool"], batches, neuron="tpp", **kwargs)


def test_count_mode_refuses_a_sequence_input():
    snn = rate_convert(small_models()["maxpool"], [torch.rand(8, 1, 8, 8)], neuron="tpp",
                       neuron_kwargs={"T": 4, "seed": 0})
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad(), tpp_plugin.count_mode(snn, 4):
        assert snn(x).shape == (3, 10)
        with pytest.raises(ValueError, match=r"\[T, N, \.\.\.\] sequence"):
            snn(x.unsqueeze(0).expand(4, *x.shape))


def test_unbiased_tpp_runs_single_step_multi_step_and_count_mode_alike():
    """count='unbiased' through a converter: the single-step loop equals multi-step, and
    draw-equal count mode equals the full simulation (same seeds, float64)."""
    T = 4
    ann = small_models()["resnet"].double()
    x = torch.rand(6, 1, 8, 8, dtype=torch.float64)
    snn = rate_convert(ann, [x], neuron="tpp", neuron_kwargs={"T": T, "seed": 0,
                                                               "count": "unbiased"})
    twin = copy.deepcopy(snn)
    assert torch.equal(single_step_loop(snn, x, T), multi_step(twin, x, T))
    tpp_plugin.reseed(snn)
    full = multi_step(snn, x, T).mean(0)
    tpp_plugin.reseed(snn)
    with torch.no_grad(), tpp_plugin.count_mode(snn, T, bernoulli="draw-equal"):
        assert torch.allclose(snn(x), full, atol=1e-9)
