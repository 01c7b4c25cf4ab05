"""The calibration for T and its fine-tuning across processes (``distributed=True`` under
torchrun): the streamed pass shared chunk by chunk with its statistics all-reduced, fine-tuning
with DistributedDataParallel on gloo (docs/distributed.md).

One torchrun launch (2 CPU processes, 20–40 s on a 2-core machine) runs ``WORKER``, which
computes on every rank both the shared result and the one-process result (``distributed=False``,
the same arithmetic in the same process) and reports the largest differences; the tests below
assert on that report.

Tolerances, all in float64 (unit roundoff u = 2^-53 ≈ 1.1e-16):

* Calibration: each rank holds the same chunks of ``batch_size`` samples a single process
  holds, so every activation is computed from the same operands in the same order; only the
  per-channel sums of the bias correction and the output correction add the chunks' sums in
  another order (the ranks' partial sums, then their all-reduce). Those are sums of <= 64 chunk
  sums of magnitude <= 10, off by at most 64·u·640 ≈ 5e-12 in the worst case; a threshold or a
  refitted weight moved by that much stays within 1e-10 (the search is a choice among grid
  points 1/64 of the maximum apart: a changed choice would move a threshold by >= 1e-3).
* Fine-tuning: the two ranks' batches of 8 together are the one-process run's batch of 16
  (DistributedSampler in order), and DDP averages the two ranks' mean-loss gradients, which is
  the gradient of the batch of 16 up to the rounding of the sums (relative <= 16·u per
  element). Adam's step lr·m/(sqrt(v)+eps) is scale-free in the gradient, so a relative error
  δ in a gradient moves a step by <= 2·δ·lr; over 9 steps at lr = 3e-3 the parameters (O(1))
  differ by about 9·2·16·u·3e-3 ≈ 1e-16 plus what the dynamics amplify — asserted at 1e-10, six
  orders above, and far below the change of one rounded count (which moves an output by a
  step s/T = O(0.1)). Measured: 0 to 6e-17.
* Every rank ends with bit-equal results: the all-reduced statistics and gradients are the same
  numbers on every rank, and every rank then computes the same thing.
"""

import json
import os
import textwrap

import pytest
import torch
from gpu_helpers import needs_cuda
from torchrun_helpers import torchrun

from tpp_plugin.calibration import calibrate_for_T
from tpp_plugin.calibration.finetune import finetune

pytest.importorskip("torch.distributed")

