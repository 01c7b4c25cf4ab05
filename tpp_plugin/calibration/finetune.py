r"""Gradient fine-tuning of a calibrated network against the ANN (opt-in, after
:func:`~tpp_plugin.calibration.calibrate_for_T`).

The threshold search and the least-squares refit of :mod:`tpp_plugin.calibration` choose each
layer alone. :func:`finetune` then trains the whole quantised network — the weights and biases
of its conv/linear/batch-norm layers and every neuron's threshold ``θ`` and output step ``s`` —
to reproduce the ANN's output on the calibration inputs (knowledge distillation: the KL
divergence of its softmax from the ANN's; the squared error for outputs without a class
dimension). The forward pass is the TPP network's own: each ReLU output is the neuron's count
``n`` (rounded for ``'exact'``, drawn from the rule's two-point distribution for
``'bernoulli'``/``'unbiased'``) times ``s/T``; gradients pass the rounding straight through
inside ``[0, θ]``. Optionally, as in QDrop (Wei et al., ICLR 2022), each activation keeps its
unrounded value ``s·clamp(aT/θ, 0, T)/T`` with probability ``drop`` during training. It is off by
default: on a whole training set (Fashion-MNIST, 48 000 images) plain straight-through training
ended ahead of it in every comparison measured (cnn5 and vgg; docs/results.md).

The more images, the better it generalises: from 2 048 images it helps an MLP much and
convolutional networks little; from the whole training set every model measured gained several
points at T ≤ 2. Pass the training loader to :func:`~tpp_plugin.calibration.calibrate_for_T`
(the threshold search still reads only its ``max_samples``).

A share ``holdout`` of the calibration inputs is kept out of training; after every epoch the
network is scored on it (its mean quantiser: the rounding, or the random rule's mean count), and
the parameters of the best epoch are kept — epoch 0, the calibration as it was, included, so
fine-tuning never leaves a worse held-out divergence than it started from.

The result is an ordinary :class:`~tpp_plugin.calibration.CalibrationResult` (thresholds,
output steps, and the tuned layers in ``weights``), so every converter takes it unchanged and
the oracle still holds: exact-count TPP with it equals
:func:`~tpp_plugin.calibration.quantised_ann`.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

from .. import functional as F
from ..convert import eval_mode
from ..distributed import all_reduce_sum, rank_seed, sharing_group, world_of
from .checks import check_finetune_inputs
from .finetune_data import LoaderSplit, load_checkpoint, save_checkpoint
from .graph import bias_shift_targets
from .passes import kl_divergence, run_batched
from .quantiser import Probe, channel_view, quantised_ann, random_count_mean

__all__ = ["check_finetune_args", "finetune", "output_distance"]

_TUNED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d,
          nn.BatchNorm3d)


class _TrainableNeuron(nn.Module):
    """A calibrated ReLU call with trainable threshold and output step (see the module
    docstring); ``drop > 0`` and ``sample`` are set while training."""

    def __init__(self, theta, scale, T: int, count: str, channel_dim: int, dtype):
        super().__init__()
        self.theta = nn.Parameter(torch.as_tensor(theta).detach().to(dtype).clone())
        # a threshold driven to 0 turns 0·T/θ into NaN, and converters need positive output
        # steps: keep both above a 1000th of where they started
        self.register_buffer("theta_floor", self.theta.detach() * 1e-3, persistent=False)
        self.scale = nn.Parameter(torch.as_tensor(scale).detach().to(dtype).clone())
        self.register_buffer("scale_floor", (self.scale.detach() * 1e-3).clamp(
            min=torch.finfo(dtype).tiny), persistent=False)
        self.T, self.count, self.channel_dim = T, count, channel_dim
        self.drop = 0.0
        self.sample = False
        self.generator: torch.Generator | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x * (self.T / channel_view(self.theta, x, self.channel_dim))
        clamped = w.clamp(0, self.T)
        with torch.no_grad():
            if self.count == "exact":
                level = F.tpp_count(w, self.T, 1.0, "exact")
            elif not self.sample:
                level = random_count_mean(w, self.T, self.count, dtype=w.dtype)
            elif self.count == "bernoulli":
                level = F.tpp_count_two_point(w, self.T, 1.0, generator=self.generator)
            else:
                level = F.tpp_count(w, self.T, 1.0, "unbiased", self.generator,
                                    draw_steps=False)
        level = clamped + (level - clamped).detach()  # straight through inside [0, T]
        if self.drop > 0:
            keep = torch.rand(w.shape, generator=self.generator, device=w.device) < self.drop
            level = torch.where(keep, clamped, level)
        return level * (channel_view(self.scale, x, self.channel_dim) / self.T)


def output_distance(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """KL(softmax(ref) ‖ softmax(out)) over dim 1, averaged over samples; the mean squared
    error for outputs without a class dimension."""
    if out.dim() < 2:
        return (out - ref).pow(2).mean()
    return kl_divergence(torch.log_softmax(ref, 1), out)


def check_finetune_args(epochs, lr, drop, holdout, prefix: str = "finetune_") -> None:
    """Refuse bad fine-tuning settings, naming the argument (``prefix`` + its name in
    :func:`finetune`: ``finetune_epochs`` is the option of ``calibrate_for_T``)."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"{prefix}epochs must be a non-negative integer, got {epochs!r}")
    if (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr)
            or lr <= 0):
        raise ValueError(f"{prefix}lr must be a positive number, got {lr!r}")
    for name, value in ((f"{prefix}drop", drop), (f"{prefix}holdout", holdout)):
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or not 0 <= value < 1):
            raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")


