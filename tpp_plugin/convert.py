r"""Framework-neutral pieces of ANN→SNN conversion: find activations, calibrate, swap modules."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from .batches import batch_inputs
from .distributed import all_reduce_sum, world

__all__ = [
    "named_modules_of_type",
    "set_submodule",
    "batch_inputs",
    "check_calibration_mode",
    "check_momentum",
    "activation_statistic",
    "calibrate_thresholds",
    "eval_mode",
]


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Put every module of ``model`` in eval mode for the duration, then give each its own
    ``training`` flag back (a model in train mode with frozen batch norms stays so): running
    a user's ANN for statistics or reference outputs must neither update its BatchNorm running
    statistics nor see dropout noise."""
    saved = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in saved:
            module.training = training


def named_modules_of_type(model: nn.Module, types, exact: bool = False) -> Iterator:
    """Yield ``(name, module)`` for submodules of ``model`` that are instances of ``types``.

    With ``exact=True`` only modules whose type *is* one of ``types`` (no subclasses) match,
    as SpikingJelly's converters match ``nn.ReLU``.
    """
    types = types if isinstance(types, tuple) else (types,)
    for name, module in model.named_modules():
        if name and (type(module) in types if exact else isinstance(module, types)):
            yield name, module


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path ``name`` of ``root`` by ``module``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def check_calibration_mode(mode) -> str | float:
    """Validate a threshold calibration mode: ``'max'``, a percentile ``'99.9%'``, or a float in
    ``(0, 1]`` (that fraction of the maximum) — SpikingJelly's conventions."""
    if isinstance(mode, str):
        if mode.lower() == "max":
            return "max"
        if mode.endswith("%"):
            try:
                p = float(mode[:-1])
            except ValueError:
                p = -1.0
            if 0.0 < p <= 100.0:
                return mode
    elif isinstance(mode, float) and 0.0 < mode <= 1.0:
        return mode
    raise ValueError(
        f"mode must be 'max', a percentile like '99.9%', or a float in (0, 1], got {mode!r}"
    )


def activation_statistic(x: torch.Tensor, mode) -> torch.Tensor:
    """The per-batch activation statistic for threshold calibration (see
    :func:`check_calibration_mode`)."""
    x = x.detach().float().flatten()
    if mode == "max":
        return x.max()
    if isinstance(mode, str):
        q = float(mode[:-1]) / 100.0
        if x.numel() > 16_000_000:  # torch.quantile's input limit
            x = x[torch.randperm(x.numel(), device=x.device)[:16_000_000]]
        return torch.quantile(x, q)
    return x.max() * mode


def check_momentum(momentum) -> float:
    """Validate the moving-average momentum of threshold calibration: a number in ``[0, 1]``.

    :raises TypeError: if it is not a real number
    :raises ValueError: if it is NaN or outside ``[0, 1]``
    """
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        raise TypeError(f"momentum must be a number in [0, 1], got {type(momentum).__name__}")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be a number in [0, 1], got {momentum}")
    return float(momentum)


