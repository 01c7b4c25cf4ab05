"""`python -m tpp_plugin run --calibrate`, and the calibration switch it sets (the recipes'
`calibrate=`, `default_neuron(..., calibrate=...)`).

Every threshold recipe an unmodified script converts with must give exactly what
`TPPCalibrationRecipe(loader, T, ...)` (SpikingJelly 2.x) or `convert_calibrated` (0.0.0.0.14)
gives on the same loader and T — thresholds, weights, and the outputs of the script's single-step
loop, which must equal multi-step on the direct conversion. Bad input fails clearly.
"""

import copy
import json
import os
import textwrap

import pytest
import torch
from spikingjelly.activation_based import ann2snn, functional

import tpp_plugin
from tpp_plugin import registry
from tpp_plugin.adapters.spikingjelly import IS_LEGACY, TPPNode, convert_calibrated
from tpp_plugin.cli import main as cli_main
from tpp_plugin.experiments.data import FASHION_MNIST_DIR

T = 4

SETUP = textwrap.dedent(
    """
    import argparse, json, sys
    import torch
    from torch import nn
    from spikingjelly.activation_based import ann2snn, functional

    torch.manual_seed(0)
    ann = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.AvgPool2d(2), nn.Flatten(), nn.Linear(8 * 4 * 4, 10)).eval()
    with torch.no_grad():
        ann[1].running_mean.uniform_(-0.1, 0.1)
        ann[1].running_var.uniform_(0.5, 1.5)
    images = torch.rand(96, 1, 16, 16)
    labels = ann(images).argmax(1)
    calibration = [(images[i:i + 32], labels[i:i + 32]) for i in range(0, 96, 32)]
    test = torch.rand(20, 1, 16, 16)
    """
)

SCRIPT = SETUP + textwrap.dedent(
    """
    parser = argparse.ArgumentParser()
    parser.add_argument("--time-steps", type=int, default=4)
    parser.add_argument("--case", default="recipes")
    parser.add_argument("--output", required=True)
    args = parser.parse_args()

    def loop(net):  # the ann2snn examples' single-step loop
        functional.reset_net(net)
        with torch.no_grad():
            return sum(net(test) for _ in range(args.time_steps))

    nets = {}
    if args.case == "recipes" and hasattr(ann2snn, "RateCodingRecipe"):
        nets["rate"] = ann2snn.Converter(ann2snn.RateCodingRecipe(calibration, mode="99.9%"))
        nets["rate_channel_half"] = ann2snn.FXConverter(ann2snn.RateCodingRecipe(
            calibration, mode="max", momentum=0.5, channel_wise=True, half_threshold=True,
            fuse_flag=True), device="cpu")
        nets["ltb"] = ann2snn.Converter(ann2snn.LocalThresholdBalancingRecipe(calibration))
        nets = {k: c.convert(ann) for k, c in nets.items()}
    elif args.case == "recipes":
        nets["rate"] = ann2snn.Converter(calibration, mode="99.9%", momentum=0.5)(ann)
    elif args.case == "factory":
        from spikingjelly.activation_based import neuron
        recipe = ann2snn.RateCodingRecipe(
            calibration, neuron_factory=lambda scale: neuron.IFNode(v_reset=None))
        nets["rate"] = ann2snn.Converter(recipe).convert(ann)
    elif args.case == "transformer":
        nets["td"] = ann2snn.Converter("transformer_td_equivalent").convert(ann)
    elif args.case == "explicit" and hasattr(ann2snn, "RateCodingRecipe"):
        nets["rate"] = ann2snn.Converter(ann2snn.RateCodingRecipe(
            calibration, mode="99.9%", neuron="tpp", neuron_kwargs={"T": 4})).convert(ann)
    elif args.case == "explicit":
        nets["rate"] = ann2snn.Converter(calibration, mode="99.9%", neuron="tpp",
                                         neuron_kwargs={"T": 4})(ann)
    out = {k: loop(net) for k, net in nets.items()}
    states = {k: net.state_dict() for k, net in nets.items()}
    neurons = {k: sorted({type(m).__name__ for m in net.modules() if "Node" in type(m).__name__})
               for k, net in nets.items()}
    torch.save({"out": out, "states": states, "neurons": neurons}, args.output)
    """
)


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "convert_script.py"
    path.write_text(SCRIPT)
    return path


@pytest.fixture(scope="module")
def setup():
    namespace = {}
    exec(compile(SETUP, "setup", "exec"), namespace)  # the script's own model and data
    return namespace


