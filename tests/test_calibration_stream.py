"""The streamed calibration (tpp_plugin.calibration.stream): the values between the layers in
chunks of a batch, held in memory up to ``cache_bytes`` and in a temporary file beyond, each
decision from statistics accumulated over the chunks — the same calibration as the in-memory
path (``stream=False``) on the float64 oracle models."""

import os
import tempfile

import pytest
import torch
from test_calibration import inputs, models
from torch import nn

from tpp_plugin.calibration import calibrate_for_T
from tpp_plugin.calibration.stream import ChunkStore

#: float64 models: the two paths differ only in the summation order of the per-channel means
#: (per-chunk sums added in float64 against one ``mean`` over all samples), about 1e-16 relative; a
#: threshold that moved to another grid point would differ by max/grid (≥ 1e-3 here), a refit
#: by far more than this
ATOL = 1e-12


def _assert_same(r1, r2):
    assert r1.names == r2.names and r1.bias_targets == r2.bias_targets
    assert r1.settings["samples"] == r2.settings["samples"]
    for a, b in zip(r1.thresholds, r2.thresholds):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=0, atol=ATOL)
    assert (r1.output_scales is None) == (r2.output_scales is None)
    for a, b in zip(r1.output_scales or [], r2.output_scales or []):
        assert torch.allclose(a, b, rtol=0, atol=ATOL)
    for a, b in zip(r1.bias_shifts, r2.bias_shifts):
        assert (a is None) == (b is None)
        assert a is None or torch.allclose(a, b, rtol=0, atol=ATOL)
    assert (r1.weights or {}).keys() == (r2.weights or {}).keys()
    for name in r1.weights or {}:
        for a, b in zip(r1.weights[name], r2.weights[name]):
            assert torch.allclose(a, b, rtol=0, atol=ATOL)
    assert (r1.output_shift is None) == (r2.output_shift is None)
    if r1.output_shift is not None:
        assert torch.allclose(r1.output_shift, r2.output_shift, rtol=0, atol=ATOL)


@pytest.mark.parametrize("granularity", ["channel", "layer"])
@pytest.mark.parametrize("T", [1, 4])
@pytest.mark.parametrize("name", ["maxpool", "resnet", "vgg", "cnn5"])
def test_streamed_calibration_equals_the_in_memory_one(name, T, granularity):
    """Thresholds, output steps, bias shifts, refitted weights and the output's shift: equal
    (float64, ``ATOL``) with the values in chunks of 16 samples, most of them in the
    temporary file, and ``max_samples`` drawn from a loader that holds more (read twice)."""
    ann = models()[name]
    x = inputs(150)
    loader = [x[:60], x[60:110], x[110:]]
    kw = dict(max_values=300, max_rows=400, max_samples=120, granularity=granularity)
    memory = calibrate_for_T(ann, loader, T, stream=False, **kw)
    streamed = calibrate_for_T(ann, loader, T, batch_size=16, cache_bytes=150_000, **kw)
    _assert_same(memory, streamed)
    assert memory.weights  # the refit ran
    cache = streamed.settings["cache"]
    # the file was used, for several times what memory held (ReLU outputs are not stored:
    # they are recomputed from their inputs when read)
    assert cache["spilled_bytes"] > 3 * cache["cache_bytes"]
    assert cache["peak_bytes"] <= cache["cache_bytes"]


@pytest.mark.parametrize("options", [
    dict(bias_correction="search"), dict(count="bernoulli"), dict(reference="input"),
    dict(reconstruct=False), dict(search="exact"), dict(relu_steps=2),
    dict(max_values=None, max_rows=100_000), dict(max_samples=None)])
def test_streamed_calibration_equals_the_in_memory_one_with_other_options(options):
    ann = models()["resnet"]
    x = inputs(96)
    kw = {"max_samples": 80, **options}
    memory = calibrate_for_T(ann, [x[:50], x[50:]], 2, stream=False, **kw)
    streamed = calibrate_for_T(ann, [x[:50], x[50:]], 2, batch_size=8, cache_bytes=100_000, **kw)
    _assert_same(memory, streamed)


