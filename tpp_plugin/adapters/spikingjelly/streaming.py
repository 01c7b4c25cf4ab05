r"""Single-step SpikingJelly networks with TPP layers: window-synchronous driving
(:func:`window_synchronous`), delayed streaming (:func:`steps_needed`, :func:`align_delays`,
:class:`WindowDelay`). The window logic is :mod:`tpp_plugin.engine`'s; this module keeps
SpikingJelly's conventions (step modes, memories reset by ``functional.reset_net``).
"""

from __future__ import annotations

import functools

import torch
from spikingjelly.activation_based import base
from torch import fx, nn

from ... import functional as F
from ...engine import WindowState, delay_step, graph, synchronous_step
from .compat import invalidate_reset_cache
from .neurons import RESET_HOW, SEQUENCE_HOW, _WindowModule

__all__ = ["WindowSynchronizer", "window_synchronous", "steps_needed", "WindowDelay",
           "align_delays", "tpp_modules"]

_SYNC_ATTR = "window_sync"


class WindowSynchronizer(base.MemoryModule):
    r"""The state of a window-synchronous network (see :func:`window_synchronous`).

    In single-step mode the first call of each window runs the network once in multi-step mode
    on its input repeated ``T`` times and keeps the output ``[T, N, ...]``; the next ``T − 1``
    calls check that the input is unchanged and return the following steps
    (:func:`tpp_plugin.engine.synchronous_step`). Reset by ``functional.reset_net``;
    ``functional.set_step_mode(net, 'm')`` turns it into a pass-through.
    """

    def __init__(self):
        super().__init__()
        self.step_mode = "s"
        self.register_memory("t", 0)
        self.register_memory("window_T", 0)
        self.register_memory("window_input", None)
        self.register_memory("window_output", None)

    def extra_repr(self) -> str:
        return f"step_mode={self.step_mode}"

    def forward(self, *args, **kwargs):
        raise RuntimeError("WindowSynchronizer is driven by its network's forward, not called")

    def step(self, root: nn.Module, args: tuple, kwargs: dict):
        forward = type(root).forward  # the class's own forward: the instance's is the driver
        if self.step_mode == "m":
            return forward(root, *args, **kwargs)
        T = synchronous_window(root) if self.t == 0 else self.window_T

        def run_window(*seq):
            modules = [m for m in root.modules()
                       if isinstance(m, base.StepModule) and m is not self]
            modes = [m.step_mode for m in modules]
            for m in modules:
                m.step_mode = "m"
            try:
                return forward(root, *seq, **kwargs)
            finally:
                for m, mode in zip(modules, modes):
                    m.step_mode = mode

        state = WindowState(t=self.t, pending=self.window_output, window_input=self.window_input)
        out, state = synchronous_step(args, state, T, run_window,
                                      what="window-synchronous TPP network", reset=RESET_HOW,
                                      sequence=SEQUENCE_HOW)
        self.t, self.window_T = state.t, T
        self.window_output, self.window_input = state.pending, state.window_input
        return out


def _synchronous_forward(root: nn.Module, *args, **kwargs):
    return _synchronizer(root).step(root, args, kwargs)


def _synchronizer(net: nn.Module, create: bool = True):
    """The network's :class:`WindowSynchronizer`. It lives inside the first TPP module — a
    ``MemoryModule`` that ``reset_net``, ``set_step_mode`` and deep copies reach, and whose
    forward ignores children (a child of the root would join an ``nn.Sequential``'s chain)."""
    sync = next((m for m in net.modules() if isinstance(m, WindowSynchronizer)), None)
    if sync is None and create:  # e.g. its holder was swapped out: start afresh
        holder = next(iter(tpp_modules(net)))
        sync = WindowSynchronizer()
        sync.step_mode = holder.step_mode
        holder.add_module(_SYNC_ATTR, sync)
        invalidate_reset_cache(net)
    return sync