def direct(setup, neuron, neuron_kwargs, fuse_flag=True, **options):
    """The conversion `run --calibrate` must equal: the plugin's calibrated conversion called
    directly on the script's loader."""
    ann, calibration = copy.deepcopy(setup["ann"]), setup["calibration"]
    if IS_LEGACY:
        return convert_calibrated(ann, calibration, T, neuron, neuron_kwargs, fuse_flag,
                                  **options)
    recipe = ann2snn.TPPCalibrationRecipe(calibration, T, neuron=neuron,
                                          neuron_kwargs=neuron_kwargs, fuse_flag=fuse_flag,
                                          **options)
    return ann2snn.Converter(recipe).convert(ann)


@torch.no_grad()
def multi_step_sum(snn, x):
    functional.set_step_mode(snn, "m")
    functional.reset_net(snn)
    return snn(x.unsqueeze(0).expand(T, *x.shape)).sum(0)


def run(script, tmp_path, *runner_args, case="recipes"):
    output = tmp_path / "result.pt"
    code = cli_main(["run", *runner_args, str(script), "--time-steps", str(T), "--case", case,
                     "--output", str(output)])
    return code, (torch.load(output) if code == 0 else None)


@pytest.mark.parametrize("neuron, neuron_kwargs, calibrate", [
    ("tpp", {"T": T, "count": "exact", "seed": 0}, {}),
    ("tpp", {"T": T, "seed": 3}, {"max_samples": 64}),      # bernoulli: the same seeds
    ("if", {}, {"T": T}),                                   # calibrated IF: T from --calibrate
    ("tpp", {"T": T, "count": "exact"}, {"finetune_epochs": 1, "max_samples": 48}),
], ids=["tpp-exact", "tpp-bernoulli-max_samples", "if", "tpp-finetune"])
def test_every_threshold_recipe_becomes_the_calibration(script, tmp_path, setup, capfd,
                                                        neuron, neuron_kwargs, calibrate):
    args = ["--neuron", neuron, "--calibrate", *(f"{k}={v}" for k, v in calibrate.items())]
    if neuron_kwargs:
        args += ["--neuron-kwargs", *(f"{k}={v}" for k, v in neuron_kwargs.items()), "--"]
    code, result = run(script, tmp_path, *args)
    err = capfd.readouterr().err
    assert code == 0, err
    options = {k: v for k, v in calibrate.items() if k != "T"}
    expected = direct(setup, neuron, neuron_kwargs, **options)
    want_state = expected.state_dict()
    names = ["rate"] if IS_LEGACY else ["rate", "rate_channel_half", "ltb"]
    assert sorted(result["states"]) == sorted(names)
    for name in names:
        state = result["states"][name]
        assert state.keys() == want_state.keys(), name
        for key, value in want_state.items():  # thresholds, bias shifts, refitted weights
            assert torch.equal(state[key], value), (name, key)
        # the script's single-step loop == multi-step on the direct conversion, same seeds
        # (a fresh one: a network's random streams go on from where its last run left them)
        fresh = direct(setup, neuron, neuron_kwargs, **options)
        assert torch.allclose(result["out"][name], multi_step_sum(fresh, setup["test"]),
                              atol=1e-5), name
        assert result["neurons"][name] == (["TPPNode"] if neuron == "tpp" else ["IFNode"])
    # one line per conversion, saying what happened
    lines = [line for line in err.splitlines() if "replaced by the calibration" in line]
    assert len(lines) == len(names), err
    assert "replaced no conversion" not in err
    count = "exact" if neuron == "if" else neuron_kwargs.get("count", "bernoulli")
    samples = min(96, options.get("max_samples", 1024))
    recipe = "Converter" if IS_LEGACY else "RateCodingRecipe"
    assert lines[0].startswith(f"tpp_plugin: {recipe} replaced by the calibration for T={T} ")
    assert f"count={count!r}" in lines[0] and f"{samples} calibration images" in lines[0]
    assert "ignored: mode='99.9%', momentum=" in lines[0] and " s; kept: fuse_flag=True" in lines[0]
    if "finetune_epochs" in options:
        assert "fine-tuned for 1 epoch on every image of the loader (kept epoch" in lines[0]
    if not IS_LEGACY:
        assert "channel_wise=True" in lines[1] and "half_threshold=True" in lines[1]
        assert "device='cpu'" in lines[1]
        assert lines[2].startswith("tpp_plugin: LocalThresholdBalancingRecipe replaced")
    assert registry.current_default_calibration() is None