@torch.enable_grad()  # also inside calibrate_for_T, which runs without gradients
def finetune(ann: nn.Module, result, x, epochs: int, lr: float = 1e-3,
             drop: float = 0.0, holdout: float = 0.2, batch_size: int = 128, seed: int = 0,
             holdout_loader=None, checkpoint: str | None = None, distributed: bool = True):
    r"""Fine-tune a calibration against the ANN's outputs (see the module docstring).

    Adam with learning rate ``lr`` for the layers and the neurons alike, cosine-annealed to 0
    over ``epochs`` epochs of mini-batches of ``batch_size`` inputs. Deterministic for fixed
    inputs and ``seed`` (on the CPU).

    :param ann: the ANN that was calibrated (not modified)
    :param result: its :class:`~tpp_plugin.calibration.CalibrationResult`
    :param x: the training inputs: one tensor ``[N, *]`` (in memory, shuffled into
        mini-batches of ``batch_size`` every epoch), or a loader (a ``DataLoader`` or any
        re-iterable of batches or ``(inputs, labels)``), read batch by batch every epoch —
        memory flat in the data set's size, its batches the training steps, the ANN's outputs
        computed batch by batch (:mod:`.finetune_data`: the held-out share of a loader)
    :param epochs: passes over the training share of ``x`` (``0``: ``result`` unchanged)
    :param lr: Adam's learning rate
    :param drop: the probability that an activation keeps its unrounded value in training
        (``0 ≤ drop < 1``; QDrop, off by default)
    :param holdout: the share of ``x`` (chosen with ``seed``) held out to pick the epoch
        (``0``: keep the last epoch)
    :param batch_size: inputs per training step
    :param seed: seed of the split, the batch order, the dropped activations and the random
        counts
    :param holdout_loader: with a loader ``x``, a separate loader of held-out inputs (then
        ``holdout`` is not used and all of ``x`` trains)
    :param checkpoint: a file: after every epoch the training state (parameters, Adam's and the
        schedule's state, the random generator, the held-out record) is written there, and a
        fine-tuning that finds it resumes after its epoch (a finished one just returns its
        result); a loader's own shuffling is not part of it. Across processes rank 0 writes it
        (with every rank's random generator) and every rank reads it: a path all ranks see
    :param distributed: ``True`` (default): under ``torchrun`` (a default process group of
        ``torch.distributed``) train with ``DistributedDataParallel`` — ``gloo`` on the CPU,
        ``nccl`` on GPUs — each rank on its shard of ``x`` (a ``DataLoader`` over a map-style
        data set, or one tensor, the same on every rank; :mod:`.finetune_data`), ``batch_size``
        and a loader's batches per rank, the held-out share chosen on the whole data set and
        scored over every rank's part of it; every rank returns the same result, that of one
        process with the ranks' batches as one up to float summation order (docs/distributed.md).
        ``False``: every process fine-tunes on its own. Without a process group one process
        does everything either way; a ``torchrun`` launch of several processes without one is an
        error (``RuntimeError``)
    :return: a new :class:`~tpp_plugin.calibration.CalibrationResult`; its
        ``settings['finetune']`` records the held-out divergence after every epoch
        (``'holdout'``, epoch 0 first) and the epoch kept (``'epoch'``); its ``layers`` (the
        statistics :func:`~tpp_plugin.calibration.calibration_report` shows) still describe the
        calibration before fine-tuning

    Example::

        >>> from tpp_plugin.calibration import calibrate_for_T
        >>> ann = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
        >>> x = torch.randn(256, 4)
        >>> result = calibrate_for_T(ann, [x], T=1)
        >>> tuned = finetune(ann, result, x, epochs=4)
        >>> h = tuned.settings['finetune']['holdout']
        >>> len(h), h[tuned.settings['finetune']['epoch']] <= h[0]
        (5, True)
    """
    check_finetune_args(epochs, lr, drop, holdout, prefix="")
    if not isinstance(distributed, bool):
        raise TypeError(f"distributed must be True or False, got {distributed!r}")
    check_finetune_inputs(ann, result, x, batch_size, seed)
    group = sharing_group(distributed)
    rank, size = world_of(group)
    if epochs == 0:
        return result
    model = quantised_ann(ann, result, result.T)
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    tensor = isinstance(x, torch.Tensor)
    device = param.device if param is not None else x.device if tensor else torch.device("cpu")
    # the random counts and dropped activations: other numbers on every rank
    gen = torch.Generator(device=device).manual_seed(rank_seed(seed, rank))
    neurons, tuned, params = _make_trainable(model, result, dtype, gen)
    if tensor and holdout_loader is not None:
        raise ValueError("holdout_loader goes with a loader of training inputs, not a tensor")
    if tensor and size > 1:  # shuffled into each rank's shard by a DistributedSampler
        x = DataLoader(TensorDataset(x), batch_size=batch_size, shuffle=True)
        tensor = False
    if tensor:
        data = _TensorData(ann, x.to(dtype=dtype, device=device), holdout, seed, batch_size,
                           gen)
    else:
        split = LoaderSplit(x, holdout, seed, holdout_loader, group)
        data = _LoaderData(ann, split, device, dtype, group)
    history, best = _train(model, neurons, params, data, epochs, lr, drop, gen, checkpoint,
                           group)
    record = {"epochs": epochs, "lr": lr, "drop": drop, "holdout": history, "epoch": best,
              "samples": data.n_train, "held_out": data.n_hold, "processes": size}
    settings = {**result.settings, "finetune": record}
    if best == 0:
        return dataclasses.replace(result, settings=settings)
    return _tuned_result(result, settings, tuned, neurons)


