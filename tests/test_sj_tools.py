"""SpikingJelly's own tools see TPP networks: ``TPPNode`` is a ``neuron.BaseNode``, so
``monitor.OutputMonitor(net, neuron.BaseNode)`` (the tutorials' call) records every TPP layer,
``ann2snn.estimate_delay_start`` gives 0 for window-synchronous networks and the delayed
windows for ``streaming='delayed'``, and the ``ModuleConverter`` recipes (SpikeZIP, Qwen2),
which keep their own neurons, are named in a warning under ``run --neuron tpp``."""

import os
import subprocess
import sys

import pytest
import torch
from spikingjelly.activation_based import functional, monitor, neuron

import tpp_plugin
from tpp_plugin.adapters.spikingjelly import IS_LEGACY, TPPNode, convert_qcfs, swap_neurons
from tpp_plugin.experiments.models import digits_cnn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T = 4


@pytest.fixture(scope="module")
def qcfs_snn():
    torch.manual_seed(0)
    ann = digits_cnn(qcfs_levels=4).eval().double()
    return ann, convert_qcfs(ann, "tpp", {"count": "exact", "seed": 0, "T": T})


def test_tpp_node_is_a_spikingjelly_base_node():
    node = TPPNode(v_threshold=0.5, v_init=0.25, T=T)
    assert isinstance(node, neuron.BaseNode)
    assert node.v == 0.25 and node.v_threshold == 0.5 and node.step_mode == "s"


def test_output_monitor_records_every_tpp_layer_with_its_firing_rate(qcfs_snn, digits):
    ann, snn = qcfs_snn
    x = digits[2][:64].double()
    layers = [m for m in snn.modules() if isinstance(m, TPPNode)]
    functional.set_step_mode(snn, "m")
    rates = {}
    hooks = [m.register_forward_hook(
        lambda mod, args, out: rates.__setitem__(mod, out.mean().item())) for m in layers]
    mon = monitor.OutputMonitor(snn, neuron.BaseNode)
    try:
        with torch.no_grad():
            snn(x.unsqueeze(0).expand(T, *x.shape))
    finally:
        for h in hooks:
            h.remove()
        functional.reset_net(snn)
        functional.set_step_mode(snn, "s")
    assert len(mon.monitored_layers) == len(layers) > 1
    recorded = [r.mean().item() for r in mon.records]
    assert recorded == [rates[m] for m in layers]  # the layers' own outputs, in order
    assert all(0 <= r <= 1 for r in recorded) and max(recorded) > 0  # rates of 0/1 spikes
    mon.remove_hooks()


@pytest.mark.skipif(IS_LEGACY, reason="estimate_delay_start is SpikingJelly 2.x's")
def test_estimate_delay_start_knows_tpp_windows(qcfs_snn, digits):
    from spikingjelly.activation_based import ann2snn

    ann, snn = qcfs_snn
    loader = [(digits[2][:16].double(), digits[3][:16])]
    assert ann2snn.estimate_delay_start(snn, loader, "cpu", 16) == 0  # synchronous: no delay
    delayed = swap_neurons(convert_qcfs(ann, "tpp", {"seed": 0}), "tpp", T=T, streaming="delayed")
    layers = sum(isinstance(m, TPPNode) for m in delayed.modules())
    assert ann2snn.estimate_delay_start(delayed, loader, "cpu", 64) == layers * T
    if_snn = convert_qcfs(ann, "if")  # IF networks keep SpikingJelly's own estimate
    assert ann2snn.estimate_delay_start(if_snn, loader, "cpu", 64) >= 0


@pytest.mark.skipif(IS_LEGACY, reason="ModuleConverter is SpikingJelly 2.x's")
def test_spikezip_example_under_run_warns_that_it_keeps_its_neurons(tmp_path):
    import spikingjelly

    script = os.path.join(os.path.dirname(spikingjelly.__file__), "activation_based", "ann2snn",
                          "examples", "roberta_spikezip_qann_synthetic.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [ROOT, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])}
    proc = subprocess.run(
        [sys.executable, "-m", "tpp_plugin", "run", "--neuron", "tpp", "--", script,
         "--time-steps", "8", "--batch-size", "2", "--output", str(tmp_path / "out.json")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SpikeZIPTFQANNRecipe builds its own neurons" in proc.stderr
    assert tpp_plugin.registry.NEURON_NAMES  # the plugin was importable in the child too


@pytest.mark.skipif(IS_LEGACY, reason="op_counter is SpikingJelly 2.x's")
def test_count_mode_warns_when_spikingjelly_counters_watch_its_pass(qcfs_snn, digits):
    from spikingjelly.activation_based import op_counter

    _, snn = qcfs_snn
    x = digits[2][:8].double()
    with pytest.warns(RuntimeWarning, match="count_mode: DispatchCounterMode is counting"):
        with op_counter.DispatchCounterMode([op_counter.SynOpCounter()]), \
                torch.no_grad(), tpp_plugin.count_mode(snn, T=T):
            snn(x)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no counter: no warning
        with torch.no_grad(), tpp_plugin.count_mode(snn, T=T):
            snn(x)


@pytest.mark.skipif(IS_LEGACY, reason="op_counter is SpikingJelly 2.x's")
def test_spikesim_refuses_and_simple_energy_sees_a_tpp_network(qcfs_snn, digits):
    """SpikeSim models IF/LIF neurons only: its check now names the TPP layers (it used to pass
    a TPP network silently); the simple energy model runs and counts its synaptic operations."""
    from spikingjelly.activation_based import op_counter

    _, snn = qcfs_snn
    functional.set_step_mode(snn, "m")
    x = digits[2][:4].double().unsqueeze(0).expand(T, 4, 1, 8, 8)
    try:
        with pytest.raises(ValueError, match=r"SpikeSim assumes IF/LIF.*TPPNode"):
            op_counter.estimate_spikesim_energy(snn, x, strict=True)
        report = op_counter.estimate_simple_energy(snn, x)
    finally:
        functional.reset_net(snn)
        functional.set_step_mode(snn, "s")
    assert report.counts["mac"] > 0 and report.energy_total_pj > 0
