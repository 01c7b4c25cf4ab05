r"""Time in snnTorch networks: sequence mode (:class:`TimeFlatten` and the folded-graph pieces),
the window-synchronous time loop (:class:`TimeLoop`), delayed streaming (:class:`WindowDelay`,
:func:`steps_needed`) and :func:`reset`. The window logic is :mod:`tpp_plugin.engine`'s."""

from __future__ import annotations

import snntorch
import snntorch.utils
import torch
from torch import nn

from ... import functional as F
from ...engine import WindowState, delay_step, graph, synchronous_step
from .if_neuron import IF
from .tpp import RESET_HOW, SEQUENCE_HOW, TPP

__all__ = ["TimeFlatten", "TimeLoop", "WindowDelay", "reset", "steps_needed"]


class TimeFlatten(nn.Module):
    r"""Apply a per-sample layer (conv, BN, pool, flatten, linear) to a sequence by folding time
    into the batch: ``[T, B, ...] → [T·B, ...] → module → [T, B, ...]``.

    Example::

        >>> layer = TimeFlatten(nn.Linear(3, 2))
        >>> layer(torch.zeros(4, 5, 3)).shape
        torch.Size([4, 5, 2])

    :param module: the layer to wrap
    :type module: torch.nn.Module
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x_seq):
        F.check_tensor(x_seq, "x_seq", min_dim=2, finite=False)
        T, B = x_seq.shape[:2]
        y = self.module(x_seq.flatten(0, 1))
        return y.reshape(T, B, *y.shape[1:])


class _TimeContext:
    """The number of time steps of the sequence a folded graph is running (set by its input)."""

    steps = None


class _FoldTime(TimeFlatten):
    r"""Graph input in sequence mode: ``[S, B, ...] → [S·B, ...]``, recording ``S`` for the
    neurons; every layer of the graph then runs on ``S·B`` samples. In count mode (see
    :func:`tpp_plugin.count_mode`) it is its ``module``, the identity."""

    def __init__(self, context: _TimeContext):
        super().__init__(nn.Identity())
        self.context = context

    def forward(self, x_seq):
        F.check_tensor(x_seq, "x_seq", min_dim=2, finite=False)
        self.context.steps = x_seq.shape[0]
        return x_seq.flatten(0, 1)


class _UnfoldTime(TimeFlatten):
    r"""Graph output in sequence mode: ``[S·B, ...] → [S, B, ...]`` (identity in count mode)."""

    def __init__(self, context: _TimeContext):
        super().__init__(nn.Identity())
        self.context = context

    def forward(self, x):
        if not isinstance(x, torch.Tensor):
            return x
        return x.unflatten(0, (self.context.steps, -1))


class _TimeCell(TimeFlatten):
    r"""A neuron (and its permutation) in a folded graph: ``[S·B, ...] → [S, B, ...] → module
    → [S·B, ...]``. In count mode it is its ``module``."""

    def __init__(self, module: nn.Module, context: _TimeContext):
        super().__init__(module)
        self.context = context

    def forward(self, x):
        return self.module(x.unflatten(0, (self.context.steps, -1))).flatten(0, 1)


class WindowDelay(TimeFlatten):
    r"""Delayed time loop: delay a branch by ``windows`` whole windows of ``num_steps`` steps
    (zeros until then), so that it meets a branch that passed ``windows`` more TPP layers in
    step (:func:`tpp_plugin.engine.delay_step`). The identity in count mode; cleared by
    :func:`reset` and ``snntorch.utils.reset``."""

    def __init__(self, windows: int, num_steps: int):
        super().__init__(nn.Identity())
        self.windows, self.num_steps = windows, num_steps
        self._queue: tuple = ()

    def forward(self, x):
        if not isinstance(x, torch.Tensor):  # sizes and shapes do not change along time
            return x
        out, self._queue = delay_step(x, self._queue, self.windows * self.num_steps)
        return out

    def reset_mem(self):
        """Forget the buffered steps."""
        self._queue = ()

    def extra_repr(self) -> str:
        return f"windows={self.windows}, num_steps={self.num_steps}"


class TimeLoop(TimeFlatten):
    r"""A converted sequence-mode network run in snnTorch's time loop, window-synchronously.

    Each call takes one time step ``[B, ...]``. The first call of a window of ``num_steps``
    calls runs the network once on its input repeated ``num_steps`` times and keeps the output
    ``[num_steps, B, ...]``; the next calls check that the input is unchanged (``ValueError``
    otherwise) and return the following steps (:func:`tpp_plugin.engine.synchronous_step`):
    step ``t`` of the loop is step ``t`` of sequence mode, with no delay, and the same random
    numbers. :func:`reset` / ``snntorch.utils.reset`` start a new window. :func:`convert` builds
    it for ``sequence=False`` (the default ``streaming='synchronous'``).

    Set ``step_mode = 'm'`` to feed whole ``[T, B, ...]`` sequences to the network itself
    (:func:`tpp_plugin.evaluate` and :func:`tpp_plugin.count_mode` do).

    :param module: the network in sequence mode (``[T, B, ...]`` in and out)
    :param num_steps: the window length

    Example::

        >>> from tpp_plugin.adapters.snntorch import TPP
        >>> seq = nn.Sequential(nn.Linear(3, 4),
        ...                     TPP(num_steps=4, count='exact', sequence=True, init_hidden=True))
        >>> loop = TimeLoop(seq, num_steps=4)
        >>> x = torch.rand(2, 3)
        >>> steps = torch.stack([loop(x) for _ in range(4)])
        >>> steps.shape
        torch.Size([4, 2, 4])
    """

    def __init__(self, module: nn.Module, num_steps: int):
        super().__init__(module)
        self.num_steps = F.check_window(num_steps, "num_steps")
        self.step_mode = "s"
        self._state = WindowState()

    def forward(self, *args):
        if self.step_mode == "m":
            return self.module(*args)
        out, self._state = synchronous_step(
            args, self._state, self.num_steps, self.module,
            what="window-synchronous TPP network", reset=RESET_HOW, sequence=SEQUENCE_HOW)
        return out

    def reset_mem(self):
        """Start a new window."""
        self._state = WindowState()

    def extra_repr(self) -> str:
        return f"num_steps={self.num_steps}"


# ----------------------------------------------------------------------------------------------
# resets, steps
# ----------------------------------------------------------------------------------------------
def _reset_plugin_modules(net: nn.Module) -> None:
    for module in net.modules():
        if isinstance(module, (TPP, IF, WindowDelay, TimeLoop)):
            module.reset_mem()


def wrap_reset(original):
    """``snntorch.utils.reset`` that also resets the plugin's modules (installed on
    registration)."""

    def reset(net):
        result = original(net)
        _reset_plugin_modules(net)
        return result

    return reset


def reset(net: nn.Module) -> None:
    """``snntorch.utils.reset(net)``, plus a reset of every plugin neuron (:class:`TPP`,
    :class:`IF`), time loop and branch delay anywhere in ``net`` — nested containers included —
    registered or not.

    Example::

        reset(net)                       # before each new batch in a time loop
    """
    snntorch.utils.reset(net)
    _reset_plugin_modules(net)


def delayed_tpp_layers(module: nn.Module) -> int:
    """Windows of delay of a module in the delayed time loop: its time-loop TPP layers."""
    return sum(1 for m in module.modules()
               if isinstance(m, TPP) and not m.sequence and m.streaming == "delayed")


def steps_needed(net: nn.Module, num_steps: int | None = None) -> int:
    """Time-loop calls a net needs to output one full window: ``num_steps`` for a
    window-synchronous net (the default: :class:`TimeLoop`, or synchronous neurons);
    ``(L+1)·num_steps`` for ``L`` delayed TPP layers on its longest path (each delays by one
    window; a residual net's shortcuts are delayed to match, see :func:`convert`) — its valid
    output is then the last ``num_steps`` calls.

    :param net: the network (a single neuron works too)
    :param num_steps: the window length; defaults to the TPP layers' ``num_steps`` (which must
        agree)
    :return: the number of time steps to run

    Example::

        for step in range(steps_needed(net, num_steps)):
            spk_rec.append(net(x))
        spk_out = torch.stack(spk_rec[-num_steps:])
    """
    if num_steps is None:
        windows = {m.num_steps for m in net.modules() if isinstance(m, (TPP, TimeLoop))}
        if len(windows) != 1:
            why = f"TPP windows differ: {windows}" if windows else "net has no TPP layer"
            raise ValueError(f"num_steps must be given: {why}")
        num_steps = windows.pop()
    num_steps = F.check_window(num_steps, "num_steps")
    return (graph.longest_delay(net, delayed_tpp_layers) + 1) * num_steps