WORKER = textwrap.dedent('''
    import json, sys
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    from tpp_plugin.calibration import calibrate_for_T
    from tpp_plugin.calibration.finetune import finetune
    from tpp_plugin.distributed import init_distributed, shutdown_distributed, world

    # argv: output file, checkpoint file, device ('cpu': gloo; 'cuda': nccl, a GPU per rank)
    kind = sys.argv[3] if len(sys.argv) > 3 else "cpu"
    assert init_distributed(kind)
    rank, size = world()
    device = torch.device("cuda", torch.cuda.current_device()) if kind == "cuda" else "cpu"
    torch.manual_seed(0)
    ann = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.ReLU(),
                        nn.Flatten(), nn.Linear(6 * 4 * 4, 3)).double().eval()
    with torch.no_grad():
        ann[5].weight.mul_(30)  # logits far apart: a divergence fine-tuning can reduce
    x = torch.rand(64, 1, 8, 8, dtype=torch.float64)
    ann, x = ann.to(device), x.to(device)
    out = {"world_size": size, "backend": dist.get_backend()}

    def flat(result):
        parts = list(result.thresholds) + [s for s in result.output_scales or [] if s is not None]
        parts += [s for s in result.bias_shifts if s is not None]
        for w, b in (result.weights or {}).values():
            parts += [w] + ([] if b is None else [b])
        if result.output_shift is not None:
            parts.append(result.output_shift)
        return torch.cat([torch.as_tensor(p).reshape(-1).double() for p in parts])

    def same_on_every_rank(t):
        t = t.to(device)
        gathered = [torch.empty_like(t) for _ in range(size)]
        dist.all_gather(gathered, t)
        return all(torch.equal(g, gathered[0]) for g in gathered)

    # 1. the streamed calibration: 8 chunks of 8 samples, 4 per rank; subsets of the search
    # (max_values) and of the refit (max_rows) smaller than the data, so they are gathered
    kw = dict(batch_size=8, max_values=200, max_rows=60)
    batches = [x[i:i + 16] for i in range(0, 64, 16)]
    for T in (1, 4):
        shared = calibrate_for_T(ann, batches, T, **kw)
        alone = calibrate_for_T(ann, batches, T, distributed=False, **kw)
        a, b = flat(shared), flat(alone)
        out[f"calibration_T{T}"] = {
            "numel": a.numel(), "max_diff": float((a - b).abs().max()),
            "same_on_every_rank": same_on_every_rank(a),
            "samples": shared.settings["samples"]}

    # 2. fine-tuning with DDP: batches of 8 per rank == batches of 16 in one process
    y = torch.zeros(64, dtype=torch.long, device=device)
    ft = dict(epochs=3, lr=3e-3, holdout=0.25, seed=3)
    result = calibrate_for_T(ann, batches, 1, **kw)  # T = 1: far from the ANN, much to gain
    tuned = finetune(ann, result, DataLoader(TensorDataset(x, y), batch_size=8), **ft)
    alone = finetune(ann, result, DataLoader(TensorDataset(x, y), batch_size=16),
                     distributed=False, **ft)
    a, b = flat(tuned), flat(alone)
    out["finetune"] = {"max_diff": float((a - b).abs().max()),
                       "change": max(float((t - r).abs().max()) for t, r in
                                     zip(tuned.thresholds, result.thresholds)),
                       "same_on_every_rank": same_on_every_rank(a),
                       "record": tuned.settings["finetune"],
                       "record_alone": alone.settings["finetune"]}

    # 3. bernoulli counts (other draws on every rank) and a tensor of inputs: ranks still agree
    rb = calibrate_for_T(ann, batches, 2, count="bernoulli", **kw)
    tb = finetune(ann, rb, x, epochs=2, lr=1e-2, batch_size=8, seed=1)
    out["bernoulli_tensor"] = {"same_on_every_rank": same_on_every_rank(flat(tb)),
                               "record": tb.settings["finetune"]}

    # 4. an interrupted run resumes from rank 0's checkpoint to the uninterrupted result
    class Breaking(torch.utils.data.Dataset):
        def __init__(self, fail_at=None):
            self.fail_at, self.reads = fail_at, 0
        def __len__(self):
            return 64
        def __getitem__(self, i):
            self.reads += 1
            if self.reads == self.fail_at:
                raise KeyboardInterrupt
            return x[i]
    path = sys.argv[2]
    kb = dict(epochs=3, lr=1e-2, holdout=0.25, seed=5, checkpoint=path)
    whole = finetune(ann, rb, DataLoader(Breaking(), batch_size=8, shuffle=True),
                     **{**kb, "checkpoint": None})
    # per rank: 8 held-out reads for epoch 0, then per epoch 24 training and 8 held-out
    # reads: read 60 is in epoch 2's training pass
    try:
        finetune(ann, rb, DataLoader(Breaking(fail_at=60), batch_size=8, shuffle=True), **kb)
        out["interrupted"] = False
    except KeyboardInterrupt:
        out["interrupted"] = True
    resumed = finetune(ann, rb, DataLoader(Breaking(), batch_size=8, shuffle=True), **kb)
    out["resume"] = {"equal": torch.equal(flat(resumed), flat(whole)),
                     "record": resumed.settings["finetune"] == whole.settings["finetune"]}

    # 5. refusals, on every rank (nothing to refuse in a world of one)
    if size > 1:
        try:
            calibrate_for_T(ann, [x[rank * 32:(rank + 1) * 32]], 2, batch_size=8)
            out["different_batches"] = None
        except ValueError as e:
            out["different_batches"] = str(e)
        try:
            finetune(ann, result, [x[:32], x[32:]], epochs=1)
            out["list_loader"] = None
        except ValueError as e:
            out["list_loader"] = str(e)
    # one chunk for two ranks: every rank calibrates on it alone, to the same result
    few = calibrate_for_T(ann, [x[:8]], 2, batch_size=8)
    out["one_chunk"] = {
        "same_on_every_rank": same_on_every_rank(flat(few)),
        "equal_alone": torch.equal(
            flat(few), flat(calibrate_for_T(ann, [x[:8]], 2, batch_size=8, distributed=False)))}

    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(out, f)
    shutdown_distributed()
''')


