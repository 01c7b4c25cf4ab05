"""Distributed evaluation (tpp_plugin.evaluate, tpp_plugin.distributed) and `reproduce` under
torchrun (gloo, CPU; nccl on GPUs).

The torchrun tests start 2 processes on the CPU (`python -m torch.distributed.run`); each takes
10–30 s on a 2-core machine. Deterministic variants (IF, exact-count TPP, the ANN) must give the
single-process result exactly: their predictions do not depend on random draws, and every rank
uses the same ANN and thresholds. The nccl test (``gpu`` marker, skipped without CUDA) runs the
same worker with one process per visible GPU, the network and images on the GPUs in float64.
"""

import json
import math
import textwrap

import pytest
import torch
from gpu_helpers import needs_cuda
from torch.utils.data import DistributedSampler, TensorDataset
from torchrun_helpers import torchrun

import tpp_plugin
from tpp_plugin.cli import main as cli_main
from tpp_plugin.convert import calibrate_thresholds
from tpp_plugin.distributed import (
    ShardSampler,
    check_process_group,
    rank_seed,
    shard_indices,
)

pytest.importorskip("spikingjelly.activation_based")



# ------------------------------------------------------------------- what holds across CPUs
# Two evaluations that split the images differently (torchrun: 2 ranks of 51 and 50 images, one
# process: one batch of 101) or use other thread counts (one process 2, torchrun's workers
# OMP_NUM_THREADS=1) give the same predictions, but not bit-equal spike counts: the kernels add a
# neuron's input terms in an order that depends on the batch's shape and the thread count
# (oneDNN/MKL blocking), and float32 sums differ in the last bits. Seen on an AMD EPYC CI machine:
# 2408.5049 spikes per image under torchrun against 2408.4851 in one process (2 spikes over 101
# images), equal accuracies. What holds, and is asserted with `rounding_flip_bound`:
#
# 1. Rounding. A neuron's current at one step is x = b + sum_{j<=n} w_j a_j with n <= 288 terms in
#    digits_cnn (a 3x3 convolution over 32 channels; the linear layer has 256). Each addition
#    rounds with relative error <= u (u = 2^-24 in float32, 2^-53 in float64); taken as
#    independent centred errors (Higham & Mary, "A new approach to probabilistic rounding error
#    analysis", SISC 2019), one order's error has standard deviation <= sqrt(n/3) u S, and two
#    orders differ by sigma_x <= sqrt(2n/3) u S, S = |b| + sum |w_j a_j|. (The worst case,
#    every rounding erring the same way, is n u S: 17 times more, never approached.) Measured on
#    the tested networks S <= 2.7 theta (theta the neuron's threshold); take S <= 4 theta:
#    sigma_x <= 3.3e-6 theta. The potential adds T currents: sigma_V <= sqrt(T) sigma_x, and a
#    difference beyond delta = 4 sigma_V has probability < 1e-4.
# 2. Neurons near a boundary. A neuron's spike count can change only if its potential lies within
#    delta of a firing boundary (k theta for IF, the rounding point of the exact count). Measured
#    share of neuron runs (image x neuron) within d of a boundary, all T comparisons included:
#    2.9 d / theta (ReLU cnn5, IF theta/2 and exact TPP, T = 4) and 0.6 d / theta (the QCFS
#    worker's net); take 4 d / theta: at most N * 4 delta / theta primary flips, N neuron runs
#    (10 times the expected number, N * 4 * E[max(diff, 0)] = 0.4 N * 4 sigma_V / theta).
# 3. Propagation. A flip moves one spike, i.e. the currents of that neuron's fan-out (<= 576
#    synapses) by one weight each, which flip in turn only if they sit that close to a boundary.
#    Measured by adding noise of 1e-6 .. 1e-5 theta to every current (ReLU cnn5, T = 4): a
#    primary flip brought at most 3 more (a flip in layer 3 gave 3 in layer 4); take 1 + 5.
#
# So |spikes_a - spikes_b| <= 6 * N * 4 * 4 sqrt(T) sqrt(2n/3) u * 4 ~ 300 spikes at T = 4 over
# 101 images x 4672 neurons: 3.0 spikes per image, 0.12 % of 2408 (T = 2: 2.1 of 833, 0.25 %).
# A missing or doubled image moves spikes per image by ~1 % (1/101), at least twice the bound for
# the variants that fire enough (asserted where it is used), so a real error still fails; on
# larger sets (the bound grows with the images) the tests count the images exactly and assert
# the bound below 0.5 % of the spikes. In float64 the bound is below 1e-5 spikes on these sets:
# equality. Synaptic operations: each flipped spike moves them by its fan-out (<= 576); the
# firing diagnostic's over/under counts: by one per flipped count plus one per flipped "wanted"
# count (the same share argument at the rounding point of sum x / theta).
FAN_IN = 288  # most terms of one current in digits_cnn (3x3 convolution over 32 channels)
FAN_OUT = 576  # most synapses of one neuron in digits_cnn (3x3 convolution into 64 channels)


