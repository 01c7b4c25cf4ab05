"""`python -m tpp_plugin reproduce`, reduced: runs end to end on digits, writes the JSON schema,
and the exact-count oracle holds (TPP exact == the QCFS ANN with L=T, image for image)."""

import json

import pytest
import torch

from tpp_plugin.cli import main as cli_main
from tpp_plugin.reproduce import VARIANTS, FiringDiagnostic

TS = [2, 4]


def _check_schema(result, ann, seeds):
    assert result["schema"] == "tpp_plugin.reproduce/1"
    cfg = result["config"]
    assert cfg["ann"] == ann and cfg["T"] == TS and cfg["seeds"] == seeds
    assert 0.0 <= result["ann"]["accuracy"] <= 1.0
    layers = cfg["spiking_layers"]
    for key, v in result["variants"].items():
        assert key in VARIANTS and v["label"] == VARIANTS[key][0]
        assert len(v["per_seed"]) == (seeds if v["stochastic"] else 1)
        assert all(len(row) == len(TS) for row in v["per_seed"])
        for row_mean, i in zip(v["mean"], range(len(TS))):
            seed_values = [row[i] for row in v["per_seed"]]
            assert row_mean == pytest.approx(sum(seed_values) / len(seed_values))
        assert len(v["diagnostic"]) == layers
        for layer in v["diagnostic"]:
            assert all(0.0 <= a + b <= 1.0 for a, b in zip(layer["over"], layer["under"]))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce")
    code = cli_main(["reproduce", "--dataset", "digits", "--model", "cnn5", "--ann", "qcfs",
                     "relu", "--T", *map(str, TS), "--seeds", "2", "--epochs", "4",
                     "--calib-images", "512", "--out", str(out)])
    assert code == 0
    return out


def test_writes_json_and_png_per_configuration(results):
    names = sorted(p.name for p in results.iterdir())
    assert names == ["digits-cnn5-qcfs-L4.json", "digits-cnn5-qcfs-L4.png",
                     "digits-cnn5-relu-p99.9.json", "digits-cnn5-relu-p99.9.png"]


def test_relu_schema(results):
    result = json.loads((results / "digits-cnn5-relu-p99.9.json").read_text())
    _check_schema(result, "relu", 2)
    assert set(result["variants"]) == set(VARIANTS)
    assert "RateCodingRecipe" in result["config"]["conversion"] or "Converter" in result[
        "config"]["conversion"]


def test_qcfs_exact_tpp_equals_ann_with_L_eq_T(results):
    result = json.loads((results / "digits-cnn5-qcfs-L4.json").read_text())
    _check_schema(result, "qcfs", 2)
    exact = result["variants"]["tpp_exact"]
    assert result["oracle"]["holds"] is True
    assert result["oracle"]["agreement_min_over_seeds"] == [1.0] * len(TS)
    for row in exact["per_seed"]:
        assert row == result["ann"]["accuracy_L_eq_T"]
    # exact TPP fires round(Σx/θ) by construction: the diagnostic must see no mismatch
    for layer in exact["diagnostic"]:
        assert layer["over"] == [0.0] * len(TS) and layer["under"] == [0.0] * len(TS)


def test_snntorch_framework_oracle(tmp_path):
    pytest.importorskip("snntorch")
    code = cli_main(["reproduce", "--dataset", "digits", "--model", "mlp8", "--ann", "qcfs",
                     "--T", "2", "--epochs", "2", "--framework", "snntorch", "--no-plot",
                     "--out", str(tmp_path)])
    assert code == 0
    result = json.loads((tmp_path / "digits-mlp8-qcfs-L4-snntorch.json").read_text())
    assert "if_v0" not in result["variants"]  # snnTorch has no converter default of its own
    assert result["oracle"]["holds"] is True


def test_diagnostic_sees_under_firing_of_an_if_neuron_starting_at_zero():
    from spikingjelly.activation_based import neuron

    from tpp_plugin.adapters.spikingjelly import TPPNode

    x_seq = torch.full((2, 3, 4), 0.3)  # Σx = 0.6θ: the ANN asks for round(0.6) = 1 spike
    for node, expected_under in ((neuron.IFNode(v_reset=None, step_mode="m"), 1.0),
                                 (TPPNode(count="exact", step_mode="m", seed=0), 0.0)):
        net = torch.nn.Sequential(node)
        with FiringDiagnostic(net, (neuron.IFNode, TPPNode), lambda m: m.v_threshold) as diag:
            net(x_seq)
        (layer,) = diag.summary()
        assert layer["neurons"] == 12
        assert layer["under"] == expected_under and layer["over"] == 0.0


def test_diagnostic_under_count_mode_equals_the_full_simulation():
    """Under count mode a TPP neuron sees its mean current and outputs count/T: the diagnostic
    reads the same counts as in the full simulation (same draws with bernoulli='draw-equal')."""
    import tpp_plugin
    from tpp_plugin.adapters.spikingjelly import TPPNode

    T, x = 4, torch.rand(64, 16) * 0.8  # Σx up to 3.2θ: fractional potentials over-fire
    summaries = []
    for count in (False, True):
        net = torch.nn.Sequential(torch.nn.Identity(), TPPNode(step_mode="m", seed=0))
        with FiringDiagnostic(net, (TPPNode,), lambda m: m.v_threshold) as diag:
            if count:
                with tpp_plugin.count_mode(net, T, bernoulli="draw-equal"):
                    net(x)
            else:
                net(x.unsqueeze(0).expand(T, *x.shape))
        summaries.append(diag.summary())
    assert summaries[0] == summaries[1]
    assert summaries[0][0]["neurons"] == x.numel() and summaries[0][0]["over"] > 0.05


def test_missing_fashion_mnist_exits_with_install_hint(tmp_path, capsys):
    code = cli_main(["reproduce", "--dataset", "fashion-mnist", "--data-dir", str(tmp_path)])
    assert code == 2
    assert "apt-get install -y dataset-fashion-mnist" in capsys.readouterr().err


def test_checkpoint_name_holds_every_training_setting():
    """A run on another subset, or with other epochs, must not load another run's ANN."""
    import argparse

    from tpp_plugin.reproduce import _checkpoint_path

    args = argparse.Namespace(checkpoint="ck", dataset="fashion-mnist", L=4, lr=2e-3, train_seed=0)
    names = {_checkpoint_path(args, "resnet", "relu", 14, n, e)
             for n, e in ((6000, 8), (12000, 8), (6000, 4))}
    assert len(names) == 3
    assert _checkpoint_path(argparse.Namespace(**{**vars(args), "checkpoint": None}),
                            "resnet", "relu", 14, 6000, 8) is None