def run_worker(tmp, device="cpu", nproc=2, timeout=240) -> dict:
    """What the torchrun worker reported (``nproc`` processes on ``device``)."""
    (tmp / "worker.py").write_text(WORKER)
    torchrun(["worker.py", str(tmp / "out.json"), str(tmp / "ft.pt"), device], tmp, nproc=nproc,
             timeout=timeout)
    with open(tmp / "out.json") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """What the torchrun worker (2 CPU processes, gloo) reported."""
    return run_worker(tmp_path_factory.mktemp("distributed_calibration"))


def check_calibration(report):
    for T in (1, 4):
        rec = report[f"calibration_T{T}"]
        assert rec["samples"] == 64  # every sample counted once, over all ranks
        assert rec["numel"] > 100  # thresholds, output steps, refitted weights and shifts
        assert rec["max_diff"] <= 1e-10, rec  # summation order only (module docstring)
        assert rec["same_on_every_rank"], rec


def check_finetuning(report):
    rec = report["finetune"]
    assert rec["change"] > 1e-3, rec  # fine-tuning changed something to compare
    assert rec["max_diff"] <= 1e-10, rec
    assert rec["same_on_every_rank"], rec
    mine, alone = rec["record"], rec["record_alone"]
    assert mine["processes"] == report["world_size"] and alone["processes"] == 1
    assert mine["epoch"] == alone["epoch"] > 0
    assert mine["held_out"] == alone["held_out"] == 16  # every held-out sample scored once
    assert mine["samples"] == alone["samples"] == 48
    for h_mine, h_alone in zip(mine["holdout"], alone["holdout"], strict=True):
        assert abs(h_mine - h_alone) <= 1e-10 * max(1.0, abs(h_alone))
    rec = report["bernoulli_tensor"]  # other draws on every rank, a tensor of inputs
    assert rec["same_on_every_rank"], rec
    assert report["interrupted"] is True
    assert report["resume"] == {"equal": True, "record": True}


def test_the_shared_calibration_is_one_process_calibration(report):
    assert report["world_size"] == 2 and report["backend"] == "gloo"
    check_calibration(report)


def test_ddp_finetuning_equals_one_process_with_the_ranks_batches_as_one(report):
    check_finetuning(report)
    rec = report["bernoulli_tensor"]["record"]
    # holdout 0.2 of 64: 13 held out, 51 trained on, padded to 2 × 26 by DistributedSampler
    assert rec["processes"] == 2 and rec["held_out"] == 13 and rec["samples"] == 52


def test_refusals_across_processes(report):
    assert "differ between the ranks" in report["different_batches"]
    assert "DataLoader over a map-style data set" in report["list_loader"]
    assert report["one_chunk"] == {"same_on_every_rank": True, "equal_alone": True}


@needs_cuda
def test_nccl_on_every_visible_gpu(tmp_path):
    """The same worker with nccl, one process per visible GPU (one GPU: a world of one, which
    still goes through DistributedDataParallel and nccl's collectives)."""
    size = torch.cuda.device_count()
    report = run_worker(tmp_path, "cuda", nproc=size, timeout=120)
    assert report["world_size"] == size and report["backend"] == "nccl"
    check_calibration(report)
    check_finetuning(report)


def test_a_torchrun_launch_without_a_process_group_is_refused(monkeypatch):
    """Under torchrun (WORLD_SIZE > 1) without init_process_group each process would do all the
    work alone: calibrate_for_T and finetune say so, unless told distributed=False."""
    from torch import nn
    ann = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    x = torch.randn(32, 4)
    result = calibrate_for_T(ann, [x], 2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(RuntimeError, match="no process group.*distributed=False"):
        calibrate_for_T(ann, [x], 2)
    with pytest.raises(RuntimeError, match="no process group.*distributed=False"):
        finetune(ann, result, x, epochs=1)
    alone = calibrate_for_T(ann, [x], 2, distributed=False)
    assert all(torch.equal(a, b) for a, b in zip(alone.thresholds, result.thresholds))
    assert finetune(ann, result, x, epochs=1, distributed=False).settings["finetune"][
        "processes"] == 1
    with pytest.raises(TypeError, match="distributed must be True or False"):
        calibrate_for_T(ann, [x], 2, distributed="yes")


if __name__ == "__main__":  # pragma: no cover
    pytest.main([os.path.abspath(__file__), "-q"])