def rounding_flip_bound(neuron_runs, T, dtype=torch.float32):
    """``(primary, total)``: the most spike counts that summation order can change, in the
    neurons sitting near a firing boundary (``primary``) and with their propagation (``total``)
    — see the derivation above."""
    u = torch.finfo(dtype).eps / 2
    current_scale, sigmas, density, cascade = 4.0, 4.0, 4.0, 5.0
    sigma_v = math.sqrt(T) * math.sqrt(2 * FAN_IN / 3) * u * current_scale
    primary = neuron_runs * density * sigmas * sigma_v
    return primary, primary * (1 + cascade)


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
    # batches of 100 against 256: spikes equal up to the neurons within float32 rounding of a
    # firing boundary (rounding_flip_bound)
    spikes = result["spike_stats"]["spikes"]
    runs = len(y) * sum(layer["neurons"] for layer in result["spike_stats"]["layers"])
    _, flips = rounding_flip_bound(runs, 4)
    assert spikes > 0 and flips < 0.005 * spikes  # a 1 % error is still caught
    assert abs(count["spike_stats"]["spikes"] - spikes) <= flips


@pytest.fixture
def world_of_one():
    """A gloo process group of one rank in this process: the sharded code paths, world size 1."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group exists already")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def test_distributed_calibration_equals_the_one_process_rule(digits, world_of_one):
    from tpp_plugin.experiments.models import digits_cnn

    torch.manual_seed(0)
    ann = digits_cnn().eval()
    relus = [m for m in ann.modules() if isinstance(m, torch.nn.ReLU)]
    batches = [digits[0][i:i + 100] for i in range(0, 500, 100)]
    for mode in ("max", "99.9%"):
        assert calibrate_thresholds(ann, batches, relus, mode, group=world_of_one) == (
            calibrate_thresholds(ann, batches, relus, mode))


def _twice():
    """A network calling one ReLU twice per forward (as torchvision's BasicBlock does)."""
    torch.manual_seed(0)
    relu = torch.nn.ReLU()
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), relu,
                              torch.nn.Linear(32, 32), relu).eval()
    return net, relu


@pytest.mark.parametrize("mode", ["max", "99.9%"])
def test_sharded_calibration_of_a_module_called_twice(digits, world_of_one, mode):
    net, relu = _twice()
    batches = [digits[0][i:i + 100] for i in range(0, 500, 100)]
    calls = [(relu, 0), (relu, 1)]
    one = calibrate_thresholds(net, batches, calls, mode)
    assert calibrate_thresholds(net, batches, calls, mode, group=world_of_one) == one
    assert one[0] != one[1]  # one statistic per call, not the last call's for both
    # by hand: the moving average of each call's per-batch statistic
    outputs = []
    net[2].register_forward_hook(lambda m, i, o: outputs.append(o.detach().clone()))
    expected = []
    for k in (0, 1):
        ema = None
        for b in batches:
            outputs.clear()
            net(b)
            s = tpp_plugin.convert.activation_statistic(outputs[k], mode)
            ema = s if ema is None else 0.9 * ema + 0.1 * s
        expected.append(float(ema))
    assert one == expected
    for group in (None, world_of_one):  # a bare module means its only call: refused, both ways
        with pytest.raises(ValueError, match="called ReLU 2 times, but 1 calls were expected"):
            calibrate_thresholds(net, batches, [relu], mode, group=group)


