"""`python -m tpp_plugin demo`, reduced: it runs, prints both tables, rows are consistent."""

from tpp_plugin.adapters.spikingjelly import IS_LEGACY
from tpp_plugin.cli import main
from tpp_plugin.experiments.demo import format_table, run_demo


def test_demo_reduced_run(capfd):
    lines: list = []
    result = run_demo(Ts=(2, 4), epochs=3, echo=lines.append)
    # stderr is not a terminal here: no progress bar at all (SpikingJelly's per-conversion
    # calibration bars included), only the tables, through echo
    assert "%|" not in capfd.readouterr().err
    text = "\n".join(lines)
    assert "SpikingJelly IF (default)" in text and "TPP exact" in text
    relu, qcfs = result["relu"], result["qcfs"]
    expected = {"ANN (ReLU)", "SpikingJelly IF (default)", "TPP bernoulli", "TPP exact",
                "TPP calibrated for T, exact"}
    if not IS_LEGACY:  # SpikingJelly 2.x's own channel-wise recipe, with its IF and with TPP
        expected |= {"SJ LocalThresholdBalancing + IF", "SJ LocalThresholdBalancing + TPP exact"}
    assert set(relu) == expected
    assert qcfs["TPP exact"] == qcfs["ANN with L=T"]  # the exact-count oracle, in the table
    assert all(0.0 <= a <= 1.0 for row in relu.values() for a in row)


def test_snntorch_demo_reduced_run():
    lines: list = []
    result = run_demo(Ts=(2, 4), epochs=3, echo=lines.append, framework="snntorch")
    assert "snnTorch" in "\n".join(lines)
    assert result["qcfs"]["TPP exact"] == result["qcfs"]["ANN with L=T"]


def test_format_table_layout():
    table = format_table("title", {"a": [0.5, 1.0]}, (1, 2))
    assert table.splitlines()[1].split() == ["T=1", "T=2"]
    assert table.splitlines()[-1].split() == ["a", "50.0", "100.0"]


def test_cli_rejects_unknown_command(capsys):
    import pytest

    with pytest.raises(SystemExit):
        main(["nonsense"])
