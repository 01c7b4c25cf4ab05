"""Gradient fine-tuning of a calibration (tpp_plugin.finetune, calibrate_for_T's
finetune_epochs): the oracle still holds after it, it lowers the divergence from the ANN on
unseen inputs, it never keeps a worse held-out divergence than the calibration's, it is
deterministic, and bad settings are refused. Runs on both SpikingJelly lines."""

import pytest
import torch
from sj_helpers import multi_step, single_step_loop
from test_calibration import inputs, models
from torch import nn

import tpp_plugin
from tpp_plugin.adapters.spikingjelly import convert_calibrated
from tpp_plugin.calibration import calibrate_for_T, quantised_ann
from tpp_plugin.finetune import finetune, output_distance


@pytest.mark.parametrize("T", [1, 2])
@pytest.mark.parametrize("name", ["maxpool", "resnet"])
def test_finetuned_exact_tpp_equals_the_quantised_ann(name, T):
    """The oracle after fine-tuning (float64; batch norm fused, residual sums, bias shifts):
    the SpikingJelly network == quantised_ann(result) image for image, multi-step, the
    single-step loop and count mode. No held-out share: the last epoch is kept."""
    ann = models()[name]
    x = inputs(96)
    snn, result = convert_calibrated(ann, [x], T, neuron_kwargs={"count": "exact", "seed": 0},
                                     finetune_epochs=2, finetune_holdout=0.0,
                                     return_result=True)
    assert result.settings["finetune"]["epoch"] == 2
    plain = calibrate_for_T(ann, [x], T)
    with torch.no_grad():
        expected = quantised_ann(ann, result, T)(x)
        assert not torch.allclose(expected, quantised_ann(ann, plain, T)(x))  # it was tuned
    got = multi_step(snn, x, T).mean(0)
    assert torch.equal(got.argmax(1), expected.argmax(1))
    assert torch.allclose(got, expected, atol=1e-9)
    assert torch.allclose(single_step_loop(snn, x, T).mean(0), got, atol=1e-9)
    with torch.no_grad(), tpp_plugin.count_mode(snn, T):
        assert torch.allclose(snn(x), got, atol=1e-9)


@pytest.fixture(scope="module")
def digits_mlp(digits):
    """A trained ReLU MLP (3 hidden layers of 64) on sklearn's digits, 90 % test accuracy. Its
    own loader: the shared one's shuffling state depends on which tests used it before."""
    from tpp_plugin.experiments import data
    from tpp_plugin.experiments.models import train_ann

    torch.manual_seed(0)
    ann = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                        nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    return train_ann(ann, data.loaders(*digits, seed=0)[0], epochs=8).eval()


@pytest.mark.parametrize("count", ["exact", "bernoulli"])
def test_finetuning_lowers_the_divergence_from_the_ann_at_T1(digits_mlp, digits, count):
    """The trained digits MLP at T=1 (binary activations), fine-tuned for 8 epochs on 512
    training images: the quantised network's KL divergence from the ANN drops well below the
    calibration's, on those images and on the 540 unseen test images (measured, seed 0:
    train 0.199 -> 0.144, test 0.278 -> 0.198 exact; 0.49 -> 0.23 and 0.54 -> 0.25
    bernoulli)."""
    x_train, _, x_test, _ = digits
    x = x_train[:512]
    result = calibrate_for_T(digits_mlp, [x], 1, count=count)
    tuned = calibrate_for_T(digits_mlp, [x], 1, count=count, finetune_epochs=8,
                            finetune_holdout=0.0)
    with torch.no_grad():
        for images in (x, x_test):
            ref = digits_mlp(images)
            before = float(output_distance(quantised_ann(digits_mlp, result, 1)(images), ref))
            after = float(output_distance(quantised_ann(digits_mlp, tuned, 1)(images), ref))
            assert after < 0.8 * before


def test_the_epoch_kept_is_the_best_held_out_one_and_quantised_ann_reproduces_it(digits_mlp,
                                                                                 digits):
    """With a held-out share, the epoch kept has the smallest recorded held-out divergence
    (epoch 0, the calibration, included), and quantised_ann(result) reproduces that
    divergence on the seed's held-out split: the tuned weights, biases, thresholds and output
    steps were all written back."""
    x = digits[0][:512]
    ann = digits_mlp
    tuned = calibrate_for_T(ann, [x], 1, finetune_epochs=8)
    record = tuned.settings["finetune"]
    assert record["epoch"] > 0  # measured: epoch 3 of 8
    assert record["holdout"][record["epoch"]] == min(record["holdout"])
    held = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:102]]
    assert record["held_out"] == 102
    with torch.no_grad():
        kl = float(output_distance(quantised_ann(ann, tuned, 1)(held), ann(held)))
    assert kl == pytest.approx(record["holdout"][record["epoch"]], rel=1e-4)


