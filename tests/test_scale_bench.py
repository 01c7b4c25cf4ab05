"""``python -m tpp_plugin bench --scale`` (tpp_plugin.experiments.scale_bench): every case
runs in its own process and reports time and peak memory; the table and the docs block."""

import pytest

from tpp_plugin.cli import parse_args
from tpp_plugin.experiments import scale_bench


def test_scale_bench_runs_every_case_in_a_subprocess_at_a_small_size():
    """resnet18 at 32 px on 16 images: LTB, RateCoding, the calibration, the SNN's passes and
    a fine-tuning epoch each report seconds and a peak RSS above their RSS before."""
    pytest.importorskip("torchvision")
    spikingjelly = pytest.importorskip("spikingjelly")
    from tpp_plugin.adapters.spikingjelly import IS_LEGACY
    if IS_LEGACY:
        pytest.skip("the recipes are SpikingJelly 2.x's")
    del spikingjelly
    rows = scale_bench.run_all(["resnet18"], [16], T=2, batch_size=8, size=32,
                               finetune_images=16, timeout=300, threads=1, echo=lambda _: None)
    assert [r["kind"] for r in rows] == ["ltb", "rate", "tpp", "snn", "finetune"]
    for r in rows:
        assert "error" not in r, r
        assert r["seconds"] > 0 and r["peak_mb"] >= r["rss_before_mb"] * 0.9
    snn = rows[3]
    assert snn["ann"] > 0 and snn["multi_step"] > 0 and snn["count_mode"] > 0
    table = scale_bench.format_table(rows)
    assert "| resnet18 | 16 |" in table and "fine-tuning epoch" in table


def test_the_table_goes_between_the_markers_of_the_docs(tmp_path):
    path = tmp_path / "performance.md"
    path.write_text("# Performance\n\ntext\n")
    scale_bench.write_docs(str(path), "| a |", "header one")
    scale_bench.write_docs(str(path), "| b |", "header two")
    text = path.read_text()
    assert text.count(scale_bench.DOC_BEGIN) == 1 and "| b |" in text and "| a |" not in text
    assert text.startswith("# Performance\n\ntext\n") and "## Cost as the work grows" in text


def test_bench_scale_parses_its_options():
    args = parse_args(["bench", "--scale", "--models", "resnet18", "resnet50", "--images", "128",
                       "--cases", "ltb", "tpp"])
    assert args.scale and args.models == ["resnet18", "resnet50"] and args.images == [128]
    with pytest.raises(SystemExit):
        parse_args(["bench", "--scale", "--images", "0"])
