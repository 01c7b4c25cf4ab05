"""`python -m tpp_plugin reproduce`, reduced: runs end to end on digits, writes the JSON schema,
and the exact-count oracle holds (TPP exact == the QCFS ANN with L=T, image for image)."""

import json

import pytest
import torch

from tpp_plugin.cli import main as cli_main
from tpp_plugin.experiments.reproduce import VARIANTS, FiringDiagnostic

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

    from tpp_plugin.experiments.reproduce import _checkpoint_path

    args = argparse.Namespace(checkpoint="ck", dataset="fashion-mnist", L=4, lr=2e-3, train_seed=0)
    names = {_checkpoint_path(args, "resnet", "relu", 14, n, e)
             for n, e in ((6000, 8), (12000, 8), (6000, 4))}
    assert len(names) == 3
    assert _checkpoint_path(argparse.Namespace(**{**vars(args), "checkpoint": None}),
                            "resnet", "relu", 14, 6000, 8) is None


# ------------------------------------------------------------------------------------------------
# --calibration: recipes side by side on one ANN
# ------------------------------------------------------------------------------------------------
CALIB_TS = [1, 2]
CALIB_ARGS = ["--dataset", "digits", "--subset", "600", "300", "--epochs", "15",
              "--calib-images", "512", "--T", *map(str, CALIB_TS)]


def _has_ltb() -> bool:
    from spikingjelly.activation_based import ann2snn

    return hasattr(ann2snn, "LocalThresholdBalancingRecipe")


def _trained(folder, model):
    """The run's ANN (from its --checkpoint folder) and its data: the calibration batches and
    the test set, as reproduce made them."""
    from tpp_plugin.experiments.models import build_model
    from tpp_plugin.experiments.reproduce import load_dataset

    (path,) = folder.glob(f"*-{model}-*.pt")
    ann = build_model(model, 8)
    ann.load_state_dict(torch.load(path))
    x_train, y_train, x_test, y_test = load_dataset("digits", subset=[600, 300])
    batches = [(x_train[s:s + 256], y_train[s:s + 256]) for s in (0, 256)]
    return ann.eval(), batches, x_test, y_test


def _accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).double().mean())


@pytest.fixture(scope="module")
def calibration_run(tmp_path_factory):
    import contextlib
    import io

    out, ckpt = tmp_path_factory.mktemp("calibration"), tmp_path_factory.mktemp("checkpoint")
    recipes = ["99.9%", "ltb", "tpp"] if _has_ltb() else ["99.9%", "tpp"]
    printed, errors = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(errors):
        code = cli_main(["reproduce", *CALIB_ARGS, "--model", "cnn5", "--seeds", "2",
                         "--calibration", *recipes, "--diag-T", "2", "--checkpoint", str(ckpt),
                         "--out", str(out)])
    (ckpt / "stderr.txt").write_text(errors.getvalue())
    assert code == 0
    name = "digits-cnn5-relu-calib-" + "-".join(r.replace("99.9%", "p99.9") for r in recipes)
    assert sorted(p.name for p in out.iterdir()) == [name + ".json", name + ".png"]
    result = json.loads((out / (name + ".json")).read_text())
    return result, recipes, printed.getvalue(), ckpt


def test_calibration_run_draws_no_converter_bars(calibration_run):
    """SpikingJelly's recipes draw a tqdm bar over the calibration loader of every conversion;
    reproduce silences them (stderr is not a terminal here: no bar of its own either)."""
    ckpt = calibration_run[3]
    assert "%|" not in (ckpt / "stderr.txt").read_text()


def test_calibration_json_holds_every_recipe_neuron_and_count_per_T(calibration_run):
    result, recipes, _, _ = calibration_run
    cfg = result["config"]
    assert cfg["calibration"] == recipes and cfg["T"] == CALIB_TS and cfg["mode"] is None
    expected = {f"{r}/{n}" for r in recipes for n in ("if", "tpp_exact", "tpp_bernoulli",
                                                       "tpp_unbiased") if (r, n) != ("tpp", "if")}
    assert set(result["variants"]) == expected
    for key, row in result["variants"].items():
        recipe, neuron = key.split("/")
        assert row["recipe"] == recipe and len(row["mean"]) == len(CALIB_TS)
        assert all(0.0 <= a <= 1.0 for a in row["mean"])
        assert len(row["diagnostic"]) == cfg["spiking_layers"]
        if neuron == "if":
            assert row["evaluation"] == "multi-step" and row["count"] is None
        else:  # TPP rows run in count mode; only random counts are repeated over seeds
            assert row["evaluation"] == "count mode" and row["count"] == neuron[len("tpp_"):]
            assert len(row["per_seed"]) == (1 if row["count"] == "exact" else 2)
    for recipe in recipes:
        record = result["calibration"]["recipes"][recipe]
        seconds = record["seconds"] if recipe == "tpp" else [record["seconds"]]
        assert record["per_T"] == (recipe == "tpp")
        assert len(seconds) == (len(CALIB_TS) if recipe == "tpp" else 1)
        assert all(s > 0 for s in seconds)
    assert result["calibration"]["images"] == 512


def test_calibration_report_per_T_with_the_other_recipes_as_references(calibration_run):
    result, recipes, printed, _ = calibration_run
    reports = result["calibration"]["recipes"]["tpp"]["reports"]
    assert [r["T"] for r in reports] == CALIB_TS
    for report in reports:
        assert len(report["layers"]) == result["config"]["spiking_layers"]
        for layer in report["layers"]:
            assert set(layer["references"]) == set(recipes) - {"tpp"}
            assert 0.0 <= layer["clipped"] <= 1.0 and layer["threshold"]["max"] > 0
    # printed: the table with the calibration times, and the report at --diag-T
    assert "TPP calibration for T + TPP exact" in printed
    assert "calibration time (conversion wall clock, 512 calibration images): 99.9%" in printed
    assert "tpp calibration for T=2, per layer" in printed and "θ (T=2)" in printed
    if "ltb" in recipes:
        assert "θ ltb" in printed and "LTB + its half-threshold IF (SJ)" in printed