def test_the_calibration_is_kept_when_training_only_makes_the_held_out_divergence_worse():
    """Epoch 0 is a candidate: a learning rate that wrecks the network leaves the calibration
    as it was (thresholds, output steps and weights)."""
    torch.manual_seed(0)
    ann = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                        nn.Linear(16, 3)).double().eval()
    x = torch.randn(128, 6, dtype=torch.float64)
    result = calibrate_for_T(ann, [x], 2)
    wrecked = finetune(ann, result, x, epochs=2, lr=100.0)
    record = wrecked.settings["finetune"]
    assert record["epoch"] == 0 and min(record["holdout"]) == record["holdout"][0]
    assert all(torch.equal(a, b) for a, b in zip(wrecked.thresholds, result.thresholds))
    assert wrecked.weights is result.weights
    assert finetune(ann, result, x, epochs=0) is result


def test_finetuning_is_deterministic_for_fixed_inputs_and_seed():
    torch.manual_seed(1)
    ann = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    x = torch.randn(200, 6)
    result = calibrate_for_T(ann, [x], 2, count="bernoulli")
    a, b = (finetune(ann, result, x, epochs=2, holdout=0.0, seed=3) for _ in range(2))
    c = finetune(ann, result, x, epochs=2, holdout=0.0, seed=4)
    assert a.settings["finetune"]["epoch"] == 2  # no held-out share: the last epoch
    assert all(torch.equal(s, t) for s, t in zip(a.thresholds, b.thresholds))
    assert all(torch.equal(s, t) for k in a.weights for s, t in zip(a.weights[k], b.weights[k]))
    assert not all(torch.equal(s, t) for s, t in zip(a.thresholds, c.thresholds))


@pytest.mark.parametrize("kwargs, match", [
    ({"finetune_epochs": -1}, "finetune_epochs must be a non-negative integer"),
    ({"finetune_epochs": 1.5}, "finetune_epochs must be a non-negative integer"),
    ({"finetune_lr": 0.0}, "finetune_lr must be a positive number"),
    ({"finetune_lr": float("nan")}, "finetune_lr must be a positive number"),
    ({"finetune_drop": 1.0}, r"finetune_drop must be a number in \[0, 1\)"),
    ({"finetune_holdout": -0.1}, r"finetune_holdout must be a number in \[0, 1\)"),
])
def test_bad_finetuning_settings_are_refused_naming_them(kwargs, match):
    ann = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    with pytest.raises(ValueError, match=match):
        calibrate_for_T(ann, [torch.rand(16, 4)], 2, **kwargs)


@pytest.mark.parametrize("train", [True, False])
def test_finetuning_leaves_the_users_ann_unchanged_in_train_and_eval_mode(train):
    """Regression: the reference outputs were computed on the ANN as passed, so a train-mode
    ANN had its BatchNorm running statistics updated (and dropout noise in its targets)."""
    import copy

    torch.manual_seed(0)
    ann = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5),
                        nn.Flatten(), nn.Linear(144, 3))
    ann.train(train)
    ann[3].eval()  # a per-module mode is given back as it was, not overwritten by the root's
    before = copy.deepcopy(ann.state_dict())
    calibrate_for_T(ann, [torch.rand(32, 1, 8, 8)], T=2, finetune_epochs=1)
    changed = [k for k, v in before.items() if not torch.equal(v, ann.state_dict()[k])]
    assert changed == []
    assert ann.training is train and ann[1].training is train and ann[3].training is False


def test_calibration_and_finetuning_are_reachable_from_the_package():
    """``tpp_plugin.calibrate_for_T`` and ``tpp_plugin.finetune_calibration`` are the
    calibration package's functions; the module ``tpp_plugin.finetune`` is not shadowed and
    re-exports the same fine-tuning."""
    import importlib
    import inspect
    import pkgutil

    from tpp_plugin.calibration import calibrate as calibrate_module
    from tpp_plugin.calibration import finetune as finetune_module

    assert tpp_plugin.calibrate_for_T is calibrate_module.calibrate_for_T is calibrate_for_T
    assert tpp_plugin.finetune_calibration is finetune_module.finetune is finetune
    assert {"calibrate_for_T", "finetune_calibration"} <= set(tpp_plugin.__all__)
    assert inspect.ismodule(importlib.import_module("tpp_plugin.finetune"))
    assert inspect.ismodule(tpp_plugin.finetune)
    for info in pkgutil.iter_modules(tpp_plugin.calibration.__path__):  # none shadowed either
        module = importlib.import_module(f"tpp_plugin.calibration.{info.name}")
        assert getattr(tpp_plugin.calibration, info.name) is module
