"""`python -m tpp_plugin bench` runs and prints its ratios (tiny shapes: a smoke test, not a
timing test — timings are reported in docs/performance.md, never asserted)."""

import json
import re

import pytest

pytest.importorskip("spikingjelly.activation_based")

from tpp_plugin import cli  # noqa: E402


def test_bench_command_prints_ratios_and_memory(capsys):
    assert cli.main(["bench", "--T", "2", "4", "--shape", "2", "3", "4", "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    assert "machine:" in out and out.count("× IFNode") == 2
    for case in ("TPPNode bernoulli", "TPPNode exact", "TemporalPermutation neuron",
                 "IFNode (SpikingJelly)", "clone()", "rand_like()"):
        rows = re.findall(rf"^{re.escape(case)}\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)"
                          r"\s+([\d.]+)$", out, flags=re.M)
        assert len(rows) == 2, case  # one row per T: ms, ×IF, ×(clone+rand), MiB, ×x
        for ms, vs_if, vs_floor, _, _ in rows:
            assert float(ms) >= 0 and float(vs_if) > 0 and float(vs_floor) > 0
        if case == "clone()":  # the profiler sees the output it allocates: 1× the input
            assert all(abs(float(r[4]) - 1.0) < 1e-6 for r in rows)


def test_bench_json_has_every_row(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert cli.main(["bench", "--T", "2", "--shape", "3", "--repeats", "1", "--json",
                     str(path)]) == 0
    assert f"wrote {path}" in capsys.readouterr().out
    document = json.loads(path.read_text())
    assert document["backend"] == "torch" and document["versions"]["torch"]
    rows = document["results"]["2"]
    assert {"TPPNode exact", "IFNode (SpikingJelly)", "clone()"} <= set(rows)
    assert rows["TPPNode exact"]["ms"] > 0 and rows["TPPNode exact"]["ratios"]["× IFNode"] > 0


def test_bench_timing_is_interleaved_and_uses_medians():
    from tpp_plugin.experiments.bench import time_cases

    calls = []
    cases = [(name, lambda name=name: calls.append(name)) for name in "abc"]
    medians = time_cases(cases, repeats=3, device="cpu", warmup=1)
    assert calls == list("abc") * 4 and set(medians) == set("abc")


def test_cupy_bench_needs_a_cuda_device():
    with pytest.raises(SystemExit, match="--device cuda"):
        cli.main(["bench", "--backend", "cupy", "--T", "2", "--shape", "3", "--repeats", "1"])


@pytest.mark.gpu
@pytest.mark.skipif(
    not __import__("tpp_plugin.kernels.cupy", fromlist=["available"]).available(),
    reason="needs a CUDA device and CuPy",
)
def test_cupy_bench_prints_ratios_to_torch_backend_and_copy(capsys, tmp_path):
    args = ["bench", "--backend", "cupy", "--device", "cuda", "--T", "4", "--shape", "1000",
            "--repeats", "2", "--json", str(tmp_path / "cupy.json")]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "× torch backend" in out and "× clone()" in out
    for case in ("TPPNode bernoulli", "TPPNode exact", "TPPNode unbiased",
                 "TemporalPermutation neuron", "snn.TPP exact (sequence)"):
        row = re.search(rf"^{re.escape(case)}\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", out,
                        flags=re.M)
        assert row and all(float(v) > 0 for v in row.groups()), case
        assert re.search(rf"^{re.escape(case)} \[torch\]\s+[\d.]+", out, flags=re.M), case
    rows = json.loads((tmp_path / "cupy.json").read_text())["results"]["4"]
    assert rows["TemporalPermutation neuron"]["ratios"]["× clone()"] > 0  # the kernel vs a copy


def test_calibration_timing_runs_every_conversion_and_reports_median_ratios(tmp_path, capsys):
    from tpp_plugin.adapters.spikingjelly import IS_LEGACY

    if IS_LEGACY:
        pytest.skip("LocalThresholdBalancingRecipe is SpikingJelly 2.x's")
    from tpp_plugin.experiments import calibration_timing

    path = tmp_path / "timing.json"
    out = calibration_timing.main(["--dataset", "digits", "--models", "mlp8", "--T", "1", "2",
                                   "--repeats", "2", "--calib-images", "64", "--json",
                                   str(path)])
    assert json.loads(path.read_text())["models"]["mlp8"].keys() == {"1", "2"}
    assert out["environment"]["spikingjelly"].startswith("2.")
    for row in out["models"]["mlp8"].values():
        for name in calibration_timing.CONVERSIONS:
            assert len(row[name]["seconds"]) == 2 and min(row[name]["seconds"]) > 0
            assert row[name]["median"] == sum(row[name]["seconds"]) / 2  # median of two
        assert row["ratio"]["tpp"] == row["tpp"]["median"] / row["ltb"]["median"]
    table = capsys.readouterr().out
    assert table.count("| mlp8 |") == 2 and "tpp / LTB" in table


def test_calibration_timing_refuses_weights_of_a_model_it_does_not_run():
    from tpp_plugin.experiments import calibration_timing

    with pytest.raises(SystemExit):
        calibration_timing.main(["--dataset", "digits", "--models", "mlp8",
                                 "--weights", "cnn5=/nonexistent.pt"])