@pytest.mark.parametrize("argv, message", [
    (["--calibrate"], "needs the number of time steps the network will run: give the "
                      "neurons' T (e.g. --neuron-kwargs T=8"),
    (["--neuron", "if", "--calibrate"], "give T in the calibration options (e.g. --calibrate T=8"),
    (["--calibrate", "T=2", "--neuron-kwargs", "T=4"], "T=2 contradicts the neurons' T=4"),
    (["--calibrate", "T=0", "--neuron", "if"], "T must be >= 1"),
    (["--calibrate", "max_sample=5", "--neuron-kwargs", "T=4"], "max_sample"),
    (["--calibrate", "fuse=False", "--neuron-kwargs", "T=4"], "fuse_flag decides"),
    (["--calibrate", "finetune_epochs=-1", "--neuron-kwargs", "T=4"], "finetune_epochs"),
    (["--calibrate", "--calibrate", "--neuron-kwargs", "T=4"], "given twice"),
    (["--calibrate", "--neuron", "lif"], "unknown neuron 'lif'"),
], ids=["no-T", "if-no-T", "two-T", "T=0", "unknown-option", "fuse", "bad-value", "twice",
        "bad-neuron"])
def test_bad_calibrate_command_lines_are_usage_errors(script, tmp_path, capsys, argv, message):
    code, _ = run(script, tmp_path, *argv)
    assert code == 2
    assert message in capsys.readouterr().err


def test_calibrate_option_order(script, tmp_path, capfd):
    # --calibrate takes its K=V items, then the runner's other options or the script
    for argv in (["--calibrate", "max_samples=64", "--neuron", "tpp", "--neuron-kwargs",
                  f"T={T}"],
                 ["--calibrate", f"T={T}", "max_samples=64"]):
        code, result = run(script, tmp_path, *argv)
        assert code == 0, capfd.readouterr().err
        assert "64 calibration images" in capfd.readouterr().err


@pytest.mark.skipif(IS_LEGACY, reason="neuron_factory and transformer recipes are SpikingJelly 2.x")
@pytest.mark.parametrize("case, names", [
    ("factory", ["RateCodingRecipe", "neuron_factory"]),
    ("transformer", ["TransformerTDEquivalentRecipe"]),
])
def test_unreplaceable_recipe_stops_the_script_naming_it(script, tmp_path, capfd, case, names):
    code, _ = run(script, tmp_path, "--calibrate", "--neuron-kwargs", f"T={T}", "--", case=case)
    assert code == 1  # the script failed, with the error as its last word
    last = capfd.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("ValueError: tpp_plugin --calibrate: cannot replace")
    assert all(name in last for name in names), last
    if case == "factory":  # without --calibrate the script runs (the recipe keeps its neurons)
        code, _ = run(script, tmp_path, "--neuron-kwargs", f"T={T}", "--", case=case)
        assert code == 0


def test_explicit_neuron_keeps_the_scripts_thresholds(script, tmp_path, capfd):
    code, result = run(script, tmp_path, "--calibrate", "--neuron-kwargs", f"T={T}", "--",
                       case="explicit")
    err = capfd.readouterr().err
    assert code == 0, err
    assert "kept its own thresholds under --calibrate: the script chose neuron= itself" in err
    assert "replaced by the calibration" not in err
    assert "--calibrate replaced no conversion" in err  # the last word of the run says so


# ------------------------------------------------------------------------ the library switch
def test_recipe_keyword_equals_direct_conversion(setup, capfd):
    kwargs = {"T": T, "count": "exact"}
    expected = direct(setup, "tpp", kwargs, max_samples=64).state_dict()
    ann, calibration = setup["ann"], setup["calibration"]
    if IS_LEGACY:
        snn = ann2snn.Converter(calibration, neuron="tpp", neuron_kwargs=kwargs,
                                calibrate={"max_samples": 64})(ann)
    else:
        recipe = ann2snn.LocalThresholdBalancingRecipe(calibration, neuron="tpp",
                                                       neuron_kwargs=kwargs,
                                                       calibrate={"max_samples": 64})
        snn = ann2snn.Converter(recipe).convert(ann)
    state = snn.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], v) for k, v in expected.items())
    assert "replaced by the calibration for T=4" in capfd.readouterr().err