def test_streamed_calibration_leaves_no_temporary_file():
    before = set(os.listdir(tempfile.gettempdir()))
    x = inputs(64)
    result = calibrate_for_T(models()["cnn5"], [x], 2, batch_size=8, cache_bytes=50_000)
    assert result.settings["cache"]["spilled_bytes"] > 0
    left = {f for f in set(os.listdir(tempfile.gettempdir())) - before
            if f.startswith("tpp-calibration-")}
    assert not left


def test_streamed_calibration_refuses_bad_loaders_naming_the_problem():
    ann = models()["cnn5"]
    x = inputs(16)
    with pytest.raises(ValueError, match="loader yielded no batch"):
        calibrate_for_T(ann, [], T=2)
    with pytest.raises(ValueError, match="hold no samples"):
        calibrate_for_T(ann, [x[:0]], T=2)
    with pytest.raises(ValueError, match=r"batch 1 holds inputs of shape \(4, 1, 9, 9\), "
                                         r"batch 0 of shape \(16, 1, 8, 8\)"):
        calibrate_for_T(ann, [x, torch.rand(4, 1, 9, 9, dtype=torch.float64)], T=2)
    with pytest.raises(ValueError, match="cache_bytes=1000 is too small for one batch"):
        calibrate_for_T(ann, [x], T=2, cache_bytes=1000)
    with pytest.raises(ValueError, match="cache_bytes must be a positive integer"):
        calibrate_for_T(ann, [x], T=2, cache_bytes=0)
    with pytest.raises(ValueError, match="calibration inputs contain NaN"):
        calibrate_for_T(ann, [x, torch.full_like(x, float("nan"))], T=2)

    class Shrinking:  # yields fewer samples the second time it is iterated
        def __init__(self):
            self.passes = 0

        def __iter__(self):
            self.passes += 1
            return iter([x, x] if self.passes == 1 else [x])

    with pytest.raises(ValueError, match="yielded 16 samples on its second pass, 32 on its"):
        calibrate_for_T(ann, Shrinking(), T=2, max_samples=20)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.int64])
def test_chunk_store_gives_back_what_it_spilled(dtype):
    small = torch.arange(4).to(dtype)
    big = (torch.arange(24).reshape(2, 3, 4) * 3).to(dtype)
    store = ChunkStore((small.numel() + big.numel()) * big.element_size() - 1)
    try:
        kept, spilled = store.put(small), store.put(big.clone())
        assert store.in_memory == small.numel() * small.element_size()
        assert spilled.path is not None and store.spilled == big.numel() * big.element_size()
        assert torch.equal(store.get(kept), small) and torch.equal(store.get(spilled), big)
        assert store.get(spilled).dtype == dtype
        store.free(kept)
        store.free(spilled)
        store.free(spilled)  # idempotent
        assert store.in_memory == 0 and not os.listdir(store._dir)
    finally:
        store.close()


def test_stream_false_and_the_fisher_objective_take_the_in_memory_path():
    ann = models()["cnn5"]
    x = inputs(32)
    assert "cache" in calibrate_for_T(ann, [x], 2).settings
    assert "cache" not in calibrate_for_T(ann, [x], 2, stream=False).settings
    assert "cache" not in calibrate_for_T(ann, [x], 2, objective="fisher").settings
    assert "cache" not in calibrate_for_T(ann, [x], 2, refine="global").settings


def test_non_classifier_outputs_get_no_output_shift_when_streamed():
    ann = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1), nn.Flatten(0)).double()
    x = torch.randn(40, 4, dtype=torch.float64)
    streamed = calibrate_for_T(ann, [x], 2, batch_size=8)
    _assert_same(calibrate_for_T(ann, [x], 2, stream=False), streamed)
    assert streamed.output_shift is None
