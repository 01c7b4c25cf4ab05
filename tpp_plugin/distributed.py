r"""``torch.distributed`` helpers: run evaluation and calibration across processes and GPUs.

Launch any script (or ``python -m tpp_plugin reproduce``) with ``torchrun``; each process
evaluates its own shard of the test set and the counts are summed::

    torchrun --nproc_per_node 4 my_eval.py                 # one machine, 4 GPUs (or 4 CPU ranks)

    # my_eval.py
    import tpp_plugin
    from tpp_plugin.distributed import init_distributed, shutdown_distributed
    init_distributed()                                     # gloo on CPU, nccl on GPUs
    result = tpp_plugin.evaluate(snn, test_set, T=8, seed=0, stats=True)
    if result['rank'] == 0:
        print(result['accuracy'], result['images'])        # over the whole test set
    shutdown_distributed()

The pieces, each usable on its own:

* :func:`init_distributed` / :func:`shutdown_distributed` — the default process group from
  ``torchrun``'s environment (``gloo`` on CPU, ``nccl`` with CUDA, one GPU per local rank);
  :func:`check_process_group` refuses a ``torchrun`` launch without one;
* :func:`world`, :func:`world_of`, :func:`default_group`, :func:`sharing_group`,
  :func:`all_reduce_sum`, :func:`check_same_on_ranks`, :func:`barrier`,
  :func:`broadcast_module` — rank and world size,
  and the collectives the package uses (on the CPU for ``gloo``, on the current GPU for
  ``nccl``); without a process group they are the one-process identities;
* :class:`ShardSampler` / :func:`shard_indices` — PyTorch's ``DistributedSampler`` without its
  padding: every image is evaluated exactly once, whether or not the world size divides the set;
* :func:`rank_seed` — per-rank seeds derived from the user's seed (rank 0 keeps it), so a run
  is reproducible for a given world size;
* :func:`calibrate_observers` / :func:`shared_calibration` — SpikingJelly 2.x recipes with
  their calibration stage's batches shared among the ranks and the statistics all-reduced;
* :func:`sync_thresholds` — broadcast rank 0's thresholds of a converted network (after a
  converter calibrated on every rank) and report how far the ranks were apart.

Built on them: :func:`tpp_plugin.evaluate` (:mod:`tpp_plugin.evaluation`) — accuracy and spike
statistics over a data set, sharded and all-reduced — and
:func:`tpp_plugin.convert.calibrate_thresholds` with ``group=default_group()`` — threshold
calibration whose per-batch statistics are computed on the rank that holds the batch and
all-reduced, so every rank builds the one-process thresholds.

Without ``torchrun`` (no process group) everything runs in one process, unchanged.
"""

from __future__ import annotations

import itertools
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DistributedSampler

from .batches import batch_inputs

__all__ = [
    "init_distributed",
    "shutdown_distributed",
    "check_process_group",
    "world",
    "world_of",
    "default_group",
    "sharing_group",
    "ShardSampler",
    "shard_indices",
    "all_reduce_sum",
    "check_same_on_ranks",
    "barrier",
    "broadcast_module",
    "rank_seed",
    "calibrate_observers",
    "shared_calibration",
    "sync_thresholds",
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


def check_process_group(consequence: str = "every process evaluates the whole data set"
                        ) -> None:
    """Raise ``RuntimeError`` if the process was launched by ``torchrun`` with several processes
    but no process group exists.

    :param consequence: what would go wrong without one, ending the message (e.g. "every
        process evaluates the whole data set")
    """
    launched = _launched_world_size()
    if launched > 1 and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"launched by torchrun with WORLD_SIZE={launched}, but torch.distributed has no "
            "process group: call tpp_plugin.distributed.init_distributed() (or "
            f"torch.distributed.init_process_group) first, or {consequence}"
        )


def world(group=None) -> tuple[int, int]:
    """``(rank, world_size)`` in ``group``; ``(0, 1)`` without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def world_of(group) -> tuple[int, int]:
    """``(rank, world_size)`` in ``group``, and ``(0, 1)`` for ``None``: a computation given no
    group runs in this process alone (where :func:`world` reads ``None`` as the default
    group)."""
    return (0, 1) if group is None else world(group)


def default_group():
    """The default process group (``torch.distributed.group.WORLD``) when one exists, else
    ``None``: pass it as ``group`` to shard a computation over every rank under ``torchrun``
    and run it in one process otherwise."""
    if dist.is_available() and dist.is_initialized():
        return dist.group.WORLD
    return None


def sharing_group(share: bool = True):
    """The process group a computation that can share its work among the ranks (a calibration,
    a fine-tuning) uses: the default one when ``share`` and one exists, else ``None`` (this
    process alone).

    :raises RuntimeError: for ``share`` in a ``torchrun`` launch of several processes without a
        process group (:func:`check_process_group`)
    """
    if not share:
        return None
    check_process_group("pass distributed=False to work in every process on its own")
    return default_group()


def _reduce_device(group=None) -> torch.device:
    """Where collectives of ``group`` run: the current CUDA device for ``nccl``, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values, group=None, dtype=torch.float64) -> torch.Tensor:
    """Sum ``values`` (a tensor or a list of numbers) over the ranks; a copy, on the CPU, in
    ``dtype`` (``None``: the tensor's own). Without a process group the values are returned as
    they are."""
    t = torch.as_tensor(values, dtype=dtype).detach().clone()
    if world(group)[1] == 1:
        return t.cpu()
    t = t.to(_reduce_device(group))
    dist.all_reduce(t, group=group)
    return t.cpu()


def check_same_on_ranks(values, what: str, group=None) -> None:
    """Raise ``ValueError`` on every rank if ``values`` (numbers) differ between the ranks.

    :param what: what the values are, for the message (e.g. "the calibration loader's sample
        count and first batch's sum")
    """
    rank, size = world(group)
    if size == 1:
        return
    t = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    both = torch.cat([t, -t]).to(_reduce_device(group))
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    high, low = both[:t.numel()].cpu(), -both[t.numel():].cpu()
    if not torch.equal(high, low):
        raise ValueError(f"{what} differ between the ranks (from {low.tolist()} to "
                         f"{high.tolist()}; rank {rank} has {t.tolist()})")


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
# thresholds: SpikingJelly's calibration observers, and rank 0's thresholds broadcast
# ------------------------------------------------------------------------------------------------
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
            model(batch_inputs(batch).to(device))
        return model
    rank, size = world(group)
    mine = list(range(rank, len(batches), size)) or [0]  # a rank without a batch learns shapes
    stats: dict = {}
    for b in mine:
        for obs in observers:
            obs.num_batches_tracked = 0
        model(batch_inputs(batches[b]).to(device))
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
        obs.num_batches_tracked = sum(len(batch_inputs(b)) for b in batches)
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
