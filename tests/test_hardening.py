"""Hardening (issue 12): regression tests for three bugs, clear errors for bad inputs, seeds.

The table :data:`BAD_INPUTS` holds every bad input the issue lists (and neighbours): each must
raise the stated exception type with a message naming the argument.
"""

import argparse
import asyncio
import math
import threading
import warnings

import pytest
import torch
from torch import nn

import tpp_plugin
from tpp_plugin import functional as F
from tpp_plugin import registry
from tpp_plugin.cli import main as cli_main

snt = pytest.importorskip("tpp_plugin.adapters.snntorch")
sj = pytest.importorskip("tpp_plugin.adapters.spikingjelly")
TPPNode, SJPerm = sj.TPPNode, sj.TemporalPermutation


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------
# bug 1: count mode and huge potentials
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_count_equals_fire_for_huge_potentials(dtype):
    big = 2.0**24 if dtype == torch.float32 else 2.0**53
    v = torch.tensor([1.6e7, 1.7e7, 1e30, big, big + 2, -1e30, 3.0, 2.5], dtype=dtype)
    for T in (1, 4, 7):
        fired = F.tpp_fire(v, T, 1.0, generator=gen(3)).sum(0)
        counted = F.tpp_count(v, T, 1.0, generator=gen(3))
        assert torch.equal(fired, counted), (T, fired, counted)
        assert fired[:5].tolist() == [T] * 5 and fired[5] == 0


def test_count_mode_issue_example():
    v = torch.tensor([1.6e7, 1.7e7, 1e30])
    assert F.tpp_count(v, 4, 1.0, generator=gen()).tolist() == [4.0, 4.0, 4.0]


# ------------------------------------------------------------------------------------------------
# bug 3: a rejected call leaves the random stream alone (both frameworks)
# ------------------------------------------------------------------------------------------------
def test_rejected_call_does_not_advance_spikingjelly_stream():
    x = torch.rand(4, 2, 3, generator=gen(1)) * 2
    node = TPPNode(step_mode="m", seed=0, v_threshold=torch.ones(3))
    with pytest.raises(ValueError, match="v_threshold"):
        node(torch.ones(4, 2, 5))
    fresh = TPPNode(step_mode="m", seed=0, v_threshold=torch.ones(3))
    assert torch.equal(node(x), fresh(x))


def test_rejected_window_overflow_does_not_advance_stream():
    # the second window overflows float16: the first must not have drawn
    x = torch.full((8, 2, 3), 0.3, dtype=torch.float16)
    bad = x.clone()
    bad[4:] = 30000.0
    node = TPPNode(step_mode="m", seed=0, T=4)
    with pytest.raises(ValueError, match="x_seq overflows torch.float16"):
        node(bad)
    assert torch.equal(node(x), TPPNode(step_mode="m", seed=0, T=4)(x))


@pytest.mark.parametrize("sequence", [True, False])
def test_rejected_call_does_not_advance_snntorch_stream(sequence):
    T = 4
    kwargs = dict(num_steps=T, seed=0, sequence=sequence, init_hidden=True,
                  threshold=torch.ones(3), streaming="delayed")
    x = torch.rand(T, 2, 3, generator=gen(1)) * 2
    a, b = snt.TPP(**kwargs), snt.TPP(**kwargs)
    with pytest.raises(ValueError, match="threshold"):
        a(torch.ones(T, 2, 5) if sequence else torch.ones(2, 5))
    if sequence:
        assert torch.equal(a(x), b(x))
    else:
        out_a = [a(x[t]) for t in range(T) for _ in range(2)]
        out_b = [b(x[t]) for t in range(T) for _ in range(2)]
        assert all(torch.equal(p, q) for p, q in zip(out_a, out_b))


def test_snntorch_time_loop_overflow_leaves_neuron_usable():
    tpp = snt.TPP(num_steps=4, seed=0, init_hidden=True, streaming="delayed")
    x = torch.full((3,), 40000.0, dtype=torch.float16)
    tpp(x)
    with pytest.raises(ValueError, match="input_ overflows torch.float16"):
        tpp(x)
    assert tpp._step == 1  # state of the last accepted call
    tpp.reset_mem()
    small = torch.full((3,), 0.5, dtype=torch.float16)
    for _ in range(8):
        out = tpp(small)
    assert torch.isfinite(out).all()


def test_fp16_window_overflow_names_input_and_dtype():
    node = TPPNode(step_mode="m", seed=0)
    x = torch.full((32, 2), 3000.0, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"x_seq overflows torch\.float16"):
        node(x)
    assert node(x / 100).shape == x.shape  # still usable, no reset needed