def _make_trainable(model: nn.Module, result, dtype, gen: torch.Generator) -> tuple:
    """Turn the quantised ANN ``model`` (in place) into the network fine-tuning trains: each
    probe replaced by a :class:`_TrainableNeuron` drawing from ``gen``, a bias for each
    conv/linear layer without one, gradients only for the tuned parameters.

    :return: ``(neurons, tuned, params)``: the neurons in graph order, the tuned layers by
        name, and the parameters to train
    """
    T, count = result.T, result.settings.get("count", "exact")
    probes = sorted(((m.index, name, m) for name, m in model.named_children()
                     if isinstance(m, Probe)), key=lambda t: t[0])
    neurons = []
    for _, name, probe in probes:
        scale = probe.theta if probe.scale is None else probe.scale
        neuron = _TrainableNeuron(probe.theta, scale, T, count, result.channel_dim, dtype)
        neuron.generator = gen
        setattr(model, name, neuron)
        neurons.append(neuron)
    tuned = {name: m for name, m in model.named_modules()
             if isinstance(m, _TUNED) and getattr(m, "weight", None) is not None}
    for m in tuned.values():
        if m.bias is None and not isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.bias = nn.Parameter(torch.zeros(m.weight.shape[0], dtype=dtype,
                                              device=m.weight.device))
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for m in tuned.values() for p in (m.weight, m.bias) if p is not None]
    params += [p for n in neurons for p in (n.theta, n.scale)]
    for p in params:
        p.requires_grad_(True)
    return neurons, tuned, params


