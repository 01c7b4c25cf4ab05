"""Distributed evaluation (tpp_plugin.evaluate) and `reproduce` under torchrun (gloo, CPU; nccl
on GPUs).

The torchrun tests start 2 processes on the CPU (`python -m torch.distributed.run`); each takes
10–30 s on a 2-core machine. Deterministic variants (IF, exact-count TPP, the ANN) must give the
single-process result exactly: their predictions do not depend on random draws, and every rank
uses the same ANN and thresholds. The nccl test (``gpu`` marker, skipped without CUDA) runs the
same worker with one process per visible GPU, the network and images on the GPUs in float64.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from gpu_helpers import needs_cuda
from torch.utils.data import DistributedSampler, TensorDataset

import tpp_plugin
from tpp_plugin.cli import main as cli_main
from tpp_plugin.evaluate import (
    ShardSampler,
    calibrate_thresholds,
    check_process_group,
    rank_seed,
    shard_indices,
)

pytest.importorskip("spikingjelly.activation_based")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torchrun(args, tmp_path, nproc=2, timeout=240):
    inherited = [os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                 if p]  # the workers run in tmp_path: a relative entry would point elsewhere
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*inherited, ROOT]),
           "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--standalone", *args]
    # a session of its own: on a timeout the workers go down with the launcher
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun timed out after {timeout} s:\n{stdout[-3000:]}{stderr[-3000:]}")
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return stdout


# ------------------------------------------------------------------------------ no torchrun
@pytest.mark.parametrize("n", [1, 7, 10, 1001])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_sampler_gives_every_index_exactly_once(n, world):
    if world > n:
        with pytest.raises(ValueError, match="larger than the test set"):
            ShardSampler(range(n), world, 0)
        return
    shards = [list(ShardSampler(range(n), world, r)) for r in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(n))
    for r, shard in enumerate(shards):
        assert len(ShardSampler(range(n), world, r)) == len(shard)
        # DistributedSampler's own order, its padded repeats cut off
        padded = list(DistributedSampler(range(n), world, r, shuffle=False, drop_last=False))
        assert padded[:len(shard)] == shard
    if n % world:
        assert sum(len(s) for s in shards) < world * -(-n // world)  # padding was dropped


def test_without_a_process_group_everything_is_one_rank():
    assert shard_indices(5).tolist() == [0, 1, 2, 3, 4]
    assert rank_seed(12, 0) == 12
    seeds = {rank_seed(12, r) for r in range(1, 6)}
    assert len(seeds) == 5 and 12 not in seeds and rank_seed(12, 3) == rank_seed(12, 3)


def test_torchrun_environment_without_a_process_group_is_an_error(monkeypatch, relu_cnn):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(RuntimeError, match="no process group.*init_distributed"):
        check_process_group()
    with pytest.raises(RuntimeError, match="WORLD_SIZE=2"):
        tpp_plugin.evaluate(relu_cnn, (torch.zeros(2, 1, 8, 8), torch.zeros(2)), T=2)


def _qcfs_snn():
    from tpp_plugin.adapters.spikingjelly import convert_qcfs
    from tpp_plugin.experiments.models import digits_cnn

    torch.manual_seed(0)
    return convert_qcfs(digits_cnn(qcfs_levels=4).eval(), "tpp", {"count": "exact", "seed": 0})


def test_evaluate_in_one_process_matches_a_manual_loop(digits):
    from spikingjelly.activation_based import functional

    _, _, x, y = digits
    snn = _qcfs_snn()
    result = tpp_plugin.evaluate(snn, TensorDataset(x, y), T=4, batch_size=100, stats=True)
    count = tpp_plugin.evaluate(snn, (x, y), T=4, count_mode=True, stats=True)
    functional.set_step_mode(snn, "m")
    with torch.no_grad():
        preds = snn(x.unsqueeze(0).expand(4, *x.shape)).mean(0).argmax(1)
    functional.reset_net(snn)
    correct = int((preds == y).sum())
    assert result["images"] == count["images"] == len(y) and result["world_size"] == 1
    assert result["correct"] == count["correct"] == correct  # exact counts: the same predictions
    assert result["accuracy"] == correct / len(y)
    assert result["spike_stats"]["spikes"] == count["spike_stats"]["spikes"] > 0


def test_distributed_calibration_equals_the_one_process_rule(digits):
    from tpp_plugin.convert import calibrate_thresholds as one_process
    from tpp_plugin.experiments.models import digits_cnn

    torch.manual_seed(0)
    ann = digits_cnn().eval()
    relus = [m for m in ann.modules() if isinstance(m, torch.nn.ReLU)]
    batches = [digits[0][i:i + 100] for i in range(0, 500, 100)]
    for mode in ("max", "99.9%"):
        assert calibrate_thresholds(ann, batches, relus, mode) == one_process(
            ann, batches, relus, mode)


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_reproduce_refuses_energy_constants_not_above_zero(value, capsys):
    with pytest.raises(SystemExit) as error:
        cli_main(["reproduce", "--e-ac", value])
    assert error.value.code == 2
    assert "--e-ac" in capsys.readouterr().err


# ------------------------------------------------------------------------------- torchrun
WORKER = textwrap.dedent('''
    import json, sys
    import torch
    import torch.distributed as dist
    import tpp_plugin
    from tpp_plugin.experiments import data
    from tpp_plugin.evaluate import (ShardSampler, calibrate_thresholds, init_distributed,
                                     shutdown_distributed, sync_thresholds, world)
    from tpp_plugin.convert import calibrate_thresholds as one_process
    from tpp_plugin.adapters.spikingjelly import convert_qcfs
    from tpp_plugin.experiments.models import digits_cnn

    # argv: output file, device ('cpu': gloo; 'cuda': nccl, one GPU per rank, float64)
    device = sys.argv[2] if len(sys.argv) > 2 else "cpu"
    dtype = torch.float64 if device == "cuda" else torch.float32
    assert init_distributed(device)
    rank, size = world()
    x_train, y_train, x_test, y_test = data.load_digits(seed=0)
    x, y = torch.cat([x_train, x_test])[:1001], torch.cat([y_train, y_test])[:1001]
    dataset = torch.utils.data.TensorDataset(x.to(dtype), y)
    out = {"backend": dist.get_backend(), "world_size": size}

    # 1001 images on 2 ranks: every index once
    mine = list(ShardSampler(dataset))
    gathered = [None] * size
    dist.all_gather_object(gathered, mine)
    out["indices"] = sorted(i for part in gathered for i in part)
    out["shard_sizes"] = [len(part) for part in gathered]

    # exact-count TPP in count mode and in the full simulation: deterministic predictions
    torch.manual_seed(0)
    qcfs = digits_cnn(qcfs_levels=4).eval()
    snn = convert_qcfs(qcfs, "tpp", {"count": "exact", "seed": 0}).to(device, dtype)
    for mode in (True, False):
        r = tpp_plugin.evaluate(snn, dataset, T=4, count_mode=mode, seed=5, stats=True,
                                batch_size=128)
        out[f"count_mode={mode}"] = {"images": r["images"], "correct": r["correct"],
                                     "spikes": r["spike_stats"]["spikes"],
                                     "sops": r["spike_stats"]["sops"]}

    # calibration shared among the ranks, 5 batches on 2 ranks
    torch.manual_seed(0)
    ann = digits_cnn().eval()
    relus = [m for m in ann.modules() if isinstance(m, torch.nn.ReLU)]
    batches = [x[i:i + 100] for i in range(0, 500, 100)]
    th = calibrate_thresholds(ann, batches, relus, "99.9%")
    every = [None] * size
    dist.all_gather_object(every, th)
    out["calibration_same_on_all_ranks"] = all(t == every[0] for t in every)
    out["calibration_equals_one_process"] = th == one_process(ann, batches, relus, "99.9%")

    # SpikingJelly 2.x: its recipe with the calibration batches shared among the ranks
    from tpp_plugin.adapters.spikingjelly import IS_LEGACY
    if not IS_LEGACY:
        import copy
        from spikingjelly.activation_based import ann2snn
        from tpp_plugin.evaluate import shared_calibration

        def scales(recipe_class):
            snn = ann2snn.Converter(recipe_class(batches, mode="99.9%")).convert(
                copy.deepcopy(ann))
            return [float(m.scale) for m in snn.modules() if type(m).__name__ == "VoltageScaler"]

        shared = scales(shared_calibration(ann2snn.RateCodingRecipe))
        every = [None] * size
        dist.all_gather_object(every, shared)
        out["recipe_same_on_all_ranks"] = all(e == every[0] for e in every)
        out["recipe_equals_one_process"] = shared == scales(ann2snn.RateCodingRecipe)

    # sync_thresholds: rank 1 drifts, the broadcast brings it back to rank 0's
    snn2 = convert_qcfs(qcfs, "if")
    scalers = [m for m in snn2.modules() if type(m).__name__ == "VoltageScaler"]
    if rank == 1:
        for m in scalers:
            m.scale.mul_(1.01)
    out["gap"] = sync_thresholds(snn2)
    values = [float(m.scale) for m in scalers]
    every = [None] * size
    dist.all_gather_object(every, values)
    out["synced"] = all(v == every[0] for v in every)

    # a world larger than the data set is refused on every rank
    try:
        tpp_plugin.evaluate(snn, torch.utils.data.TensorDataset(x[:1].to(dtype), y[:1]), T=2)
        out["too_small"] = None
    except ValueError as error:
        out["too_small"] = str(error)
    if rank == 0:
        json.dump(out, open(sys.argv[1], "w"))
    shutdown_distributed()
''')


def test_torchrun_uneven_split_counts_every_image_once(tmp_path, digits):
    (tmp_path / "worker.py").write_text(WORKER)
    torchrun(["worker.py", str(tmp_path / "out.json")], tmp_path)
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["backend"] == "gloo" and out["shard_sizes"] == [501, 500]
    check_worker(out, digits, world=2, device="cpu")


@needs_cuda
def test_torchrun_nccl_on_every_visible_gpu(tmp_path, digits):
    """The worker of the gloo test with nccl, one process per visible GPU (one GPU: a world of
    one, which still goes through nccl's collectives)."""
    size = torch.cuda.device_count()
    (tmp_path / "worker.py").write_text(WORKER)
    torchrun(["worker.py", str(tmp_path / "out.json"), "cuda"], tmp_path, nproc=size, timeout=60)
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["backend"] == "nccl"
    check_worker(out, digits, world=size, device="cuda")


def check_worker(out, digits, world, device):
    """What the torchrun worker reported: every image once, the one-process figures, the same
    thresholds on every rank, and the refusal of a world larger than the data set."""
    assert out["world_size"] == world
    assert out["indices"] == list(range(1001))
    assert out["shard_sizes"] == [len(range(r, 1001, world)) for r in range(world)]
    # the same figures in one process, over all 1001 images (on the GPU: in float64 there too)
    x_train, y_train, x_test, y_test = digits
    x, y = torch.cat([x_train, x_test])[:1001], torch.cat([y_train, y_test])[:1001]
    snn = _qcfs_snn()
    if device == "cuda":
        snn, x = snn.to(device, torch.float64), x.double()
    for mode in (True, False):
        r = tpp_plugin.evaluate(snn, TensorDataset(x, y), T=4, count_mode=mode, stats=True)
        dist = out[f"count_mode={mode}"]
        assert dist["images"] == 1001
        assert dist["correct"] == r["correct"]
        assert dist["spikes"] == r["spike_stats"]["spikes"] > 0
        assert dist["sops"] == pytest.approx(r["spike_stats"]["sops"], rel=1e-12)
    assert out["calibration_same_on_all_ranks"] and out["calibration_equals_one_process"]
    from tpp_plugin.adapters.spikingjelly import IS_LEGACY

    if not IS_LEGACY:
        assert out["recipe_same_on_all_ranks"] and out["recipe_equals_one_process"]
    assert out["synced"] and (out["gap"] > 0 if world > 1 else out["gap"] == 0)
    if world > 1:
        assert f"world size {world} is larger than the test set (1 images)" in out["too_small"]
    else:
        assert out["too_small"] is None


REPRODUCE = ["--dataset", "digits", "--model", "cnn5", "--ann", "relu", "--T", "2", "4",
             "--epochs", "20", "--subset", "900", "101", "--calib-images", "256", "--no-plot"]
DETERMINISTIC = ("if_v0", "if_half", "tpp_exact")


def test_torchrun_reproduce_equals_one_process(tmp_path):
    one, two, checkpoint = tmp_path / "one", tmp_path / "two", tmp_path / "ck"
    assert cli_main(["reproduce", *REPRODUCE, "--checkpoint", str(checkpoint),
                     "--out", str(one)]) == 0
    stdout = torchrun(["-m", "tpp_plugin", "reproduce", *REPRODUCE, "--checkpoint",
                       str(checkpoint), "--out", str(two)], tmp_path)
    assert stdout.count("wrote ") == 1  # rank 0 prints and writes
    assert sorted(p.name for p in two.iterdir()) == ["digits-cnn5-relu-p99.9.json"]
    a = json.loads((one / "digits-cnn5-relu-p99.9.json").read_text())
    b = json.loads((two / "digits-cnn5-relu-p99.9.json").read_text())
    assert a["environment"]["world_size"] == 1 and b["environment"]["world_size"] == 2
    assert b["environment"]["backend"] == "gloo"
    assert a["config"]["test_images_evaluated"] == b["config"]["test_images_evaluated"] == 101
    assert b["config"]["threshold_gap_between_ranks"] == 0.0  # the ranks built the same ones
    assert a["ann"]["accuracy"] == b["ann"]["accuracy"] > 0.5
    for key in DETERMINISTIC:
        assert a["variants"][key]["per_seed"] == b["variants"][key]["per_seed"], key
        assert a["variants"][key]["spikes_per_image"] == pytest.approx(
            b["variants"][key]["spikes_per_image"], rel=1e-12)
        assert a["variants"][key]["diagnostic"] == b["variants"][key]["diagnostic"]
    accuracies = {v["per_seed"][0][1] for v in a["variants"].values()}
    assert len(accuracies) > 2  # the variants differ: equal results are not a constant
    for v in b["variants"].values():
        assert all(s > 0 for s in v["spikes_per_image"]) and all(
            s > 0 for s in v["sops_per_image"])


def test_evaluate_refuses_energy_constants_not_above_zero(digits):
    _, _, x, y = digits
    with pytest.raises(ValueError, match="e_mac must be a finite energy > 0"):
        tpp_plugin.evaluate(_qcfs_snn(), (x[:4], y[:4]), T=2, e_mac=0.0)


@pytest.mark.parametrize("mode", ["Max", "99.9%"])
def test_shared_calibration_recipe_equals_spikingjelly_recipe_in_one_process(relu_cnn, digits,
                                                                            mode):
    import copy

    from spikingjelly.activation_based import ann2snn

    from tpp_plugin.adapters.spikingjelly import IS_LEGACY
    from tpp_plugin.evaluate import shared_calibration

    if IS_LEGACY:
        pytest.skip("SpikingJelly 0.0.0.0.14 has no recipes")
    batches = [digits[0][i:i + 100] for i in range(0, 500, 100)]
    scales = []
    for recipe_class in (ann2snn.RateCodingRecipe, shared_calibration(ann2snn.RateCodingRecipe)):
        snn = ann2snn.Converter(recipe_class(batches, mode=mode)).convert(copy.deepcopy(relu_cnn))
        scales.append([float(m.scale) for m in snn.modules()
                       if type(m).__name__ == "VoltageScaler"])
    assert len(scales[0]) == 10 and scales[0] == scales[1]


def test_evaluate_snntorch_network(relu_cnn, digits):
    snt = pytest.importorskip("tpp_plugin.adapters.snntorch")
    x_train, _, x, y = digits
    net = snt.convert(relu_cnn, [x_train[:256]], num_steps=4, mode="99.9%", count="exact",
                      seed=0).double()
    x = x.double()
    full = tpp_plugin.evaluate(net, (x, y), T=4, stats=True, batch_size=200)
    count = tpp_plugin.evaluate(net, (x, y), T=4, count_mode=True, stats=True)
    with torch.no_grad():
        preds = net(x.unsqueeze(0).expand(4, *x.shape)).mean(0).argmax(1)
    assert full["correct"] == count["correct"] == int((preds == y).sum())
    assert full["spike_stats"]["spikes"] == count["spike_stats"]["spikes"] > 0
    assert full["spike_stats"]["layers"][-1]["fan_out"] == 10


def test_evaluate_takes_a_list_of_batches_like_the_pair_it_was_cut_from(digits):
    """Regression: a list of (x, y) batches was taken for a data set of samples and collated
    again (40 one-image batches gave an accuracy of 3.0)."""
    _, _, x, y = digits
    x, y = x[:40].double(), y[:40]
    snn = _qcfs_snn().double()
    whole = tpp_plugin.evaluate(snn, (x, y), T=2)
    for size in (1, 7, 40):
        batches = [(x[i:i + size], y[i:i + size]) for i in range(0, 40, size)]
        for data in (batches, iter(batches)):
            result = tpp_plugin.evaluate(snn, data, T=2)
            assert result["images"] == 40 and result["correct"] == whole["correct"], size
