"""Hardening, round 2: the APIs added since the first round — calibrate_for_T and
TPPCalibrationRecipe, finetune, evaluate, spike_stats, count_mode and the command lines.

:data:`BAD_INPUTS` is this round's table of bad inputs, read as the first round's
(tests/test_hardening.py): each case must raise the stated exception type, and its message must
match a regex that names the argument and the value. The silent cases of the issue (a wrong
result, no error) have regression tests below; the properties (evaluate's ways of passing data,
an ANN left unchanged by calibration and fine-tuning) are Hypothesis tests.
"""

import copy
import math
import re
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import tpp_plugin
from tpp_plugin.calibration import CalibrationOptions, calibrate_for_T
from tpp_plugin.calibration.finetune import finetune
from tpp_plugin.cli import main as cli_main
from tpp_plugin.cli import parse_args

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

snt = pytest.importorskip("tpp_plugin.adapters.snntorch")
sj = pytest.importorskip("tpp_plugin.adapters.spikingjelly")


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()


ANN = _mlp()
ANN_B = _mlp(1)  # same architecture, other weights
DEEPER = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
CNN = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
X = torch.rand(32, 4, generator=torch.Generator().manual_seed(0))
Y = torch.randint(3, (32,), generator=torch.Generator().manual_seed(1))
IMAGES = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(2))
RESULT = calibrate_for_T(ANN, [X], 2)
SNN = snt.convert(ANN, [X], num_steps=4, count="exact", seed=0)


def _calibrated_sj(loader, T=4, **kwargs):
    """A calibrated SpikingJelly conversion: the 2.x recipe where there is one, else
    convert_calibrated (0.0.0.0.14)."""
    if sj.TPPCalibrationRecipe is not None:
        from spikingjelly.activation_based import ann2snn

        return ann2snn.Converter(sj.TPPCalibrationRecipe(loader, T=T, **kwargs)).convert(CNN)
    return sj.convert_calibrated(CNN, loader, T, **kwargs)


def _cal(**options):
    return calibrate_for_T(ANN, [X], 2, **options)


def _ft(*args, **kwargs):
    return finetune(*args, **kwargs)


def _ev(net, data, T=4, **kwargs):
    return tpp_plugin.evaluate(net, data, T, **kwargs)