def tpp_modules(net: nn.Module) -> list:
    """The SpikingJelly TPP modules of ``net`` (neurons and permutations)."""
    return [m for m in net.modules() if isinstance(m, _WindowModule)]


def synchronous_window(net: nn.Module) -> int:
    """The one window length ``T`` of a network's TPP layers (``ValueError`` if they have none
    or several)."""
    windows = {m.T for m in tpp_modules(net)}
    if len(windows) != 1 or None in windows:
        raise ValueError(
            "the TPP layers of this network run in single-step mode, which needs one window "
            f"length T for all of them (they have {sorted(windows, key=str)}): convert with "
            "neuron_kwargs={'T': T} (T = the steps of your evaluation loop; with python -m "
            "tpp_plugin run: --neuron-kwargs T=...), or call functional.set_step_mode(net, 'm') "
            "and feed [T, N, ...] sequences"
        )
    return windows.pop()


def window_synchronous(net: nn.Module) -> nn.Module:
    r"""Make a network with TPP layers window-synchronous in single-step mode (in place).

    SpikingJelly's ann2snn examples evaluate a converted network step by step with the same
    input at every step (``for t in range(T): out += net(x)``). A TPP layer fires only once it
    has its whole window, so a network of them cannot answer causally at step ``t``; but with a
    constant input it can compute the whole window at the first step. After this call, in
    single-step mode, the first call of each window of ``T`` calls runs the network in
    multi-step mode on ``x`` repeated ``T`` times; calls ``2..T`` check that the input is
    unchanged (``ValueError`` otherwise) and return the next step of that output. So step ``t``
    returns exactly what multi-step mode returns for step ``t`` — no delay. Multi-step mode is
    unaffected. ``functional.reset_net`` starts a new window (and a batch-size change at a
    window boundary just works).

    The converters and :func:`~tpp_plugin.adapters.spikingjelly.swap_neurons` /
    :func:`~tpp_plugin.adapters.spikingjelly.insert_permutation` call this for you whenever the
    result has TPP layers (``streaming='synchronous'``, the default). Networks whose TPP layers
    stream with ``streaming='delayed'`` are returned unchanged.

    :param net: a network with :class:`TPPNode` / :class:`TemporalPermutation` layers
    :return: ``net``
    :raises ValueError: if its TPP layers mix ``'synchronous'`` and ``'delayed'`` streaming

    Example::

        >>> import tpp_plugin
        >>> from spikingjelly.activation_based import functional
        >>> from tpp_plugin.adapters.spikingjelly import TPPNode
        >>> net = nn.Sequential(nn.Linear(3, 3), TPPNode(T=4, count='exact', seed=0),
        ...                     nn.Linear(3, 2), TPPNode(T=4, count='exact', seed=1))
        >>> net = window_synchronous(net)
        >>> x = torch.rand(5, 3)
        >>> steps = torch.stack([net(x) for _ in range(4)])   # single-step loop
        >>> functional.reset_net(net)
        >>> tpp_plugin.reseed(net)           # restart the seeded streams, to compare draw for draw
        >>> functional.set_step_mode(net, 'm')
        >>> torch.equal(steps, net(x.expand(4, 5, 3)))
        True
    """
    modes = {m.streaming for m in tpp_modules(net)}
    if len(modes) > 1:
        raise ValueError(
            "the TPP layers of this network mix streaming='synchronous' and 'delayed'; "
            "swap_neurons(net, 'tpp', streaming=...) sets one mode for all"
        )
    driver = net.__dict__.get("forward")
    installed = isinstance(driver, functools.partial) and driver.func is _synchronous_forward
    if modes != {"synchronous"}:  # nothing to drive (any more, e.g. after a swap to 'delayed')
        if installed:
            del net.__dict__["forward"]
            getattr(net, "meta", {}).get("_user_preserved_attributes", {}).pop("forward", None)
        for name, module in list(net.named_modules()):
            if isinstance(module, WindowSynchronizer):
                parent, _, leaf = name.rpartition(".")
                delattr(net.get_submodule(parent) if parent else net, leaf)
        invalidate_reset_cache(net)
        return net
    _synchronizer(net)
    if installed:
        return net
    net.forward = functools.partial(_synchronous_forward, net)
    if isinstance(net, fx.GraphModule):  # GraphModule's deepcopy keeps only what its graph uses
        net.meta.setdefault("_user_preserved_attributes", {})["forward"] = net.forward
    return net


