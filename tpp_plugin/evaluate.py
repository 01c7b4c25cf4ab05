r"""Evaluation of converted networks across processes and GPUs, on ``torch.distributed``.

Launch any script (or ``python -m tpp_plugin reproduce``) with ``torchrun``; each process
evaluates its own shard of the test set and the counts are summed::

    torchrun --nproc_per_node 4 my_eval.py                 # one machine, 4 GPUs (or 4 CPU ranks)

    # my_eval.py
    import tpp_plugin
    from tpp_plugin.evaluate import init_distributed
    init_distributed()                                     # gloo on CPU, nccl on GPUs
    result = tpp_plugin.evaluate(snn, test_set, T=8, seed=0, stats=True)
    if result['rank'] == 0:
        print(result['accuracy'], result['images'])        # over the whole test set
    shutdown_distributed()

The pieces, each usable on its own:

* :func:`init_distributed` — the default process group from ``torchrun``'s environment
  (``gloo`` on CPU, ``nccl`` with CUDA, one GPU per local rank);
* :class:`ShardSampler` — PyTorch's ``DistributedSampler`` without its padding: every image is
  evaluated exactly once, whether or not the world size divides the test set;
* :func:`rank_seed` / :func:`reseed` — per-rank seeds derived from the user's seed (rank 0 keeps
  it), so a run is reproducible for a given world size;
* :func:`calibrate_thresholds` — threshold calibration whose per-batch statistics are computed on
  the rank that holds the batch and all-reduced, so every rank applies the same moving average
  to the same numbers and builds the same thresholds;
* :func:`calibrate_observers` / :func:`shared_calibration` — the same for SpikingJelly 2.x
  recipes: their calibration stage with the batches shared among the ranks;
* :func:`sync_thresholds` — broadcast rank 0's thresholds of a converted network (after a
  converter calibrated on every rank) and report how far the ranks were apart;
* :func:`evaluate` — accuracy (and :func:`tpp_plugin.spike_stats`) of a converted network over
  a data set, full simulation or count mode, all-reduced.

Without ``torchrun`` (no process group) everything runs in one process, unchanged.
"""

from __future__ import annotations

import contextlib
import itertools
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

from . import convert as _convert

__all__ = [
    "init_distributed",
    "shutdown_distributed",
    "check_process_group",
    "world",
    "ShardSampler",
    "shard_indices",
    "all_reduce_sum",
    "barrier",
    "broadcast_module",
    "rank_seed",
    "calibrate_thresholds",
    "calibrate_observers",
    "shared_calibration",
    "sync_thresholds",
    "evaluate",
]


# ------------------------------------------------------------------------------------------------
# the process group
# ------------------------------------------------------------------------------------------------
def _launched_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def init_distributed(device: str | torch.device | None = None) -> bool:
    """Initialise the default process group from ``torchrun``'s environment, if launched by it.

    Backend: ``nccl`` when ``device`` is CUDA (default: CUDA if available), each process on GPU
    ``LOCAL_RANK``; ``gloo`` on the CPU. Does nothing when the group already exists or when the
    process was not started by ``torchrun`` (no ``WORLD_SIZE`` in the environment).

    :param device: the device the evaluation runs on
    :return: whether a process group is active
    """
    if dist.is_available() and dist.is_initialized():
        return True
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return False
    if not dist.is_available():
        raise RuntimeError("this PyTorch build has no torch.distributed: run without torchrun")
    cuda = (torch.device(device).type == "cuda" if device is not None
            else torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return True


def shutdown_distributed() -> None:
    """Wait for every rank, then destroy the default process group (if there is one), as
    PyTorch's distributed examples end; a rank that exits while others still use the group can
    abort in the backend's teardown."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def check_process_group() -> None:
    """Raise ``RuntimeError`` if the process was launched by ``torchrun`` with several processes
    but no process group exists (each process would evaluate the whole data set)."""
    launched = _launched_world_size()
    if launched > 1 and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"launched by torchrun with WORLD_SIZE={launched}, but torch.distributed has no "
            "process group: call tpp_plugin.evaluate.init_distributed() (or "
            "torch.distributed.init_process_group) first, or every process evaluates the whole "
            "data set"
        )


def world(group=None) -> tuple[int, int]:
    """``(rank, world_size)`` in ``group``; ``(0, 1)`` without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def _reduce_device(group=None) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values, group=None, dtype=torch.float64) -> torch.Tensor:
    """Sum ``values`` (a tensor or a list of numbers) over the ranks; a copy, on the CPU.
    Without a process group the values are returned as they are."""
    t = torch.as_tensor(values, dtype=dtype).detach().clone()
    if world(group)[1] == 1:
        return t.cpu()
    t = t.to(_reduce_device(group))
    dist.all_reduce(t, group=group)
    return t.cpu()


