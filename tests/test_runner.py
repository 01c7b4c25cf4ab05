"""`python -m tpp_plugin run`: an unmodified converter script gets TPP as its default neuron.

The script below is written in the style of SpikingJelly's benchmark scripts (calibrate a
converter on synthetic data, convert, run multi-step), not copied from them. It never mentions
the plugin: it reports which neuron types the converter built.
"""

import json
import sys
import textwrap

import pytest
import torch

from tpp_plugin import registry
from tpp_plugin.cli import main as cli_main
from tpp_plugin.functional import spawn_seeds as registry_seeds
from tpp_plugin.runner import parse_neuron_kwargs, run_script, split_command

BENCH_STYLE_SCRIPT = textwrap.dedent(
    """
    import argparse, json, sys
    import torch
    from torch import nn
    from spikingjelly.activation_based import ann2snn, functional

    parser = argparse.ArgumentParser()
    parser.add_argument("--time-steps", type=int, default=4)
    parser.add_argument("--report", required=True)
    parser.add_argument("--exit-code", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                          nn.Flatten(), nn.Linear(4 * 4 * 4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    calibration = [(torch.rand(16, 1, 8, 8), torch.zeros(16)) for _ in range(2)]
    if hasattr(ann2snn, "RateCodingRecipe"):
        snn = ann2snn.Converter(ann2snn.RateCodingRecipe(calibration, mode="Max")).convert(model)
    else:
        snn = ann2snn.Converter(calibration, mode="Max")(model)
    neurons = sorted({type(m).__name__ for m in snn.modules() if "Node" in type(m).__name__})
    spikes = None
    if "TPPNode" in neurons:  # the multi-step run works (0.0.0.0.14's plain IF graph cannot)
        functional.set_step_mode(snn, "m")
        x = torch.rand(5, 1, 8, 8)
        with torch.no_grad():
            out = snn(x.unsqueeze(0).repeat(args.time_steps, 1, 1, 1, 1))
        spikes = list(out.shape)
        seeds = sorted({m.seed for m in snn.modules() if type(m).__name__ == "TPPNode"})
    else:
        seeds = []
    counts = {n: sum(type(m).__name__ == n for m in snn.modules()) for n in neurons}
    with open(args.report, "w") as f:
        json.dump({"neurons": counts, "argv": sys.argv[1:], "out_shape": spikes,
                   "main": __name__, "seeds": seeds}, f)
    sys.exit(args.exit_code)
    """
)


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "bench_style.py"
    path.write_text(BENCH_STYLE_SCRIPT)
    return path


def _report(path):
    return json.loads(path.read_text())


def test_script_gets_tpp_without_passing_neuron(script, tmp_path):
    report = tmp_path / "report.json"
    code = cli_main(["run", "--neuron", "tpp", "--neuron-kwargs", "seed=7", "count=exact",
                     str(script), "--time-steps", "3", "--report", str(report)])
    assert code == 0
    result = _report(report)
    assert result["neurons"] == {"TPPNode": 2}
    assert result["out_shape"] == [3, 5, 3]
    # seed=s: the i-th neuron gets the i-th seed spawned from s
    assert result["seeds"] == sorted(registry_seeds(7, 2))
    assert result["argv"] == ["--time-steps", "3", "--report", str(report)]
    assert result["main"] == "__main__"


def test_without_runner_the_framework_default_is_untouched(script, tmp_path):
    report = tmp_path / "report.json"
    assert run_script(str(script), ["--report", str(report)], neuron="if") == 0
    assert set(_report(report)["neurons"]) == {"IFNode"}
    # a plain run of the same script afterwards: SpikingJelly's own neuron again
    saved = sys.argv[:]
    import runpy

    sys.argv = [str(script), "--report", str(report)]
    try:
        with pytest.raises(SystemExit) as exc:
            runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = saved
    assert exc.value.code == 0
    assert set(_report(report)["neurons"]) == {"IFNode"}