BAD_INPUTS = [
    # calibrate_for_T: options
    ("cal_max_samples_neg", lambda: _cal(max_samples=-1), ValueError, r"max_samples.*-1"),
    ("cal_max_samples_0", lambda: _cal(max_samples=0), ValueError, r"max_samples.*\b0\b"),
    ("cal_max_samples_true", lambda: _cal(max_samples=True), TypeError, r"max_samples.*True"),
    ("cal_max_samples_float", lambda: _cal(max_samples=2.5), TypeError, r"max_samples.*2\.5"),
    ("cal_max_values_0", lambda: _cal(max_values=0), ValueError, r"max_values.*\b0\b"),
    ("cal_max_values_true", lambda: _cal(max_values=True), TypeError, r"max_values.*True"),
    ("cal_seed_str", lambda: _cal(seed="a"), TypeError, r"seed.*'a'"),
    ("cal_seed_neg", lambda: _cal(seed=-1), ValueError, r"seed.*-1"),
    ("cal_batch_size_0_refine", lambda: _cal(batch_size=0, refine="global"), ValueError,
     r"batch_size.*\b0\b"),
    ("cal_batch_size_float", lambda: _cal(batch_size=8.0), TypeError, r"batch_size.*8\.0"),
    ("cal_offset_steps_0", lambda: _cal(offset_steps=0, bias_correction="search"), ValueError,
     r"offset_steps.*\b0\b"),
    ("cal_coherence_nan", lambda: _cal(coherence=math.nan), ValueError, r"coherence.*nan"),
    ("cal_coherence_str", lambda: _cal(coherence="1"), TypeError, r"coherence.*'1'"),
    ("cal_refine_grid_empty", lambda: _cal(refine_grid=()), ValueError, r"refine_grid.*\(\)"),
    ("cal_refine_grid_neg", lambda: _cal(refine_grid=(1.0, -1.0)), ValueError,
     r"refine_grid.*-1\.0"),
    ("cal_refine_grid_number", lambda: _cal(refine_grid=1.0), TypeError, r"refine_grid.*1\.0"),
    ("options_max_samples_true", lambda: CalibrationOptions(max_samples=True), TypeError,
     r"max_samples.*True"),
    # calibrate_for_T: the model and the batches
    ("cal_ann_not_module", lambda: calibrate_for_T("ann", [X], 2), TypeError, r"ann.*str"),
    ("cal_batches_tensor", lambda: calibrate_for_T(ANN, X, 2), TypeError,
     r"batches.*tensor of shape \(32, 4\)"),
    ("cal_batches_none", lambda: calibrate_for_T(ANN, None, 2), TypeError, r"batches.*NoneType"),
    ("cal_batch_shape", lambda: calibrate_for_T(ANN, [torch.rand(8, 5)], 2), ValueError,
     r"batches: batch 0 of shape \(8, 5\) does not fit"),
    ("cal_batch_yx", lambda: calibrate_for_T(ANN, [(Y, X)], 2), ValueError,
     r"batches: batch 0 is \(labels, inputs\).*torch\.int64.*\(32,\)"),
    ("cal_batches_differ", lambda: calibrate_for_T(ANN, [X, torch.rand(8, 5)], 2), ValueError,
     r"batches: batch 1 holds inputs of shape \(8, 5\)"),
    ("cal_batch_str", lambda: calibrate_for_T(ANN, ["x"], 2), TypeError,
     r"batches: batch 0.*str"),
    ("cal_inputs_near_overflow", lambda: calibrate_for_T(ANN, [X * 1e38], 2), ValueError,
     r"batches: batch 0 holds a value of magnitude 9\.\d+e\+37"),
    ("cal_finetune_fp16", lambda: calibrate_for_T(copy.deepcopy(ANN).half(), [X], 2,
                                                  finetune_epochs=1),
     TypeError, r"ann.*torch\.float16"),
    # the SpikingJelly recipe (2.x) / convert_calibrated (0.0.0.0.14)
    ("recipe_neuron_T", lambda: _calibrated_sj([IMAGES], T=4, neuron_kwargs={"T": 8}),
     ValueError, r"neuron_kwargs: T=8 contradicts T=4"),
    ("recipe_neuron_kwargs_list", lambda: _calibrated_sj([IMAGES], neuron_kwargs=["T"]),
     TypeError, r"neuron_kwargs.*\['T'\]"),
    ("recipe_batch_shape", lambda: _calibrated_sj([torch.rand(8, 1, 5, 5)]), ValueError,
     r"dataloader: batch 0 of shape \(8, 1, 5, 5\) does not fit"),
    ("recipe_batch_yx", lambda: _calibrated_sj([(Y[:8], IMAGES)]), ValueError,
     r"dataloader: batch 0 is \(labels, inputs\)"),
    ("recipe_tensor_loader", lambda: _calibrated_sj(IMAGES), TypeError,
     r"dataloader.*tensor of shape \(8, 1, 8, 8\)"),
    ("recipe_batches_differ", lambda: _calibrated_sj([IMAGES, torch.rand(8, 1, 9, 9)]),
     ValueError, r"dataloader: batch 1 holds inputs of shape \(8, 1, 9, 9\)"),
    # finetune called directly
    ("ft_other_ann", lambda: _ft(ANN_B, RESULT, X, 1), ValueError,
     r"result: it was calibrated on another ANN"),
    ("ft_other_architecture", lambda: _ft(DEEPER, RESULT, X, 1), ValueError,
     r"result: it calibrates the ReLU calls \['_1'\], but ann has \['_1', '_3'\]"),
    ("ft_result_none", lambda: _ft(ANN, None, X, 1), TypeError, r"result.*NoneType"),
    ("ft_x_shape", lambda: _ft(ANN, RESULT, torch.rand(8, 5), 1), ValueError,
     r"x of shape \(8, 5\) does not fit"),
    ("ft_x_empty", lambda: _ft(ANN, RESULT, torch.rand(0, 4), 1), ValueError,
     r"x must hold at least one sample.*\(0, 4\)"),
    # a list of batches is a loader since fine-tuning reads loaders; a list of numbers is not
    ("ft_x_list", lambda: _ft(ANN, RESULT, [1, 2], 1), TypeError,
     r"x must be a tensor.*or a loader.*list whose item 0 is int"),
    ("ft_x_str", lambda: _ft(ANN, RESULT, "images", 1), TypeError, r"x must be a tensor.*str"),
    ("ft_x_int", lambda: _ft(ANN, RESULT, X.long(), 1), TypeError, r"x .*torch\.int64"),
    ("ft_x_nan", lambda: _ft(ANN, RESULT, torch.full((4, 4), math.nan), 1), ValueError,
     r"x contains NaN.*\(4, 4\)"),
    ("ft_batch_size_0", lambda: _ft(ANN, RESULT, X, 1, batch_size=0), ValueError,
     r"batch_size.*\b0\b"),
    ("ft_seed_str", lambda: _ft(ANN, RESULT, X, 1, seed="a"), TypeError, r"seed.*'a'"),
    ("ft_fp16", lambda: _ft(copy.deepcopy(ANN).half(), RESULT, X, 1), TypeError,
     r"ann.*torch\.float16"),
    ("ft_epochs_neg", lambda: _ft(ANN, RESULT, X, -1), ValueError,
     r"^epochs must be a non-negative integer, got -1"),
    ("ft_drop_1", lambda: _ft(ANN, RESULT, X, 1, drop=1.0), ValueError,
     r"^drop must be a number in \[0, 1\), got 1\.0"),
    # evaluate
    ("ev_plain_ann", lambda: _ev(ANN, (X, Y)), ValueError, r"net: Sequential has no spiking"),
    ("ev_T_differs", lambda: _ev(SNN, (X, Y), T=8), ValueError,
     r"T=8 differs from the window of the network's TPP layers \(4\)"),
    ("ev_T_zero", lambda: _ev(SNN, (X, Y), T=0), ValueError, r"T must be >= 1, got 0"),
    ("ev_empty_dataset", lambda: _ev(SNN, TensorDataset(X[:0], Y[:0])), ValueError,
     r"data: the data set is empty \(TensorDataset of 0 samples\)"),
    ("ev_empty_iterable", lambda: _ev(SNN, iter([])), ValueError, r"data: .*no image"),
    ("ev_no_labels_dataset", lambda: _ev(SNN, TensorDataset(X)), TypeError,
     r"data: batch 0 is a list of 1 items, not an \(x, y\) pair"),
    ("ev_no_labels_tensor", lambda: _ev(SNN, X), TypeError, r"data .*tensor of shape \(32, 4\)"),
    ("ev_no_labels_list", lambda: _ev(SNN, [X]), TypeError, r"data: a list of 1 tensors"),
    ("ev_dict_samples", lambda: _ev(SNN, [{"x": X[i], "y": Y[i]} for i in range(4)]),
     TypeError, r"data: batch 0 is a dict with keys \['x', 'y'\]"),
    ("ev_one_hot", lambda: _ev(SNN, (X, nn.functional.one_hot(Y, 3))), ValueError,
     r"data: .*labels of shape \(32, 3\).*one-hot"),
    ("ev_one_hot_batches", lambda: _ev(SNN, [(X, nn.functional.one_hot(Y, 3))]), ValueError,
     r"data: batch 0 has labels of shape \(32, 3\)"),
    ("ev_length_mismatch", lambda: _ev(SNN, (X, Y[:5])), ValueError,
     r"data: .*32 inputs.*but 5 labels"),
    ("ev_data_none", lambda: _ev(SNN, None), TypeError, r"data must be .*NoneType"),
    ("ev_net_str", lambda: _ev("net", (X, Y)), TypeError, r"net must be .*str"),
    ("ev_batch_size_0", lambda: _ev(SNN, (X, Y), batch_size=0), ValueError,
     r"batch_size must be >= 1, got 0"),
    ("ev_batch_size_float", lambda: _ev(SNN, (X, Y), batch_size=2.5), TypeError,
     r"batch_size .*2\.5"),
    ("ev_seed_str", lambda: _ev(SNN, (X, Y), seed="a"), TypeError, r"seed .*'a'"),
    ("ev_bernoulli", lambda: _ev(SNN, (X, Y), bernoulli="two"), ValueError,
     r"bernoulli must be one of .*'two'"),
    ("ev_count_mode_str", lambda: _ev(SNN, (X, Y), count_mode="yes"), TypeError,
     r"count_mode must be True or False, got 'yes'"),
    # spike_stats
    ("stats_T_neg", lambda: tpp_plugin.spike_stats(SNN, T=-1), ValueError,
     r"T must be >= 1, got -1"),
    ("stats_T_0", lambda: tpp_plugin.spike_stats(SNN, T=0), ValueError,
     r"T must be >= 1, got 0"),
    ("stats_net_str", lambda: tpp_plugin.spike_stats("net"), TypeError, r"net .*str"),
    ("stats_T_float", lambda: tpp_plugin.spike_stats(SNN, T=2.0), TypeError, r"T .*2\.0"),
]