# ------------------------------------------------------------------------------------------------
# 16-bit potentials computed in float32
# ------------------------------------------------------------------------------------------------
def near_rounding_boundaries(T: int, threshold: float, dtype):
    """16-bit potentials within ±0.01θ of every rounding boundary ``(k + ½)·θ``: ``v``, a window
    ``x_seq`` whose sum is ``v`` (adding zeros is exact), the float64 exact counts of those very
    values, and the mask of values whose float32 division may straddle a boundary."""
    k = torch.arange(0, T, dtype=torch.float64).repeat_interleave(2000)
    delta = (torch.rand(len(k), generator=gen(2), dtype=torch.float64) - 0.5) * 0.02
    v = ((k + 0.5 + delta) * threshold).to(dtype)
    w64 = v.double() / threshold
    near = ((w64 - w64.floor()) - 0.5).abs() < 1e-6
    x_seq = torch.zeros((T, len(v)), dtype=dtype)
    x_seq[0] = v
    return v, x_seq, torch.floor(w64 + 0.5).clamp(0, T), near


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("threshold", [0.37, 1.0, 0.1])
def test_exact_counts_of_16bit_inputs_match_float64(dtype, threshold):
    """Potentials within ±0.01θ of a rounding boundary. The 16-bit value itself is what the
    neuron sees; its count must be the float64 count of that very value, except where float32's
    division rounding (relative 6e-8) straddles a boundary (|w − (k+½)| < 1e-6)."""
    T = 8
    v, x_seq, expected, near = near_rounding_boundaries(T, threshold, dtype)
    for counts in (
        F.tpp_count(v, T, threshold, "exact").double(),
        F.tpp_fire(v, T, threshold, "exact", generator=gen()).sum(0).double(),
        TPPNode(v_threshold=threshold, count="exact", step_mode="m")(x_seq).sum(0).double(),
    ):
        assert torch.equal(counts[~near], expected[~near])
    if threshold != 1.0:  # the old 16-bit division moved many of these neurons: the test can fail
        old = torch.floor((v / threshold).double() + 0.5).clamp(0, T)
        assert (old != expected).float().mean() > 0.01
def _cupy_available() -> bool:
    try:
        from tpp_plugin.kernels import cupy as kernels

        return kernels.available()
    except Exception:
        return False


@pytest.mark.gpu
@pytest.mark.skipif(not _cupy_available(), reason="needs a CUDA device and CuPy")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cupy_exact_counts_of_16bit_inputs_match_float64(dtype):
    """The kernel twin: 16-bit potentials divided in float32, as on the torch backend."""
    T, threshold = 8, 0.37
    _, x_seq, expected, near = near_rounding_boundaries(T, threshold, dtype)
    node = TPPNode(v_threshold=threshold, count="exact", step_mode="m", seed=0, backend="cupy")
    counts = node(x_seq.cuda()).sum(0).double().cpu()
    assert torch.equal(counts[~near], expected[~near])


# ------------------------------------------------------------------------------------------------
# seeds
# ------------------------------------------------------------------------------------------------
def test_spawned_seeds_do_not_overlap_between_runs():
    seeds = {s: F.spawn_seeds(s, 16) for s in range(8)}
    everything = [c for children in seeds.values() for c in children]
    assert len(set(everything)) == len(everything)
    assert F.spawn_seeds(5, 3) == seeds[5][:3]  # prefix-stable


def test_neuron_factory_and_swap_use_spawned_seeds():
    factory = sj.NeuronFactory("tpp", seed=1)
    assert [factory().seed for _ in range(3)] == F.spawn_seeds(1, 3)
    net = nn.Sequential(*[sj.make_neuron("if") for _ in range(3)])
    sj.swap_neurons(net, "tpp", seed=0)
    assert [m.seed for m in net] == F.spawn_seeds(0, 3)
    sj.insert_permutation(net, seed=2)
    assert [m[1].seed for m in net] == F.spawn_seeds(2, 3)


def test_reseed_restarts_both_frameworks():
    net = nn.Sequential(TPPNode(step_mode="m", seed=3), SJPerm(step_mode="m", seed=4))
    x = torch.rand(4, 2, 5, generator=gen()) * 2
    first = net(x)
    assert not torch.equal(first, net(x)) or True  # the stream moved on
    tpp_plugin.reseed(net)
    assert torch.equal(first, net(x))
    tpp_plugin.reseed(net, 7)
    assert [m.seed for m in net] == F.spawn_seeds(7, 2)
    snn = snt.TPP(num_steps=4, sequence=True, init_hidden=True, seed=9)
    a = snn(x)
    snn.manual_seed(9)
    assert torch.equal(a, snn(x))