def _delay_of(module: nn.Module) -> int:
    """Windows of delay a module adds in delayed streaming (its delayed TPP layers and
    :class:`WindowDelay` buffers)."""
    delay = 0
    for m in module.modules():
        if isinstance(m, _WindowModule) and m.streaming == "delayed":
            delay += 1
        elif isinstance(m, WindowDelay):
            delay += m.windows
    return delay


def steps_needed(net: nn.Module, T: int | None = None) -> int:
    """Single-step calls a network needs to output one full window.

    ``T`` for a window-synchronous network (the default: no delay); ``(L + 1)·T`` when its TPP
    layers stream with ``streaming='delayed'``, ``L`` being the largest number of such layers on
    one path from input to output (each delays by one window); the valid output is then the
    last ``T`` calls.

    :param net: a network (or a single module)
    :param T: the window length; defaults to the TPP layers' ``T`` (which must agree)
    :return: the number of single-step calls

    Example::

        >>> from tpp_plugin.adapters.spikingjelly import TPPNode
        >>> steps_needed(nn.Sequential(TPPNode(T=8), TPPNode(T=8)))
        8
        >>> steps_needed(nn.Sequential(TPPNode(T=8, streaming='delayed'),
        ...                            TPPNode(T=8, streaming='delayed')))
        24
    """
    if T is None:
        T = synchronous_window(net)
    T = F.check_window(T)
    if not any(m.streaming == "delayed" for m in tpp_modules(net)):
        return T
    return (graph.longest_delay(net, _delay_of) + 1) * T


class WindowDelay(base.MemoryModule):
    """Delays a single-step stream by ``windows`` windows of ``T`` steps (zeros until then); the
    identity in multi-step mode, where TPP layers have no delay. :func:`align_delays` puts it
    on the shorter branches of a delayed-streaming network."""

    def __init__(self, windows: int, T: int, step_mode: str = "s"):
        super().__init__()
        self.windows, self.T = F.check_window(windows, "windows"), F.check_window(T)
        self.step_mode = step_mode
        self.register_memory("queue", ())

    def extra_repr(self) -> str:
        return f"windows={self.windows}, T={self.T}, step_mode={self.step_mode}"

    def single_step_forward(self, x: torch.Tensor) -> torch.Tensor:
        out, self.queue = delay_step(x, self.queue, self.windows * self.T)
        return out

    def multi_step_forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        return x_seq


def align_delays(gm: nn.Module) -> nn.Module:
    """Equalise the delay of every branch of a delayed-streaming network (in place).

    With ``streaming='delayed'`` each TPP layer delays its stream by one window. Where branches
    with different numbers of TPP layers meet (a residual ``add``: the shortcut passes fewer),
    the shorter ones get a :class:`WindowDelay`, so every op combines the same window of every
    branch (:func:`tpp_plugin.engine.align_delays`). A no-op for other networks.

    :param gm: a converted network (``fx.GraphModule``)
    :return: ``gm``
    """
    if not isinstance(gm, fx.GraphModule):
        return gm
    delayed = [m for m in tpp_modules(gm) if m.streaming == "delayed"]
    windows = {m.T for m in delayed}
    if len(windows) != 1 or None in windows:  # nothing to align yet: single steps need T first
        return gm
    T, step_mode = windows.pop(), delayed[0].step_mode
    if graph.align_delays(gm, _delay_of, lambda w: WindowDelay(w, T, step_mode)):
        invalidate_reset_cache(gm)
    return gm