def test_table_is_large_enough():
    assert len(BAD_INPUTS) >= 50
    assert len({case[0] for case in BAD_INPUTS}) == len(BAD_INPUTS)


@pytest.mark.parametrize("call, exc_type, pattern", [c[1:] for c in BAD_INPUTS],
                         ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_gets_a_clear_error(call, exc_type, pattern):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(exc_type) as info:
            call()
    message = str(info.value)
    assert re.search(pattern, message), message
    assert "DESIGN" not in message and "shared" not in message


# ------------------------------------------------------------------------------------------------
# the silent cases: regression tests
# ------------------------------------------------------------------------------------------------
def test_nested_count_mode_keeps_the_outer_windows_for_spike_stats():
    """Leaving an inner count_mode deleted the window records the outer block's spike_stats
    reads: its spikes were then counted as single steps (24.0 per image instead of 14.125 in
    the issue's network)."""
    with torch.no_grad():
        with tpp_plugin.count_mode(SNN), tpp_plugin.spike_stats(SNN) as plain:
            SNN(X)
        with tpp_plugin.count_mode(SNN), tpp_plugin.spike_stats(SNN) as nested:
            with tpp_plugin.count_mode(SNN, T=4):
                pass
            SNN(X)
    assert nested.summary()["spikes_per_image"] == plain.summary()["spikes_per_image"] > 0
    assert nested.summary()["spikes"] == plain.summary()["spikes"]


def test_evaluate_takes_the_window_of_the_network_by_default():
    assert _ev(SNN, (X, Y), T=None)["accuracy"] == _ev(SNN, (X, Y), T=4)["accuracy"]


def test_fingerprint_ties_the_result_to_its_ann_and_finetune_accepts_it():
    tuned = finetune(ANN, RESULT, X, 1)
    assert tuned.settings["ann"] == RESULT.settings["ann"]
    assert calibrate_for_T(ANN_B, [X], 2).settings["ann"] != RESULT.settings["ann"]


CLI_REPEATS = [
    ["reproduce", "--T", "1", "2", "--T", "4"],
    ["reproduce", "--T", "2", "2", "2"],
    ["reproduce", "--calibration", "tpp", "--calibration", "ltb"],
    ["reproduce", "--calibration", "tpp", "tpp"],
    ["reproduce", "--model", "cnn5", "--model", "vgg"],
    ["reproduce", "--model", "cnn5", "cnn5"],
    ["reproduce", "--ann", "relu", "--ann", "qcfs"],
    ["reproduce", "--subset", "10", "--subset", "5"],
    ["demo", "--T", "1", "--T", "2"],
    ["demo", "--T", "4", "4"],
    ["bench", "--T", "4", "--T", "8"],
    ["bench", "--shape", "2", "2", "--shape", "3"],
]


@pytest.mark.parametrize("argv", CLI_REPEATS, ids=[" ".join(a) for a in CLI_REPEATS])
def test_repeated_list_flags_are_usage_errors(argv, capsys):
    """A list flag given twice kept only its last values (--T 1 2 --T 4 ran [4]), and repeated
    values were run twice: both are usage errors now, naming the flag (and the value)."""
    with pytest.raises(SystemExit) as exc:
        cli_main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    flag = next(a for a in argv[1:] if a.startswith("--"))
    assert f"argument {flag}:" in err, err
    assert ("given twice" in err), err


def test_list_flags_keep_every_value_given_once():
    args = parse_args(["reproduce", "--T", "1", "2", "4", "--subset", "10", "10",
                       "--model", "cnn5", "mlp8"])
    assert args.T == [1, 2, 4] and args.subset == [10, 10] and args.model == ["cnn5", "mlp8"]


@pytest.mark.parametrize("command, flags", [
    ("reproduce", ["--T", "--model", "--ann", "--calibration", "--subset"]),
    ("demo", ["--T"]), ("bench", ["--T", "--shape"])])
def test_help_states_the_rule_of_list_flags(command, flags, capsys):
    from tpp_plugin.cli import LIST_RULE

    with pytest.raises(SystemExit):
        cli_main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in flags:
        start = text.index(f"{flag} ", text.index("options:"))
        assert LIST_RULE in text[start:start + 1200], flag
    assert text.count(LIST_RULE) == len(flags)


def test_run_refuses_a_neuron_argument_given_twice(tmp_path, capsys):
    script = tmp_path / "script.py"
    script.write_text("raise SystemExit(0)\n")
    assert cli_main(["run", "--neuron-kwargs", "T=4", "T=8", str(script)]) == 2
    err = capsys.readouterr().err
    assert re.search(r"--neuron-kwargs: T is given twice \('T=4' and 'T=8'\)", err), err


def test_run_names_a_neuron_argument_without_value(tmp_path, capsys):
    script = tmp_path / "script.py"
    script.write_text("raise SystemExit(0)\n")
    assert cli_main(["run", "--neuron-kwargs", "count", str(script)]) == 2
    err = capsys.readouterr().err
    assert "no such script: count" in err and "'count' has no value" in err, err


# ------------------------------------------------------------------------------------------------
# properties
# ------------------------------------------------------------------------------------------------
SNN64 = snt.convert(copy.deepcopy(ANN).double(), [X.double()], num_steps=4, count="exact", seed=0)


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(n=st.integers(1, 40), batch=st.integers(1, 16), seed=st.integers(0, 2**16))
def test_evaluate_gives_one_accuracy_for_every_way_of_passing_the_images(n, batch, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 4, generator=gen, dtype=torch.float64) * 2
    y = torch.randint(3, (n,), generator=gen)
    batches = [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]
    ways = {
        "pair": (x, y),
        "dataset": TensorDataset(x, y),
        "loader": DataLoader(TensorDataset(x, y), batch_size=batch),
        "list": batches,
        "tuple": tuple(batches),
        "iterator": iter(batches),
        "generator": (b for b in batches),
    }
    results = {name: tpp_plugin.evaluate(SNN64, data, 4) for name, data in ways.items()}
    correct = int((SNN64(x.expand(4, n, 4)).mean(0).argmax(1) == y).sum())
    for name, result in results.items():
        assert 0 <= result["accuracy"] <= 1, name
        assert result["images"] == n and result["correct"] == correct, name
        assert result["accuracy"] == correct / n, name


def _architectures():
    mlp = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5),
                        nn.Linear(8, 3))
    cnn = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Dropout2d(0.3),
                        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Dropout(0.2),
                        nn.Linear(4 * 4 * 4, 3))
    return [(mlp, (4,)), (cnn, (1, 8, 8))]