# ------------------------------------------------------------------------------------------------
# default neuron: per context; registration
# ------------------------------------------------------------------------------------------------
def test_default_neuron_is_per_thread():
    seen = {}
    inside, release = threading.Event(), threading.Event()

    def other():
        inside.wait(5)
        seen["other"] = registry.current_default_neuron()
        release.set()

    t = threading.Thread(target=other)
    t.start()
    with registry.default_neuron("tpp", seed=1):
        inside.set()
        release.wait(5)
        seen["main"] = registry.current_default_neuron()
    t.join(5)
    assert seen == {"other": None, "main": ("tpp", {"seed": 1})}


def test_default_neuron_is_per_async_task():
    async def task(name, delay):
        with registry.default_neuron(name):
            await asyncio.sleep(delay)
            return registry.current_default_neuron()[0]

    async def both():
        return await asyncio.gather(task("tpp", 0.02), task("if", 0.01))

    assert asyncio.run(both()) == ["tpp", "if"]


@pytest.fixture
def restore_registration():
    yield
    tpp_plugin.register()


def test_default_neuron_refused_while_unregistered(restore_registration):
    tpp_plugin.unregister("spikingjelly")
    with pytest.raises(RuntimeError, match="not registered"):
        with registry.default_neuron("tpp"):
            pass  # pragma: no cover


def test_unregister_keeps_a_foreign_wrapper_on_top():
    class Owner:
        def f(self):
            return 1

    patcher = registry.Patcher("test")
    patcher.wrap(Owner, "f", lambda orig: (lambda self: orig(self) + 1))
    ours = Owner.__dict__["f"]

    def theirs(self):
        return ours(self) * 10

    Owner.f = theirs
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        patcher.undo()
    assert Owner.__dict__["f"] is theirs and Owner().f() == 20
    assert any("replaced" in str(w.message) for w in caught)


def test_unregister_unknown_framework_is_an_error():
    with pytest.raises(ValueError, match="unknown framework"):
        tpp_plugin.unregister("bogus")


# ------------------------------------------------------------------------------------------------
# the table of bad inputs
# ------------------------------------------------------------------------------------------------
ANN = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
ONES = torch.ones(4, 3)


def _snn_tpp(**kw):
    return snt.TPP(num_steps=kw.pop("num_steps", 4), **kw)