def test_exit_code_and_state_are_restored(script, tmp_path):
    report = tmp_path / "report.json"
    argv, path = sys.argv[:], sys.path[:]
    before = registry.registered()
    code = cli_main(["run", "--neuron", "tpp", str(script), "--report", str(report),
                     "--exit-code", "3"])
    assert code == 3
    assert _report(report)["neurons"] == {"TPPNode": 2}
    assert sys.argv == argv and sys.path == path
    assert registry.current_default_neuron() is None
    assert registry.registered() == before


def test_script_exception_gives_exit_code_1(tmp_path, capsys):
    bad = tmp_path / "bad.py"
    bad.write_text("raise RuntimeError('boom')\n")
    assert run_script(str(bad), neuron="tpp") == 1
    assert "boom" in capsys.readouterr().err
    assert registry.current_default_neuron() is None


def test_unknown_neuron_fails_clearly(script, capsys):
    assert cli_main(["run", "--neuron", "lif", str(script)]) == 2
    err = capsys.readouterr().err
    assert "unknown neuron 'lif'" in err and "tpp" in err


@pytest.mark.parametrize(
    "argv, message",
    [([], "no SCRIPT"), (["missing_script.py"], "no such script"),
     (["--neuron-kwargs", "seed", "x.py"], "no such script: seed"),
     (["--neuron-kwargs", "seed=0", "--neuron", "tpp", "x.py"], "is not a script")],
)
def test_bad_command_lines(argv, message, capsys):
    assert cli_main(["run", *argv]) == 2
    assert message in capsys.readouterr().err


def test_neuron_kwargs_parsing():
    assert parse_neuron_kwargs(["seed=0", "count=exact", "v_init=0.5", "T=None"]) == {
        "seed": 0, "count": "exact", "v_init": 0.5, "T": None}
    with pytest.raises(ValueError):
        parse_neuron_kwargs(["=3"])
    assert split_command(["a=1", "s.py", "--x", "y=2"], []) == (["a=1"], ["s.py", "--x", "y=2"])
    assert split_command(["a=1", "--", "s.py"], []) == (["a=1"], ["s.py"])
    assert split_command([], ["--", "s.py", "-v"]) == ([], ["s.py", "-v"])


def test_default_neuron_context_restores_and_validates():
    with pytest.raises(ValueError, match="unknown neuron"):
        with registry.default_neuron("lif"):
            pass
    with registry.default_neuron("tpp", seed=1):
        with registry.default_neuron("if"):
            assert registry.current_default_neuron() == ("if", {})
        assert registry.current_default_neuron() == ("tpp", {"seed": 1})
    assert registry.current_default_neuron() is None


def test_explicit_neuron_wins_over_default(digits_loaders):
    from spikingjelly.activation_based import ann2snn
    from torch import nn

    from tpp_plugin.adapters.spikingjelly import IS_LEGACY, TPPNode

    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 10)).eval()
    train = digits_loaders[0]

    def convert(**hook):
        if IS_LEGACY:
            return ann2snn.Converter(train, mode="Max", **hook)(model)
        return ann2snn.Converter(ann2snn.RateCodingRecipe(train, mode="Max", **hook)).convert(
            model)

    with registry.default_neuron("tpp"):
        default = convert()
        explicit = convert(neuron="if")
    assert any(isinstance(m, TPPNode) for m in default.modules())
    assert not any(isinstance(m, TPPNode) for m in explicit.modules())


def test_snntorch_convert_follows_default():
    pytest.importorskip("snntorch")
    from torch import nn

    from tpp_plugin.adapters.snntorch import IF, TPP, convert

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    calibration = [torch.rand(8, 4)]
    assert any(isinstance(m, TPP) for m in convert(model, calibration, num_steps=2))
    with registry.default_neuron("if"):
        net = convert(model, calibration, num_steps=2)
    assert any(isinstance(m, IF) for m in net) and not any(isinstance(m, TPP) for m in net)