def _snapshot(ann):
    return ({k: v.clone() for k, v in ann.state_dict().items()},
            [m.training for m in ann.modules()], [p.requires_grad for p in ann.parameters()],
            [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in ann.modules()])


def _same(a, b):
    states_a, *rest_a = a
    states_b, *rest_b = b
    return (states_a.keys() == states_b.keys()
            and all(torch.equal(states_a[k], states_b[k]) for k in states_a)
            and rest_a == rest_b)


@settings(max_examples=16, deadline=None, suppress_health_check=list(HealthCheck))
@given(arch=st.integers(0, 1), train=st.booleans(), epochs=st.integers(0, 1),
       failure=st.sampled_from([None, "shape", "mid-pass", "finetune-x"]), seed=st.integers(0, 99))
def test_calibration_and_finetuning_never_change_the_users_ann(arch, train, epochs, failure,
                                                               seed):
    torch.manual_seed(seed)
    ann, shape = _architectures()[arch]
    with torch.no_grad():  # batch norms with statistics of their own
        for m in ann.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    ann.train(train)
    x = torch.rand(24, *shape)
    before = _snapshot(ann)
    try:
        if failure == "shape":
            calibrate_for_T(ann, [torch.rand(24, 7)], 2, finetune_epochs=epochs)
        elif failure == "mid-pass":  # refused inside the layer-by-layer pass
            calibrate_for_T(ann, [x], 2, channel_dim=5, finetune_epochs=epochs)
        else:
            result = calibrate_for_T(ann, [x], 2, finetune_epochs=epochs, max_samples=16)
            assert _same(before, _snapshot(ann))
            finetune(ann, result, torch.rand(24, 7) if failure == "finetune-x" else x, 1)
        assert failure is None
    except ValueError:
        assert failure is not None
    assert _same(before, _snapshot(ann))