BAD_INPUTS = [
    # functional: potentials, windows, thresholds, counts
    ("fire_T0", lambda: F.tpp_fire(ONES, 0), ValueError, "T"),
    ("fire_T_float", lambda: F.tpp_fire(ONES, 2.0), TypeError, "T"),
    ("fire_T_bool", lambda: F.tpp_fire(ONES, True), TypeError, "T"),
    ("fire_int_v", lambda: F.tpp_fire(torch.ones(3, dtype=torch.int64), 4), TypeError, "v"),
    ("fire_nan_v", lambda: F.tpp_fire(torch.tensor([math.nan]), 4), ValueError, "v"),
    ("fire_list_v", lambda: F.tpp_fire([1.0], 4), TypeError, "v"),
    ("fire_meta_v", lambda: F.tpp_fire(torch.ones(3, device="meta"), 4), ValueError, "v"),
    ("fire_threshold_0", lambda: F.tpp_fire(ONES, 4, 0.0), ValueError, "threshold"),
    ("fire_threshold_neg", lambda: F.tpp_fire(ONES, 4, -1.0), ValueError, "threshold"),
    ("fire_threshold_nan", lambda: F.tpp_fire(ONES, 4, math.nan), ValueError, "threshold"),
    ("fire_threshold_str", lambda: F.tpp_fire(ONES, 4, "1"), TypeError, "threshold"),
    ("fire_threshold_shape", lambda: F.tpp_fire(ONES, 4, torch.ones(2)), ValueError,
     "threshold"),
    ("fire_threshold_enlarges", lambda: F.tpp_fire(torch.ones(3), 4, torch.ones(2, 3)),
     ValueError, "threshold"),
    ("fire_threshold_meta", lambda: F.tpp_fire(ONES, 4, torch.ones(3, device="meta")),
     ValueError, "threshold"),
    ("fire_threshold_int_tensor", lambda: F.tpp_fire(ONES, 4, torch.ones(3, dtype=torch.int32)),
     TypeError, "threshold"),
    ("fire_count", lambda: F.tpp_fire(ONES, 4, count="round"), ValueError, "count"),
    ("fire_generator", lambda: F.tpp_fire(ONES, 4, generator=0), TypeError, "generator"),
    ("fire_uniforms_shape", lambda: F.tpp_fire(ONES, 4, uniforms=torch.rand(3, 4, 3)),
     ValueError, "uniforms"),
    ("count_threshold_shape", lambda: F.tpp_count(ONES, 4, torch.ones(2)), ValueError,
     "threshold"),
    ("count_T0", lambda: F.tpp_count(ONES, 0), ValueError, "T"),
    ("accumulate_empty", lambda: F.tpp_accumulate(torch.ones(0, 3)), ValueError, "x_seq"),
    ("accumulate_overflow", lambda: F.tpp_accumulate(torch.full((32, 2), 3000.0).half()),
     ValueError, "x_seq"),
    ("accumulate_0d", lambda: F.tpp_accumulate(torch.tensor(1.0)), ValueError, "x_seq"),
    ("expected_threshold_0", lambda: F.expected_count(torch.ones(2), 4, 0.0), ValueError,
     "threshold"),
    ("expected_threshold_neg", lambda: F.expected_count(torch.ones(2), 4, -2.0), ValueError,
     "threshold"),
    ("expected_nan_v", lambda: F.expected_count(torch.tensor([math.nan]), 4), ValueError, "v"),
    ("expected_inf_v", lambda: F.expected_count(math.inf, 4), ValueError, "v"),
    ("expected_T0", lambda: F.expected_count(torch.ones(2), 0), ValueError, "T"),
    ("qcfs_lam_0", lambda: F.qcfs(ONES, 0.0, 4), ValueError, "lam"),
    ("qcfs_lam_neg", lambda: F.qcfs(ONES, -1.0, 4), ValueError, "lam"),
    ("qcfs_lam_tensor_neg", lambda: F.qcfs(ONES, torch.tensor(-1.0), 4), ValueError, "lam"),
    ("qcfs_L0", lambda: F.qcfs(ONES, 1.0, 0), ValueError, "L"),
    ("permute_scope", lambda: F.permute_time(ONES, "time"), ValueError, "scope"),
    ("permute_list", lambda: F.permute_time([[1.0]]), TypeError, "x_seq"),
    ("window_uniforms_T0", lambda: F.window_uniforms((3,), 0, "cpu"), ValueError, "T"),
    # seeds
    ("seed_str", lambda: F.check_seed_value("a"), TypeError, "seed"),
    ("seed_float", lambda: F.check_seed_value(1.7), TypeError, "seed"),
    ("seed_neg", lambda: F.check_seed_value(-1), ValueError, "seed"),
    ("seed_2_64", lambda: TPPNode(seed=2**64), ValueError, "seed"),
    ("seed_and_generator", lambda: TPPNode(seed=1, generator=gen()), ValueError, "seed"),
    ("sj_manual_seed_str", lambda: TPPNode(seed=0).manual_seed("a"), TypeError, "seed"),
    ("sj_manual_seed_none", lambda: TPPNode(seed=0).manual_seed(None), TypeError, "seed"),
    ("sj_manual_seed_float", lambda: TPPNode(seed=0).manual_seed(1.7), TypeError, "seed"),
    ("sj_perm_manual_seed_big", lambda: SJPerm(seed=0).manual_seed(2**64), ValueError, "seed"),
    ("snn_manual_seed_str", lambda: _snn_tpp(seed=0).manual_seed("a"), TypeError, "seed"),
    ("snn_manual_seed_float", lambda: _snn_tpp().manual_seed(1.7), TypeError, "seed"),
    ("snn_seed_2_64", lambda: _snn_tpp(seed=2**64), ValueError, "seed"),
    ("factory_seed_str", lambda: sj.NeuronFactory("tpp", seed="a"), TypeError, "seed"),
    ("spawn_seeds_neg_n", lambda: F.spawn_seeds(0, -1), ValueError, "n"),
    # SpikingJelly modules
    ("sj_empty_time", lambda: TPPNode(step_mode="m")(torch.ones(0, 2)), ValueError, "x_seq"),
    ("sj_empty_time_T", lambda: TPPNode(step_mode="m", T=2)(torch.ones(0, 2)), ValueError,
     "x_seq"),
    ("sj_perm_empty_time", lambda: SJPerm(step_mode="m")(torch.ones(0, 2)), ValueError, "x_seq"),
    ("sj_threshold_shape", lambda: TPPNode(step_mode="m", v_threshold=torch.ones(3))(
        torch.ones(4, 2, 5)), ValueError, "v_threshold"),
    ("sj_meta_input", lambda: TPPNode(step_mode="m")(torch.ones(4, 2, device="meta")),
     ValueError, "x_seq"),
    ("sj_meta_threshold", lambda: TPPNode(v_threshold=torch.ones(2, device="meta")), ValueError,
     "v_threshold"),
    ("sj_threshold_0", lambda: TPPNode(v_threshold=0.0), ValueError, "v_threshold"),
    ("sj_T0", lambda: TPPNode(T=0), ValueError, "T"),
    ("sj_count", lambda: TPPNode(count="x"), ValueError, "count"),
    ("sj_v_reset", lambda: TPPNode(v_reset=0.0), ValueError, "v_reset"),
    ("sj_v_init_nan", lambda: TPPNode(v_init=math.nan), ValueError, "v_init"),
    ("sj_int_input", lambda: TPPNode(step_mode="m")(torch.ones(4, 2, dtype=torch.int64)),
     TypeError, "x_seq"),
    ("sj_perm_int_input", lambda: SJPerm(step_mode="m")(torch.ones(4, 2, dtype=torch.int64)),
     TypeError, "x_seq"),
    ("sj_perm_nan_input", lambda: SJPerm(step_mode="m")(torch.full((4, 2), math.nan)),
     ValueError, "x_seq"),
    ("sj_not_multiple", lambda: TPPNode(step_mode="m", T=3)(torch.ones(4, 2)), ValueError,
     "x_seq"),
    ("sj_backend", lambda: TPPNode(backend="jax"), ValueError, "backend"),
    ("sj_neuron_name", lambda: sj.make_neuron("lif"), ValueError, "neuron"),
    ("sj_perm_scope", lambda: SJPerm(scope="x"), ValueError, "scope"),
    # snnTorch modules
    ("snn_gsf_str", lambda: _snn_tpp(graded_spikes_factor="x"), TypeError,
     "graded_spikes_factor"),
    ("snn_gsf_nan", lambda: _snn_tpp(graded_spikes_factor=math.nan), ValueError,
     "graded_spikes_factor"),
    ("snn_gsf_inf_tensor", lambda: _snn_tpp(graded_spikes_factor=torch.tensor(math.inf)),
     ValueError, "graded_spikes_factor"),
    ("snn_if_gsf_nan", lambda: snt.IF(graded_spikes_factor=math.nan), ValueError,
     "graded_spikes_factor"),
    ("snn_num_steps_0", lambda: _snn_tpp(num_steps=0), ValueError, "num_steps"),
    ("snn_threshold_neg", lambda: _snn_tpp(threshold=-1.0), ValueError, "threshold"),
    ("snn_empty_sequence", lambda: _snn_tpp(sequence=True)(torch.ones(0, 2)), ValueError,
     "input_"),
    ("snn_forward_sequence_empty", lambda: _snn_tpp().forward_sequence(torch.ones(0, 2)),
     ValueError, "x_seq"),
    ("snn_if_empty_sequence", lambda: snt.IF(sequence=True)(torch.ones(0, 2)), ValueError,
     "input_"),
    ("snn_threshold_shape_step", lambda: _snn_tpp(threshold=torch.ones(3))(torch.ones(2, 5)),
     ValueError, "threshold"),
    ("snn_threshold_shape_seq", lambda: _snn_tpp(threshold=torch.ones(3), sequence=True)(
        torch.ones(4, 2, 5)), ValueError, "threshold"),
    ("snn_nan_input", lambda: _snn_tpp()(torch.full((2,), math.nan)), ValueError, "input_"),
    ("snn_perm_list", lambda: snt.TemporalPermutation()([[1.0], [0.0]]), TypeError, "x_seq"),
    ("snn_perm_int", lambda: snt.TemporalPermutation()(torch.ones(4, 2, dtype=torch.int64)),
     TypeError, "x_seq"),
    ("snn_perm_complex", lambda: snt.TemporalPermutation()(torch.ones(4, 2, dtype=torch.cfloat)),
     TypeError, "x_seq"),
    ("snn_perm_nan", lambda: snt.TemporalPermutation()(torch.full((4, 2), math.nan)),
     ValueError, "x_seq"),
    ("snn_perm_empty", lambda: snt.TemporalPermutation()(torch.ones(0, 2)), ValueError, "x_seq"),
    ("snn_perm_scope", lambda: snt.TemporalPermutation(scope="x"), ValueError, "scope"),
    # conversion
    ("convert_momentum_5", lambda: snt.convert(ANN, [torch.rand(5, 4)], num_steps=4,
                                               momentum=5), ValueError, "momentum"),
    ("convert_momentum_neg", lambda: snt.convert(ANN, [torch.rand(5, 4)], num_steps=4,
                                                 momentum=-0.1), ValueError, "momentum"),
    ("convert_momentum_nan", lambda: snt.convert(ANN, [torch.rand(5, 4)], num_steps=4,
                                                 momentum=math.nan), ValueError, "momentum"),
    ("convert_calibration_shape", lambda: snt.convert(ANN, [torch.rand(5, 7)], num_steps=4),
     ValueError, "calibration"),
    ("convert_calibration_empty", lambda: snt.convert(ANN, [], num_steps=4), ValueError,
     "dataloader"),
    ("convert_mode", lambda: snt.convert(ANN, [torch.rand(5, 4)], num_steps=4, mode="bogus"),
     ValueError, "mode"),
    # registry
    ("unregister_bogus", lambda: tpp_plugin.unregister("bogus"), ValueError, "framework"),
    ("register_bogus", lambda: tpp_plugin.register("bogus"), ValueError, "framework"),
    ("default_neuron_name", lambda: registry.default_neuron("lif").__enter__(), ValueError,
     "neuron"),
    ("default_neuron_seed", lambda: registry.default_neuron("tpp", seed="a").__enter__(),
     TypeError, "seed"),
]


