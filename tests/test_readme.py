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
