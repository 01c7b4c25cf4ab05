"""Every README snippet marked for the installed SpikingJelly line runs as written."""

import pathlib
import re

import pytest

from tpp_plugin.adapters.spikingjelly import IS_LEGACY, TPPNode

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
SNIPPET = re.compile(r"<!-- snippet: (?P<line>[\w.-]+) -->\n```python\n(?P<code>.*?)```", re.S)
SNIPPETS = [(m["line"], m["code"]) for m in SNIPPET.finditer(README.read_text())]


def test_readme_has_snippets_for_both_lines():
    lines = {line for line, _ in SNIPPETS}
    assert {"spikingjelly-2", "spikingjelly-0.0.0.0.14", "any", "snntorch"} <= lines


@pytest.mark.parametrize("line, code", SNIPPETS, ids=[line for line, _ in SNIPPETS])
def test_snippet_runs(line, code):
    other_line = "spikingjelly-2" if IS_LEGACY else "spikingjelly-0.0.0.0.14"
    if line == other_line:
        pytest.skip(f"snippet for {line}")
    namespace: dict = {}
    exec(compile(code, f"README[{line}]", "exec"), namespace)
    if line == "snntorch":
        from tpp_plugin.adapters.snntorch import TPP

        assert any(isinstance(m, TPP) for m in namespace["snn_net"].modules())
        assert namespace["same"] is True
        return
    assert any(isinstance(m, TPPNode) for m in namespace["snn"].modules())
    if "same" in namespace:
        assert bool(namespace["same"].all())


# ------------------------------------------------------------------ import paths in the docs
DOCS = [README, *sorted((README.parent / "docs").glob("*.md"))]
IMPORT = re.compile(r"^[ \t]*(from tpp_plugin(?:\.\w+)* import [^#\n]+)", re.M)
IMPORT_LINES = sorted({(path.name, m[1].strip()) for path in DOCS
                       for m in IMPORT.finditer(path.read_text())})
#: the names of the old module tpp_plugin/evaluate.py, and where each lives now
OLD_EVALUATE = {
    **{name: "tpp_plugin.distributed" for name in (
        "init_distributed", "shutdown_distributed", "check_process_group", "world",
        "ShardSampler", "shard_indices", "all_reduce_sum", "barrier", "broadcast_module",
        "rank_seed", "calibrate_observers", "shared_calibration", "sync_thresholds")},
    "evaluate": "tpp_plugin.evaluation",
    "calibrate_thresholds": "tpp_plugin.convert",
}


def test_docs_have_import_lines():
    assert any("tpp_plugin.distributed" in line for _, line in IMPORT_LINES)


@pytest.mark.parametrize("where, line", IMPORT_LINES, ids=[line for _, line in IMPORT_LINES])
def test_every_import_line_of_the_docs_imports(where, line):
    exec(compile(line, where, "exec"), {})


@pytest.mark.parametrize("name", sorted(OLD_EVALUATE))
def test_the_old_module_path_tpp_plugin_evaluate_still_imports(name):
    import importlib

    import tpp_plugin

    new = importlib.import_module(OLD_EVALUATE[name].partition(" ")[0])
    namespace: dict = {}
    with pytest.warns(DeprecationWarning, match=f"tpp_plugin.evaluate.{name} moved: import it "
                                                f"from {OLD_EVALUATE[name]}"):
        exec(f"from tpp_plugin.evaluate import {name}", namespace)
    if name == "calibrate_thresholds":  # the old default: the default group when one exists
        assert namespace[name].__module__ == "tpp_plugin._legacy_evaluate"
    else:
        assert namespace[name] is getattr(new, name)
    # the package attribute stays the function, also after `import tpp_plugin.evaluate`
    exec("import tpp_plugin.evaluate", {})
    assert tpp_plugin.evaluate is tpp_plugin.evaluation.evaluate


def test_the_old_calibrate_thresholds_calibrates_like_the_new_one():
    import warnings

    import torch

    from tpp_plugin.convert import calibrate_thresholds

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from tpp_plugin.evaluate import calibrate_thresholds as old
    torch.manual_seed(0)
    relu = torch.nn.ReLU()
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), relu)
    batches = [torch.randn(5, 3) for _ in range(3)]
    assert old(net, batches, [relu], "99.9%") == calibrate_thresholds(net, batches, [relu],
                                                                         "99.9%")
