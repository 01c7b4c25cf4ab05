"""tools/gpu_check.sh, the one-call GPU check: its plumbing, on the CPU, with stand-in Pythons
(the GPU stages themselves need a GPU: docs/performance.md, "How to run the GPU checks")."""

import os
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_check.sh"
STAGES = ["environment", "bench --backend cupy", "pytest -m gpu (SpikingJelly 2.x)",
          "pytest nccl (torchrun, every visible GPU)"]


def run_check(tmp_path, python, budget=None):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": python}
    if budget is not None:
        env["GPU_CHECK_BUDGET"] = str(budget)
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    return proc, tmp_path / "out"


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    subprocess.run(["bash", "-n", str(ROOT / "tools" / "gpu_deps.sh")], check=True)


@pytest.mark.parametrize("python, ok", [("true", True), ("false", False)])
def test_every_stage_runs_and_the_exit_status_says_whether_all_passed(tmp_path, python, ok):
    proc, out = run_check(tmp_path, python)
    assert (proc.returncode == 0) == ok, proc.stdout + proc.stderr
    summary = (out / "summary.txt").read_text()
    for stage in STAGES:
        assert f"== {stage}: exit {0 if ok else 1} after" in summary
    assert ("every stage passed" in summary) == ok and ("SOME STAGE FAILED" in summary) != ok
    assert summary in proc.stdout  # the summary ends the output (the device tool's tail)
    # what the device tool brings back: at most 8 files, none deeper than $OUT
    files = list(out.rglob("*"))
    assert 0 < len(files) <= 8 and all(f.is_file() and f.parent == out for f in files)
    assert "nvidia-smi -L" in (out / "env.txt").read_text()


def test_stages_past_the_budget_are_skipped_and_count_as_failed(tmp_path):
    proc, out = run_check(tmp_path, "true", budget=19)
    assert proc.returncode == 1
    summary = (out / "summary.txt").read_text()
    for stage in STAGES:
        assert f"== {stage}: skipped" in summary