def test_table_is_large_enough():
    assert len(BAD_INPUTS) >= 60
    assert len({case[0] for case in BAD_INPUTS}) == len(BAD_INPUTS)


@pytest.mark.parametrize("call, exc_type, names", [c[1:] for c in BAD_INPUTS],
                         ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_gets_a_clear_error(call, exc_type, names):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(exc_type) as info:
            call()
    message = str(info.value)
    assert names in message, message
    assert "DESIGN" not in message and "shared" not in message


# ------------------------------------------------------------------------------------------------
# command line: usage errors (exit code 2) before any work
# ------------------------------------------------------------------------------------------------
CLI_ERRORS = [
    ["bench", "--T", "0"], ["bench", "--shape", "0"], ["bench", "--shape", "-1"],
    ["bench", "--repeats", "0"], ["bench", "--device", "gpu"], ["demo", "--T", "0"],
    ["demo", "--levels", "0"], ["demo", "--epochs", "-1"], ["reproduce", "--resize", "0"],
    ["reproduce", "--T", "0"], ["reproduce", "--T", "x"], ["reproduce", "--mode", "bogus"],
    ["reproduce", "--seeds", "0"], ["reproduce", "--subset", "0"],
    ["reproduce", "--subset", "10", "5", "3"], ["reproduce", "--device", "tpu"],
    ["reproduce", "--epochs", "-1"], ["reproduce", "--lr", "0"], ["reproduce", "--L", "0"],
    ["reproduce", "--batch-size", "0"], ["reproduce", "--calib-images", "0"],
    ["reproduce", "--diag-T", "0"], ["reproduce", "--framework", "brian2"],
]


@pytest.mark.parametrize("argv", CLI_ERRORS, ids=[" ".join(a) for a in CLI_ERRORS])
def test_cli_argument_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and argv[1] in err


def test_cli_types_refuse_bad_values():
    from tpp_plugin.cli import device, positive_int

    with pytest.raises(argparse.ArgumentTypeError):
        positive_int("-3")
    assert device("cpu") == "cpu"


def test_non_gzip_data_file_names_its_path(tmp_path):
    from tpp_plugin.experiments import data

    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(b"this is not gzip")
    with pytest.raises(data.DataFileError, match=str(path)):
        data.read_idx(str(path))


def test_reproduce_reports_a_non_gzip_data_file_with_its_path(tmp_path, capsys):
    names = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    for name in names:
        (tmp_path / name).write_bytes(b"not gzip at all")
    code = cli_main(["reproduce", "--dataset", "fashion-mnist", "--data-dir", str(tmp_path),
                     "--T", "1", "--device", "cpu", "--no-plot"])
    assert code == 2
    err = capsys.readouterr().err
    assert str(tmp_path / names[0]) in err and "gzip" in err