def test_library_switch_errors(setup):
    calibration = setup["calibration"]

    def recipe(**kw):
        if IS_LEGACY:
            return ann2snn.Converter(calibration, **kw)
        return ann2snn.RateCodingRecipe(calibration, **kw)

    with pytest.raises(TypeError, match="needs neuron="):
        recipe(calibrate=True)
    with pytest.raises(ValueError, match="needs the number of time steps"):
        recipe(neuron="tpp", calibrate=True)
    with pytest.raises(TypeError, match="must be True, False or a dict"):
        recipe(neuron="tpp", neuron_kwargs={"T": 2}, calibrate="yes")
    with pytest.raises(TypeError, match="unexpected keyword argument 'gird'"):
        recipe(neuron="tpp", neuron_kwargs={"T": 2}, calibrate={"gird": 3})
    assert getattr(recipe(neuron="tpp", calibrate=False), "_tpp_calibrate", None) is None
    if not IS_LEGACY:
        with pytest.raises(ValueError, match="cannot take neuron_factory="):
            recipe(neuron_factory=lambda s: None, calibrate=True)
    with pytest.raises(ValueError, match="needs the number of time steps"):
        with registry.default_neuron("tpp", calibrate=True):
            pass
    with registry.default_neuron("tpp", T=2, calibrate={"max_samples": 8}):
        request = registry.current_default_calibration()
        assert (request.T, request.options) == (2, {"max_samples": 8})
        with registry.default_neuron("tpp", T=2):  # an inner block states its own choice
            assert registry.current_default_calibration() is None
        assert getattr(recipe(), "_tpp_calibrate", None) is request
    assert registry.current_default_calibration() is None


# --------------------------------------------------------------- SpikingJelly's own example
@pytest.mark.skipif(IS_LEGACY, reason="cnn_mnist.py ships with SpikingJelly 2.x")
@pytest.mark.skipif(
    not os.path.isfile(os.path.join(FASHION_MNIST_DIR, "t10k-labels-idx1-ubyte.gz")),
    reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
def test_spikingjelly_cnn_mnist_example_with_calibrate(tmp_path, capfd):
    from spikingjelly.activation_based.ann2snn.examples import cnn_mnist
    from test_users_scripts import multi_step_outputs, trained_cnn_mnist

    steps = 8
    model, checkpoint, train, test = trained_cnn_mnist(tmp_path)
    output = tmp_path / "results.json"
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        code = cli_main(["run", "--neuron", "tpp", "--calibrate", "--neuron-kwargs",
                         f"T={steps}", "count=exact", "--", cnn_mnist.__file__,
                         "--dataset-dir", str(tmp_path), "--time-steps", str(steps),
                         "--device", "cpu", "--checkpoint-path", str(checkpoint),
                         "--output", str(output)])
    finally:
        os.chdir(cwd)
    err = capfd.readouterr().err
    assert code == 0, err[-3000:]
    metrics = json.loads(output.read_text())["metrics"]
    replaced = [line for line in err.splitlines() if "replaced by the calibration" in line]
    assert [line.split()[1] for line in replaced] == ["RateCodingRecipe",
                                                      "LocalThresholdBalancingRecipe"]
    assert all("1024 calibration images" in line for line in replaced)

    # TPPCalibrationRecipe on the same loader and T, run multi-step: the same accuracy
    calibration = torch.utils.data.DataLoader(train, batch_size=100, shuffle=False)
    batches = list(torch.utils.data.DataLoader(test, batch_size=50, shuffle=False))
    labels = torch.cat([label for _, label in batches])
    model.eval()
    snn = ann2snn.Converter(ann2snn.TPPCalibrationRecipe(
        calibration, steps, neuron="tpp", neuron_kwargs={"T": steps, "count": "exact"})).convert(
            copy.deepcopy(model))
    out = torch.cat(multi_step_outputs(snn, batches, steps))
    expected = (out.argmax(1) == labels).float().mean().item() * 100
    for key in (f"robust_scalar_t{steps}", f"ltb_t{steps}"):
        assert metrics[key]["top1"] == pytest.approx(expected), key
    assert expected > 40
    assert any(isinstance(m, TPPNode) for m in snn.modules())
    assert tpp_plugin.registry.current_default_neuron() is None


def test_snntorch_convert_under_the_switch_says_what_to_do():
    pytest.importorskip("snntorch")
    from torch import nn

    from tpp_plugin.adapters.snntorch import TPP, convert

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    calibration = [torch.rand(8, 4)]
    with registry.default_neuron("tpp", calibrate={"T": 2}):
        with pytest.raises(ValueError, match=r"cannot replace snnTorch convert\(mode='99.9%'\)"):
            convert(model, calibration, num_steps=2, mode="99.9%")
        net = convert(model, calibration, num_steps=2, mode="tpp")  # calibrates itself
    assert any(isinstance(m, TPP) for m in net)