def test_sharded_calibration_on_two_simulated_ranks(digits, monkeypatch):
    """Two ranks played one after the other in this process: rank r runs batches r, r + 2, ...
    only, and the all-reduce adds the other rank's table; both get the one-process thresholds,
    for a module called twice too."""
    import tpp_plugin.convert as convert

    net, relu = _twice()
    batches = [digits[0][i:i + 100] for i in range(0, 500, 100)]
    calls = [(relu, 0), (relu, 1)]
    one = calibrate_thresholds(net, batches, calls, "99.9%")
    tables, ran = {}, []
    hook = net[1].register_forward_hook(lambda m, i, o: ran.append(len(i[0])))
    for rank in (1, 0):
        monkeypatch.setattr(convert, "world", lambda group, rank=rank: (rank, 2))
        monkeypatch.setattr(convert, "all_reduce_sum", lambda t, group, rank=rank: (
            tables.setdefault(rank, t.clone()) + tables.get(1 - rank, torch.zeros_like(t))))
        ran.clear()
        th = calibrate_thresholds(net, batches, calls, "99.9%", group=object())
        assert len(ran) == len(range(rank, len(batches), 2))  # its own batches only
        if rank == 0:
            assert th == one
    hook.remove()


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
    from tpp_plugin.convert import calibrate_thresholds
    from tpp_plugin.distributed import (ShardSampler, default_group, init_distributed,
                                        shutdown_distributed, sync_thresholds, world)
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
    th = calibrate_thresholds(ann, batches, relus, "99.9%", group=default_group())
    every = [None] * size
    dist.all_gather_object(every, th)
    out["calibration_same_on_all_ranks"] = all(t == every[0] for t in every)
    out["calibration_equals_one_process"] = th == calibrate_thresholds(ann, batches, relus,
                                                                        "99.9%")
    # a module called twice per forward (a shared ReLU): one threshold per call, also sharded
    relu = torch.nn.ReLU()
    twice = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), relu,
                                torch.nn.Linear(32, 32), relu)
    calls = [(relu, 0), (relu, 1)]
    th2 = calibrate_thresholds(twice, batches, calls, group=default_group())
    every = [None] * size
    dist.all_gather_object(every, th2)
    out["twice_same_on_all_ranks"] = all(t == every[0] for t in every)
    out["twice_equals_one_process"] = th2 == calibrate_thresholds(twice, batches, calls)
    out["twice_differ"] = th2[0] != th2[1]

    # SpikingJelly 2.x: its recipe with the calibration batches shared among the ranks
    from tpp_plugin.adapters.spikingjelly import IS_LEGACY
    if not IS_LEGACY:
        import copy
        from spikingjelly.activation_based import ann2snn
        from tpp_plugin.distributed import shared_calibration

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
        assert dist["correct"] == r["correct"]  # the same predictions: exact
        # other batches (128 per rank, 256 here) and thread counts: spike counts equal up to the
        # neurons within rounding of a firing boundary (rounding_flip_bound; float64: exact)
        runs = 1001 * sum(layer["neurons"] for layer in r["spike_stats"]["layers"])
        _, flips = rounding_flip_bound(runs, 4, x.dtype)
        spikes = r["spike_stats"]["spikes"]
        # a 1 % error is still caught (one image more or less: by the exact image count)
        assert spikes > 0 and flips < 0.005 * spikes
        assert abs(dist["spikes"] - spikes) <= flips
        assert abs(dist["sops"] - r["spike_stats"]["sops"]) <= (
            flips * FAN_OUT + 1e-12 * abs(r["spike_stats"]["sops"]))
    assert out["calibration_same_on_all_ranks"] and out["calibration_equals_one_process"]
    assert out["twice_same_on_all_ranks"] and out["twice_equals_one_process"]
    assert out["twice_differ"]
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
    images, Ts = 101, a["config"]["T"]
    sensitive = set()  # the (T, variant) pairs where one image more or less exceeds the bound
    for key in DETERMINISTIC:
        va, vb = a["variants"][key], b["variants"][key]
        assert va["per_seed"] == vb["per_seed"], key  # the same predictions: exact
        # spike counts and the diagnostic: equal up to the neurons within float32 rounding of a
        # firing boundary (see rounding_flip_bound)
        layers = [(la["layer"], la["neurons_per_run"]) for la in va["diagnostic"]]
        assert layers == [(lb["layer"], lb["neurons_per_run"]) for lb in vb["diagnostic"]], key
        runs = sum(n for _, n in layers)
        for i, T in enumerate(Ts):
            primary, total = rounding_flip_bound(runs, T)
            spikes_a, spikes_b = va["spikes_per_image"][i], vb["spikes_per_image"][i]
            assert abs(spikes_a - spikes_b) * images <= total, (key, T, spikes_a, spikes_b)
            if total / images < 0.5 * spikes_a / images:  # a missing image: twice the bound
                sensitive.add((T, key))
            for la, lb in zip(va["diagnostic"], vb["diagnostic"]):
                for field in ("over", "under"):
                    gap = abs(la[field][i] - lb[field][i]) * la["neurons_per_run"]
                    assert gap <= total + primary, (key, T, la["layer"], field)
    # every variant runs through the same sharding and all-reduce: at every T a variant that
    # fires enough (IF theta/2, exact TPP; not IF v = 0 at 65 spikes per image) would show an
    # image lost or counted twice in its spikes; images and accuracies are compared exactly
    assert {T for T, _ in sensitive} == set(Ts), sensitive
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
    from tpp_plugin.distributed import shared_calibration

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
    # batches of 200 against 256, in float64: rounding_flip_bound is below one spike, so equal
    runs = len(y) * sum(layer["neurons"] for layer in full["spike_stats"]["layers"])
    assert rounding_flip_bound(runs, 4, torch.float64)[1] < 1
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