def _split(x: torch.Tensor, holdout: float, seed: int) -> tuple:
    """``(x_hold, x_train)``: a share ``holdout`` of ``x``, chosen with ``seed``, held out
    (at least one sample left to train on), and the rest."""
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    n_hold = int(round(holdout * x.shape[0]))
    n_hold = min(n_hold, x.shape[0] - 1)
    return x[order[:n_hold]], x[order[n_hold:]]


class _TensorData:
    """Fine-tuning's data as one tensor: a held-out share (chosen with ``seed``) and the rest,
    the ANN's outputs of all of them computed once, the training share shuffled (with
    ``gen``) into mini-batches every epoch."""

    def __init__(self, ann, x, holdout, seed, batch_size, gen):
        self.x_hold, self.x_train = _split(x, holdout, seed)
        with torch.no_grad(), eval_mode(ann):  # the reference: no BatchNorm update, no dropout
            self.ref_hold = run_batched(ann, self.x_hold, 256) if len(self.x_hold) else None
            self.ref_train = run_batched(ann, self.x_train, 256)
        self.batch_size, self.gen = batch_size, gen
        self.n_train, self.n_hold = len(self.x_train), len(self.x_hold)
        self.steps = math.ceil(self.n_train / batch_size)

    def epoch(self, epoch: int = 0):
        """``(inputs, the ANN's outputs)`` of every training step of one epoch."""
        perm = torch.randperm(self.n_train, generator=self.gen, device=self.x_train.device)
        for i in range(0, self.n_train, self.batch_size):
            idx = perm[i:i + self.batch_size]
            yield self.x_train[idx], self.ref_train[idx]

    def held_out(self, model) -> float:
        """``model``'s divergence from the ANN on the held-out share (NaN without one)."""
        if not self.n_hold:
            return math.nan
        with torch.no_grad():
            return float(output_distance(run_batched(model, self.x_hold, 256), self.ref_hold))


class _LoaderData:
    """Fine-tuning's data from a loader (:class:`~.finetune_data.LoaderSplit`), batch by
    batch on ``device``, the ANN's outputs computed per batch; the counts and the held-out
    divergence summed over the ranks of ``group``."""

    def __init__(self, ann, split, device, dtype, group=None):
        self.ann, self.split, self.device, self.dtype = ann, split, device, dtype
        self.group = group
        self.steps = split.steps
        self.n_train = self.n_hold = 0

    def _with_reference(self, batches):
        for x in batches:
            x = x.to(device=self.device, dtype=self.dtype)
            with torch.no_grad(), eval_mode(self.ann):
                ref = self.ann(x)
            yield x, ref

    def epoch(self, epoch: int = 0):
        n = 0
        for x, ref in self._with_reference(self.split.training_batches(epoch)):
            n += x.shape[0]
            yield x, ref
        self.n_train = (n if self.group is None
                        else int(all_reduce_sum([n], self.group, torch.int64)[0]))

    def held_out(self, model) -> float:
        """The divergence over every held-out sample (per-sample KL divergences summed, then
        divided by their number; the squared error per element without a class dimension)."""
        if not self.split.has_held_out:
            return math.nan
        total, count, n = 0.0, 0, 0
        with torch.no_grad():
            for x, ref in self._with_reference(self.split.held_out_batches()):
                out = model(x)
                size = x.shape[0] if out.dim() >= 2 else out.numel()
                total += float(output_distance(out, ref)) * size
                count += size
                n += x.shape[0]
        if self.split.sharded_hold:
            total, count, n = all_reduce_sum([total, count, n], self.group).tolist()
        self.n_hold = int(n)
        return total / count if count else math.nan