def barrier(group=None) -> None:
    """``torch.distributed.barrier`` when a process group exists (a no-op otherwise)."""
    if world(group)[1] > 1:
        dist.barrier(group=group)


@torch.no_grad()
def broadcast_module(module: nn.Module, group=None) -> nn.Module:
    """Copy rank 0's parameters and buffers into every rank's ``module`` (in place), e.g. an
    ANN trained on every rank, which GPUs need not train bit for bit alike."""
    if world(group)[1] == 1:
        return module
    device = _reduce_device(group)
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        staged = tensor.detach().to(device).clone()
        dist.broadcast(staged, src=0, group=group)
        tensor.copy_(staged.to(tensor.device))
    return module


# ------------------------------------------------------------------------------------------------
# sharding and seeds
# ------------------------------------------------------------------------------------------------
class ShardSampler(DistributedSampler):
    """``DistributedSampler`` (in order, ``drop_last=False``) without the padding.

    ``DistributedSampler`` pads the index list by repeating its head until the world size
    divides it, and rank ``r`` takes positions ``r, r + W, …``: the padded positions are the last
    ones of some ranks. This sampler stops each rank before them, so rank ``r`` gets the
    ``len(range(r, N, W))`` indices ``r, r + W, …`` below ``N``: over all ranks every index
    exactly once.

    :param dataset: anything with ``len``
    :param num_replicas: world size (default: the process group's)
    :param rank: this rank (default: the process group's)
    :raises ValueError: if the world size is larger than the data set (a rank would get nothing)
    """

    def __init__(self, dataset, num_replicas: int | None = None, rank: int | None = None):
        super().__init__(dataset, num_replicas, rank, shuffle=False, drop_last=False)
        n = len(dataset)
        if self.num_replicas > n:
            raise ValueError(
                f"world size {self.num_replicas} is larger than the test set ({n} images): "
                f"run with at most {n} processes"
            )
        self.num_real = len(range(self.rank, n, self.num_replicas))

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.num_real)

    def __len__(self) -> int:
        return self.num_real