@torch.no_grad()
def calibrate_thresholds(
    model: nn.Module,
    dataloader: Iterable,
    calls: list,
    mode="max",
    momentum: float = 0.1,
    names: list[str] | None = None,
    group=None,
) -> list[float]:
    """Run ``model`` over ``dataloader`` and return one threshold per activation *call*.

    ``calls[i]`` is ``(module, k)``, the ``k``-th call of ``module`` in one forward pass (a
    module used twice, as torchvision's shared ``ReLU(inplace=True)``, gets a statistic per
    call), or a bare module for its only call. The statistic of each call's output is tracked
    per batch with an exponential moving average (first batch taken as is), as SpikingJelly's
    ``VoltageHook`` does.

    With a process ``group`` (e.g. :func:`tpp_plugin.distributed.default_group` under
    ``torchrun``) the batches are shared among its ranks: ``dataloader`` must give every rank the
    same sequence of batches; batch ``b`` runs on rank ``b mod W`` only, its per-call statistics
    are all-reduced (the other ranks add zeros, so the numbers arrive exactly), and every rank
    applies the moving average in batch order — the same thresholds on every rank, equal to the
    one-process result.

    :param names: labels of the calls for error messages (default ``activation i``)
    :param group: ``None``: one process (any iterable of batches); a ``torch.distributed``
        process group: the batches shared among its ranks, as above
    :raises ValueError: for a bad ``mode``/``momentum``, an empty loader, a batch that does not
        fit the model, a forward that calls a module more or less often than ``calls`` lists it,
        or a call whose statistic never became positive (under a group: on every rank)

    Example::

        >>> _ = torch.manual_seed(0)
        >>> relu = nn.ReLU()
        >>> model = nn.Sequential(nn.Linear(2, 8), relu, nn.Linear(8, 8), relu)  # relu twice
        >>> batches = [torch.randn(8, 2) for _ in range(3)]
        >>> len(calibrate_thresholds(model, batches, [(relu, 0), (relu, 1)]))
        2
    """
    mode = check_calibration_mode(mode)
    check_momentum(momentum)
    calls = [c if isinstance(c, tuple) else (c, 0) for c in calls]
    names = names or [f"activation {i}" for i in range(len(calls))]
    if group is None:
        rows, error = _call_statistics(model, enumerate(dataloader), calls, mode), None
        table = torch.stack([rows[b] for b in sorted(rows)]) if rows else None
    else:
        batches = list(dataloader)
        rank, size = world(group)
        error, rows = None, {}
        try:
            rows = _call_statistics(
                model, ((b, batches[b]) for b in range(rank, len(batches), size)), calls, mode)
        except ValueError as exc:  # the other ranks must not wait for this one's statistics
            error = exc
        # one row per batch, and a last column flagging a rank whose forward failed
        table = torch.zeros(len(batches), len(calls) + 1, dtype=torch.float64)
        for b, row in rows.items():
            table[b, :-1] = row.double()
        if error is not None and len(batches):
            table[rank % len(batches), -1] = 1.0
        table = all_reduce_sum(table, group) if len(batches) else table
        if error is not None:
            raise error
        if bool((table[:, -1] > 0).any()):
            raise ValueError("threshold calibration failed on another rank (see its error)")
        table = table[:, :-1].float() if len(batches) else None  # float32 → float64 → float32
    if table is None:
        raise ValueError("dataloader yielded no batch: cannot calibrate thresholds")
    ema = table[0]
    for row in table[1:]:  # in float32, batch order: the same numbers on every rank
        ema = (1 - momentum) * ema + momentum * row
    thresholds = []
    for name, th in zip(names, ema.tolist()):
        if not th > 0:
            raise ValueError(
                f"{name} never became positive during calibration (threshold {th}); use more "
                "calibration data or a different mode"
            )
        thresholds.append(th)
    return thresholds


def _call_statistics(model: nn.Module, batches, calls: list, mode) -> dict:
    """``{b: statistics}`` for the ``(b, batch)`` pairs of ``batches``: the float32 statistic of
    every ``(module, k)`` call's output (NaN for a listed call that did not happen), on the CPU.

    :raises ValueError: for a batch that does not fit the model, or a forward that calls a module
        more or less often than ``calls`` lists it
    """
    index = {(id(m), k): i for i, (m, k) in enumerate(calls)}
    uses: dict = {}  # module -> calls per forward
    for m, _ in calls:
        uses[m] = uses.get(m, 0) + 1
    current: list = []
    seen: dict = {}

    def hook(module, _inputs, output):
        k = seen.get(id(module), 0)
        seen[id(module)] = k + 1
        i = index.get((id(module), k))
        if i is not None:
            current[i] = activation_statistic(output, mode)

    rows = {}
    handles = [m.register_forward_hook(hook) for m in uses]
    device = next(model.parameters(), torch.empty(0)).device
    with eval_mode(model):
        try:
            for b, batch in batches:
                inputs = batch_inputs(batch).to(device)
                seen.clear()
                current[:] = [None] * len(calls)
                try:
                    model(inputs)
                except RuntimeError as exc:
                    raise ValueError(
                        f"calibration batch of shape {tuple(inputs.shape)} does not fit the model "
                        f"(the model's error: {exc}); calibrate with batches shaped like its input"
                    ) from exc
                for module, n in uses.items():
                    if seen.get(id(module), 0) != n:
                        raise ValueError(
                            f"the forward called {type(module).__name__} {seen.get(id(module), 0)} "
                            f"times, but {n} calls were expected (its torch.fx trace): the forward "
                            "must call its activations the same way for every input"
                        )
                rows[b] = torch.tensor(
                    [float("nan") if s is None else float(s) for s in current],
                    dtype=torch.float32)
        finally:
            for h in handles:
                h.remove()
    return rows