def test_calibration_rows_equal_direct_conversions(calibration_run):
    """The deterministic rows against conversions done here, on the same ANN and images: the
    tpp + exact TPP row is the accuracy of calibrate_for_T's quantised ANN (which exact TPP
    computes), the IF row SpikingJelly's own network simulated by tpp_plugin.evaluate, the LTB
    + exact TPP row the ANN quantised with LTB's thresholds."""
    from spikingjelly.activation_based import ann2snn

    import tpp_plugin
    from tpp_plugin.adapters.spikingjelly import IS_LEGACY, calibrated_thresholds
    from tpp_plugin.calibration import calibrate_for_T, quantised_ann

    result, recipes, _, ckpt = calibration_run
    rows = result["variants"]
    ann, batches, x, y = _trained(ckpt, "cnn5")
    assert result["ann"]["accuracy"] == _accuracy(ann, x, y)
    for i, T in enumerate(CALIB_TS):
        calibrated = calibrate_for_T(ann, batches, T, max_samples=None)
        assert rows["tpp/tpp_exact"]["mean"][i] == _accuracy(quantised_ann(ann, calibrated, T),
                                                             x, y)
    if IS_LEGACY:
        rate = ann2snn.Converter(batches, mode="99.9%", neuron="if")(ann)
    else:
        rate = ann2snn.Converter(ann2snn.RateCodingRecipe(batches, mode="99.9%")).convert(ann)
    assert rows["99.9%/if"]["mean"][1] == tpp_plugin.evaluate(rate, (x, y), T=2)["accuracy"]
    if "ltb" in recipes:
        ltb = ann2snn.Converter(ann2snn.LocalThresholdBalancingRecipe(batches)).convert(ann)
        quantised = quantised_ann(ann, calibrated_thresholds(ltb), 2, fuse=True)
        assert rows["ltb/tpp_exact"]["mean"][1] == _accuracy(quantised, x, y)
    # the comparison is not vacuous: the ANN learned, and calibrating for T matters at T=1
    assert result["ann"]["accuracy"] > 0.8
    assert rows["tpp/tpp_exact"]["mean"][0] > rows["99.9%/tpp_exact"]["mean"][0]


def test_calibration_with_snntorch(tmp_path):
    """--framework snntorch: a RateCoding mode through the plugin's converter (IF θ/2 and TPP),
    tpp through convert(mode=...); the tpp + exact row is calibrate_for_T's quantised ANN
    (the converter keeps batch norms: fuse=False)."""
    pytest.importorskip("snntorch")
    from tpp_plugin.calibration import calibrate_for_T, quantised_ann

    code = cli_main(["reproduce", *CALIB_ARGS, "--model", "mlp8", "--framework", "snntorch",
                     "--calibration", "max", "tpp", "--no-plot", "--checkpoint", str(tmp_path),
                     "--out", str(tmp_path)])
    assert code == 0
    result = json.loads((tmp_path / "digits-mlp8-relu-calib-max-tpp-snntorch.json").read_text())
    rows = result["variants"]
    assert set(rows) == {"max/if", "max/tpp_exact", "max/tpp_bernoulli", "max/tpp_unbiased",
                         "tpp/tpp_exact", "tpp/tpp_bernoulli", "tpp/tpp_unbiased"}
    assert rows["max/if"]["evaluation"] == "sequence"
    assert rows["max/if"]["label"] == "RateCoding max + IF (plugin's, v starts at θ/2)"
    ann, batches, x, y = _trained(tmp_path, "mlp8")
    for i, T in enumerate(CALIB_TS):
        calibrated = calibrate_for_T(ann, batches, T, fuse=False, max_samples=None)
        assert rows["tpp/tpp_exact"]["mean"][i] == _accuracy(quantised_ann(ann, calibrated, T),
                                                             x, y)
    reports = result["calibration"]["recipes"]["tpp"]["reports"]
    assert set(reports[0]["layers"][0]["references"]) == {"max", "99.9%"}  # + the ANN's own


@pytest.mark.parametrize("argv, message", [
    (["--calibration", "99.9%", "rate"], "unknown calibration recipe 'rate'"),
    (["--calibration", "tpp", "tpp"], "'tpp' is given twice"),
    (["--calibration", "ltb", "--framework", "snntorch"], "snnTorch converter has no LTB"),
    (["--calibration", "tpp", "--ann", "qcfs"], "run --ann qcfs without --calibration"),
    (["--calibration", "tpp", "--mode", "max"], "give RateCoding modes as recipes"),
])
def test_calibration_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["reproduce", "--dataset", "digits", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_calibration_ltb_needs_spikingjelly_2(capsys):
    """0.0.0.0.14 has no LocalThresholdBalancingRecipe: a usage error naming the reason; on 2.x
    the same arguments parse."""
    from tpp_plugin.cli import parse_args

    argv = ["reproduce", "--dataset", "digits", "--calibration", "99.9%", "ltb", "tpp"]
    if _has_ltb():
        assert parse_args(argv).calibration == ["99.9%", "ltb", "tpp"]
        return
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    assert exit_info.value.code == 2
    assert "the 0.0.0.0.14 line) has none" in capsys.readouterr().err