def shard_indices(n: int, group=None) -> torch.Tensor:
    """This rank's indices of a data set of ``n`` items (:class:`ShardSampler`), as a tensor."""
    rank, size = world(group)
    return torch.tensor(list(ShardSampler(range(n), size, rank)), dtype=torch.long)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of ``rank`` derived from the user's ``seed``: ``seed`` itself on rank 0 (a
    one-process run is unchanged), else a 62-bit number drawn from ``seed`` (the ``rank``-th
    draw of a generator seeded with it)."""
    if rank == 0:
        return int(seed)
    draws = torch.randint(2**62, (rank,), generator=torch.Generator().manual_seed(int(seed)))
    return int(draws[-1])


# ------------------------------------------------------------------------------------------------
# thresholds
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def calibrate_thresholds(model: nn.Module, batches, modules: list, mode="max",
                         momentum: float = 0.1, group=None) -> list[float]:
    """:func:`tpp_plugin.convert.calibrate_thresholds` with the batches shared among the ranks.

    Batch ``b`` of ``batches`` (a sequence: every rank holds the same list, e.g. of the
    calibration images) is run on rank ``b mod W`` only; its per-module statistic (max or
    percentile, :func:`~tpp_plugin.convert.activation_statistic`) is all-reduced — the other
    ranks contribute zeros, so every rank receives the exact numbers — and every rank then
    applies the moving average in batch order, exactly as one process does. The thresholds are
    therefore the same on every rank, and equal to the one-process result.

    :return: one threshold per module
    """
    mode = _convert.check_calibration_mode(mode)
    batches = list(batches)
    if not batches:
        raise ValueError("no calibration batch: cannot calibrate thresholds")
    rank, size = world(group)
    stats = torch.zeros(len(batches), len(modules), dtype=torch.float64)
    current: dict = {}
    handles = [m.register_forward_hook(
        lambda mod, args, out, i=i: current.__setitem__(i, _convert.activation_statistic(
            out, mode))) for i, m in enumerate(modules)]
    device = next(model.parameters(), torch.empty(0)).device
    with _convert.eval_mode(model):
        try:
            for b in range(rank, len(batches), size):
                current.clear()
                model(_convert.batch_inputs(batches[b]).to(device))
                for i in range(len(modules)):
                    stats[b, i] = float(current[i])
        finally:
            for h in handles:
                h.remove()
    stats = all_reduce_sum(stats, group)
    thresholds = []
    for i in range(len(modules)):
        ema = None
        for b in range(len(batches)):  # the moving average, in float32 like the one-process rule
            s = stats[b, i].float()
            ema = s if ema is None else (1 - momentum) * ema + momentum * s
        thresholds.append(float(ema))
    for i, th in enumerate(thresholds):
        if not th > 0:
            raise ValueError(
                f"activation {i} never became positive during calibration (threshold {th}); "
                "use more calibration data or a different mode"
            )
    return thresholds


def _observers(model: nn.Module) -> list[nn.Module]:
    """Calibration observers of a graph being converted: SpikingJelly's ``VoltageHook`` /
    ``ChannelVoltageHook`` (a ``scale`` buffer, a ``momentum`` and a ``num_batches_tracked``
    count whose 0 means "take this batch's statistic as it is")."""
    return [m for m in model.modules() if "scale" in m._buffers
            and hasattr(m, "momentum") and hasattr(m, "num_batches_tracked")]


@torch.no_grad()
def calibrate_observers(model: nn.Module, batches, device=None, group=None) -> nn.Module:
    """Run SpikingJelly's calibration observers over ``batches``, sharing the batches among the
    ranks (in place; returns ``model``).

    Batch ``b`` runs on rank ``b mod W`` only, with each observer reset before it, so the
    observer's ``scale`` is that batch's statistic, computed by SpikingJelly's own code. The
    per-batch statistics are all-reduced (other ranks add zeros: the numbers arrive exactly),
    and every rank then applies the observers' moving average in batch order, with their
    expression, ``(1 − momentum)·scale + momentum·s_b``: the same scales on every rank, equal to
    a one-process calibration over the same batches.

    :param model: the traced graph with observers (``fx_model`` of a recipe's ``calibrate``)
    :param batches: a sequence of batches (tensors or ``(x, y)``), the same on every rank
    :param device: device of the inputs (default: the model's)
    """
    observers = _observers(model)
    batches = list(batches)
    if device is None:
        device = next(model.parameters(), torch.empty(0)).device
    if not observers or not batches:
        for batch in batches:
            model(_convert.batch_inputs(batch).to(device))
        return model
    rank, size = world(group)
    mine = list(range(rank, len(batches), size)) or [0]  # a rank without a batch learns shapes
    stats: dict = {}
    for b in mine:
        for obs in observers:
            obs.num_batches_tracked = 0
        model(_convert.batch_inputs(batches[b]).to(device))
        if b % size == rank:
            stats[b] = [obs.scale.detach().clone() for obs in observers]
    template = next(iter(stats.values()), None) or [obs.scale.detach() for obs in observers]
    widths = [t.numel() for t in template]
    table = torch.zeros(len(batches), sum(widths), dtype=torch.float64)
    for b, values in stats.items():
        table[b] = torch.cat([v.double().reshape(-1).cpu() for v in values])
    table = all_reduce_sum(table, group)
    offsets = [sum(widths[:i]) for i in range(len(widths))]
    for obs, ref, start, width in zip(observers, template, offsets, widths):
        ema = None
        for b in range(len(batches)):
            s = table[b, start:start + width].to(ref.dtype).view(ref.shape).to(ref.device)
            ema = s if ema is None else (1 - obs.momentum) * ema + obs.momentum * s
        obs.scale = ema
        obs.num_batches_tracked = sum(len(_convert.batch_inputs(b)) for b in batches)
    return model


def shared_calibration(recipe_class: type) -> type:
    """A subclass of a SpikingJelly 2.x recipe (e.g. ``ann2snn.RateCodingRecipe``) whose
    ``calibrate`` stage is :func:`calibrate_observers`: its calibration batches are shared among
    the ranks and the statistics all-reduced. In one process it calibrates exactly like the
    recipe itself.

    Example::

        Recipe = shared_calibration(ann2snn.RateCodingRecipe)
        snn = ann2snn.Converter(Recipe(calibration_batches, mode='99.9%')).convert(ann)
    """

    class SharedCalibration(recipe_class):
        def calibrate(self, converter, fx_model):
            return calibrate_observers(fx_model, self.dataloader, converter.device)

    SharedCalibration.__name__ = SharedCalibration.__qualname__ = f"Shared{recipe_class.__name__}"
    return SharedCalibration


def _threshold_tensors(net: nn.Module) -> list[torch.Tensor]:
    """Every threshold-like tensor of a converted network, in module order: SpikingJelly
    ``VoltageScaler.scale`` and neuron ``v_threshold``; snnTorch ``threshold`` and
    ``graded_spikes_factor``."""
    found = []
    for module in net.modules():
        for name in ("scale", "v_threshold", "threshold", "graded_spikes_factor"):
            value = module.__dict__.get(name, None)
            if value is None:
                value = module._buffers.get(name) if name in module._buffers else None
            if value is None:
                value = module._parameters.get(name) if name in module._parameters else None
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                found.append((module, name, value))
            elif isinstance(value, float):
                found.append((module, name, torch.tensor(value, dtype=torch.float64)))
    return found


@torch.no_grad()
def sync_thresholds(net: nn.Module, group=None) -> float:
    """Broadcast rank 0's thresholds of a converted network to every rank (in place).

    Use it after a converter that calibrates on its own (SpikingJelly's recipes) has run on every
    rank with the same calibration batches: the ranks then agree already (the result is
    deterministic), and this makes sure of it on hardware that is not.

    :return: the largest absolute difference between a rank's threshold and rank 0's, before
        the broadcast (``0.0`` when they agreed, and without a process group)
    """
    entries = _threshold_tensors(net)
    if world(group)[1] == 1 or not entries:
        return 0.0
    device = _reduce_device(group)
    flat = torch.cat([v.detach().double().reshape(-1).to(device) for _, _, v in entries])
    mine = flat.clone()
    dist.broadcast(flat, src=0, group=group)
    gap = (mine - flat).abs().max().reshape(1)
    dist.all_reduce(gap, op=dist.ReduceOp.MAX, group=group)
    offset = 0
    for module, name, value in entries:
        part = flat[offset:offset + value.numel()].view(value.shape)
        offset += value.numel()
        if isinstance(module.__dict__.get(name), float):
            setattr(module, name, float(part))
        else:
            value.copy_(part.to(value.device, value.dtype))
    return float(gap)


# ------------------------------------------------------------------------------------------------
# evaluation
# ------------------------------------------------------------------------------------------------
def _is_batch_list(data) -> bool:
    """A list or tuple of ``(x, y)`` batches: every item a pair of tensors whose labels ``y``
    have a batch dimension (a data set's samples carry one label each)."""
    return isinstance(data, (list, tuple)) and len(data) > 0 and all(
        isinstance(b, (list, tuple)) and len(b) == 2
        and all(isinstance(t, torch.Tensor) for t in b) and b[1].dim() >= 1
        and len(b[0]) == len(b[1]) for b in data)


def _loader(data, batch_size: int, group) -> tuple:
    """A loader over this rank's shard of ``data``, and the data set's size."""
    rank, size = world(group)
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, torch.Tensor)
                                                           for t in data):
        data = TensorDataset(*data)
    elif _is_batch_list(data):  # a list of (x, y) batches is not a data set of samples
        data = TensorDataset(torch.cat([b[0] for b in data]), torch.cat([b[1] for b in data]))
    if isinstance(data, DataLoader):
        dataset, batch_size = data.dataset, data.batch_size or batch_size
        options = dict(num_workers=data.num_workers, collate_fn=data.collate_fn,
                       pin_memory=data.pin_memory)
    elif isinstance(data, Dataset) or (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
        dataset, options = data, {}
    else:
        if size > 1:
            raise TypeError(
                "evaluate: to shard the test set over processes pass a Dataset, a DataLoader or "
                f"an (x, y) pair of tensors, not {type(data).__name__}"
            )
        return data, None
    sampler = ShardSampler(dataset, size, rank)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, **options), len(dataset)


@contextlib.contextmanager
def _multi_step(net: nn.Module):
    """SpikingJelly step modules in multi-step mode for the duration (restored after)."""
    saved = [(m, m.step_mode) for m in net.modules() if getattr(m, "step_mode", None) in ("s", "m")]
    for module, _ in saved:
        module.step_mode = "m"
    try:
        yield
    finally:
        for module, mode in saved:
            module.step_mode = mode


def evaluate(net: nn.Module, data, T: int, *, count_mode: bool = False,
             bernoulli: str = "one-draw", seed: int | None = None, batch_size: int = 256,
             stats: bool = False, e_ac: float | None = None, e_mac: float | None = None,
             device=None, group=None) -> dict:
    r"""Test accuracy of a converted network over a data set, in one process or many.

    Each image is fed as a constant input for ``T`` steps: the full simulation runs
    ``net(x.expand(T, ...)).mean(0)`` in multi-step / sequence mode (SpikingJelly networks are
    switched to multi-step for the call; the state is reset before every batch); with
    ``count_mode=True`` it runs ``net(x)`` under :func:`tpp_plugin.count_mode`.

    Under ``torchrun`` (a process group exists, see :func:`init_distributed`) every rank
    evaluates its shard (:class:`ShardSampler`: each image exactly once, also when the world
    size does not divide the set) and the counts — correct predictions, images, and with
    ``stats=True`` the spike statistics — are all-reduced, so every rank returns the totals of
    the whole set. With ``seed`` the random modules of rank ``r`` are reseeded from
    :func:`rank_seed` ``(seed, r)`` (``seed`` on rank 0), so a run repeats for a given world
    size.

    :param net: converted network (SpikingJelly or snnTorch), on its device, in eval mode
    :param data: a ``Dataset`` of ``(x, y)``, a ``DataLoader`` (its data set is re-sharded), an
        ``(x, y)`` pair of tensors, a list of ``(x, y)`` batches (joined into one data set), or —
        in one process only — any other iterable of ``(x, y)`` batches
    :param T: time steps
    :param count_mode: evaluate in the count domain
    :param bernoulli: count-mode sampler of bernoulli neurons (see :func:`tpp_plugin.count_mode`)
    :param seed: reseed the network's random modules (per rank) before evaluating
    :param batch_size: batch size of the loader built here
    :param stats: also collect :func:`tpp_plugin.spike_stats` (all-reduced)
    :param e_ac: energy per accumulate, pJ (for ``stats``)
    :param e_mac: energy per multiply-accumulate, pJ (for ``stats``)
    :param device: device of the inputs (default: the network's)
    :param group: process group (default: the default group)
    :raises RuntimeError: if launched by ``torchrun`` with several processes but without a
        process group
    :raises ValueError: if the world size is larger than the data set, or an energy constant
        is not > 0
    :return: ``{'accuracy', 'correct', 'images', 'rank', 'world_size', 'spike_stats'}`` —
        totals over all ranks; ``spike_stats`` is the summary (or ``None``)

    Example::

        >>> import torch, tpp_plugin
        >>> from tpp_plugin.adapters.snntorch import convert
        >>> ann = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),
        ...                           torch.nn.Linear(8, 3)).eval()
        >>> x, y = torch.rand(20, 4), torch.randint(3, (20,))
        >>> snn = convert(ann, [x], num_steps=4, count='exact', seed=0)
        >>> result = tpp_plugin.evaluate(snn, (x, y), T=4, seed=0, stats=True)
        >>> result['images'], 0 <= result['accuracy'] <= 1, result['spike_stats'] is not None
        (20, True, True)
    """
    from . import count_domain, reseed
    from . import reset as reset_net
    from .functional import check_window
    from .stats import E_AC_PJ, E_MAC_PJ, SpikeStats, check_energy_constant

    T = check_window(T)
    e_ac = E_AC_PJ if e_ac is None else check_energy_constant(e_ac, "e_ac")
    e_mac = E_MAC_PJ if e_mac is None else check_energy_constant(e_mac, "e_mac")
    check_process_group()
    rank, size = world(group)
    loader, n = _loader(data, batch_size, group)
    if seed is not None:
        reseed(net, rank_seed(seed, rank))
    if device is None:
        device = next(net.parameters(), torch.empty(0)).device
    recorder = SpikeStats(net, T, e_ac, e_mac) if stats else None
    correct = images = 0
    try:
        with torch.no_grad(), _multi_step(net):
            for batch in loader:
                x, y = batch[0].to(device), batch[1].to(device)
                if count_mode:
                    with count_domain.count_mode(net, T, bernoulli=bernoulli):
                        out = net(x)
                else:
                    reset_net(net)
                    out = net(x.unsqueeze(0).expand(T, *x.shape))
                    out = (out[0] if isinstance(out, tuple) else out).mean(0)
                out = out[0] if isinstance(out, tuple) else out
                correct += int((out.argmax(1) == y).sum())
                images += len(y)
            if not count_mode:
                reset_net(net)
    finally:
        if recorder is not None:
            recorder.remove()
    correct, images = (int(v) for v in all_reduce_sum([correct, images], group).tolist())
    if n is not None and images != n:  # pragma: no cover - a broken sampler
        raise RuntimeError(f"evaluated {images} images of a data set of {n}")
    summary = None
    if recorder is not None:
        summary = recorder.all_reduce(group).summary()
    return {"accuracy": correct / images if images else float("nan"), "correct": correct,
            "images": images, "rank": rank, "world_size": size, "spike_stats": summary}