def _train(model, neurons, params, data, epochs, lr, drop, gen, checkpoint=None,
           group=None) -> tuple:
    """Train ``params`` of ``model`` for ``epochs`` epochs on ``data`` (a :class:`_TensorData`
    or :class:`_LoaderData`); after each, score it on the held-out share and keep the best
    epoch's parameters (the last without held-out inputs). With ``checkpoint``, the state is
    written there after every epoch, and read back first if the file exists (resuming). With
    a process group of several ranks, ``model`` trains inside ``DistributedDataParallel``
    (the gradients averaged over the ranks, so every rank takes the same steps).

    :return: ``(history, best)``: the held-out divergence after every epoch (epoch 0 first)
        and the epoch kept, whose parameters ``params`` now hold
    """
    def snapshot():
        return [p.detach().clone() for p in params]

    rank, size = world_of(group)
    forward = model
    if size > 1:
        device = params[0].device
        forward = DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None,
            broadcast_buffers=False, process_group=group)
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * data.steps)
    state = load_checkpoint(checkpoint, params, epochs)
    if state is None:
        history, best, best_state, start = [data.held_out(model)], 0, snapshot(), 1
    else:
        with torch.no_grad():
            for p, value in zip(params, state["params"]):
                p.copy_(value)
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        gen.set_state(_rank_generator_state(state, rank, size, checkpoint))
        history, best, start = state["history"], state["best"], state["epoch"] + 1
        best_state = [t.to(p.device) for t, p in zip(state["best_state"], params)]
        data.n_train, data.n_hold = state["samples"]
    for epoch in range(start, epochs + 1):
        for n in neurons:
            n.drop, n.sample = drop, True
        for x, ref in data.epoch(epoch):
            loss = output_distance(forward(x), ref)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                for n in neurons:
                    torch.maximum(n.theta, n.theta_floor, out=n.theta)
                    torch.maximum(n.scale, n.scale_floor, out=n.scale)
        for n in neurons:
            n.drop, n.sample = 0.0, False
        history.append(data.held_out(model))
        if not data.n_hold or history[-1] < history[best]:
            best, best_state = epoch, snapshot()
        if checkpoint is not None:
            generators = _generator_states(gen, group)
            if rank == 0:
                save_checkpoint(checkpoint, {
                    "epoch": epoch, "epochs": epochs,
                    "params": [p.detach().cpu() for p in params], "opt": opt.state_dict(),
                    "sched": sched.state_dict(), "gen": generators, "processes": size,
                    "history": history, "best": best, "samples": (data.n_train, data.n_hold),
                    "best_state": [t.cpu() for t in best_state]})
            if size > 1:
                dist.barrier(group=group)  # the file is whole before any rank goes on
    with torch.no_grad():
        for p, value in zip(params, best_state):
            p.copy_(value)
    return history, best


def _generator_states(gen: torch.Generator, group=None):
    """``gen``'s state, or across processes the list of every rank's (for the checkpoint)."""
    if world_of(group)[1] == 1:
        return gen.get_state()
    states = [None] * world_of(group)[1]
    dist.all_gather_object(states, gen.get_state(), group=group)
    return states


def _rank_generator_state(state: dict, rank: int, size: int, checkpoint: str):
    """This rank's generator state from a checkpoint; a ``ValueError`` if it was written by
    another number of processes."""
    if state.get("processes", 1) != size:
        raise ValueError(f"the checkpoint {checkpoint!r} was written by "
                         f"{state.get('processes', 1)} processes, not {size}: resume with as many "
                         "processes, or delete it")
    return state["gen"][rank] if size > 1 else state["gen"]


def _tuned_result(result, settings: dict, tuned: dict, neurons: list):
    """``result`` with the tuned layers (their biases less the bias shifts that
    :func:`~.graph.apply_bias_shifts` adds back), thresholds and output steps."""
    shifts = {}  # what apply_bias_shifts will add back to each bias
    for name, shift in bias_shift_targets(result):
        shifts[name] = shifts.get(name, 0) + shift.detach().cpu()
    weights = {}
    for name, m in tuned.items():
        bias = None if m.bias is None else m.bias.detach().cpu() - shifts.get(name, 0)
        weights[name] = (m.weight.detach().cpu().clone(), bias)
    ref_dtype = result.thresholds[0].dtype
    return dataclasses.replace(
        result, settings=settings, weights=weights,
        thresholds=[n.theta.detach().cpu().to(ref_dtype).clone() for n in neurons],
        output_scales=[n.scale.detach().cpu().to(ref_dtype).clone() for n in neurons])
