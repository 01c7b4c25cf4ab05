r"""A TPP window in time, once for every framework: a state record and step functions.

A TPP layer needs its whole window of ``T`` inputs before it fires. Multi-step execution
(``[T, N, ...]`` in and out) is native; single steps (one ``[N, ...]`` per call) come in two
behaviours (``docs/design.md``, "Window semantics"):

* **synchronous** (:func:`synchronous_step`): the input is constant within a window (rate
  coding). The first call of a window computes the whole window from its input repeated ``T``
  times; calls ``2..T`` check that the input is unchanged and return the following steps — step
  ``t`` equals the multi-step output at step ``t``, with no delay.
* **delayed** (:func:`delayed_step`): causal streaming for input that changes. Calls ``1..T``
  integrate and return silence; calls ``T+1..2T`` emit that window while integrating the next.

Both are pure functions of ``(input, state)`` returning ``(output, new state)``
(:class:`WindowState`); the framework adapters keep the state in their own containers
(SpikingJelly memories, snnTorch buffers) and call these. A failure leaves the old state valid:
nothing is committed until the step succeeds. :func:`delay_step` is the window delay that
aligns residual branches in delayed streaming.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.utils._pytree import tree_map

__all__ = [
    "STREAMING_MODES",
    "WindowState",
    "check_streaming_mode",
    "synchronous_step",
    "delayed_step",
    "delay_step",
    "changed_input_error",
]

#: single-step behaviours of a TPP layer or network
STREAMING_MODES = ("synchronous", "delayed")

CHANGED_INPUT = (
    "{what}: the input of single-step call {step}/{T} differs from the first call of this "
    "window{shape}. In single-step mode a TPP network computes each window of T steps at its "
    "first call, which needs the same input at every step of the window (rate coding, as in "
    "the frameworks' conversion examples). {reset} before a new batch; for input that changes "
    "over time feed whole [T, N, ...] sequences ({sequence}), or stream causally with "
    "streaming='delayed' (one window of delay per TPP layer; docs/design.md, 'Window semantics')"
)


@dataclass(frozen=True)
class WindowState:
    """Where a single-step TPP layer (or network) is in its window.

    :ivar t: calls of the current window so far (``0 ≤ t < T``)
    :ivar windows: windows completed since the last reset
    :ivar acc: delayed streaming: what the current window integrated so far (a potential, or
        the buffered inputs); ``None`` at a window boundary
    :ivar pending: the window being emitted, ``[T, ...]`` (delayed: the previous window's
        spikes; synchronous: this window's output, any pytree of such tensors)
    :ivar window_input: synchronous: the inputs of the window's first call
    """

    t: int = 0
    windows: int = 0
    acc: Any = None
    pending: Any = None
    window_input: Any = None


def check_streaming_mode(streaming) -> str:
    """``streaming`` if it is one of :data:`STREAMING_MODES`, else ``ValueError``."""
    if streaming not in STREAMING_MODES:
        raise ValueError(f"streaming must be one of {STREAMING_MODES}, got {streaming!r}")
    return streaming


def changed_input_error(what: str, step: int, T: int, new, old, reset: str,
                        sequence: str) -> ValueError:
    """The error for an input that changed inside a synchronous window, saying what to do in
    the framework's own words (``reset``: how to start a new window; ``sequence``: how to feed
    whole sequences)."""
    shape = (f" (shape {tuple(new.shape)}, the window started with {tuple(old.shape)})"
             if new.shape != old.shape else "")
    return ValueError(CHANGED_INPUT.format(what=what, step=step, T=T, shape=shape, reset=reset,
                                           sequence=sequence))


def synchronous_step(inputs: tuple, state: WindowState, T: int,
                     run_window: Callable[..., Any], *, what: str, reset: str,
                     sequence: str) -> tuple[Any, WindowState]:
    """One call of a window-synchronous layer or network.

    :param inputs: the call's positional inputs; tensors are the per-step input ``[N, ...]``,
        anything else is passed through unchanged
    :param state: the state before the call
    :param T: the window length
    :param run_window: ``run_window(*inputs_seq) -> outputs`` runs a whole window on the inputs
        repeated ``T`` times (``[T, N, ...]``); outputs may be any pytree of ``[T, ...]`` tensors
    :param what: the layer or network, for the changed-input error
    :param reset: how a user of the framework starts a new window (for the error)
    :param sequence: how a user of the framework feeds whole sequences (for the error)
    :return: ``(step t of the window's outputs, the new state)``
    :raises ValueError: if a tensor input differs from the window's first call
    """
    if state.t == 0:
        seq = tuple(a.unsqueeze(0).expand(T, *a.shape) if isinstance(a, torch.Tensor) else a
                    for a in inputs)
        output = run_window(*seq)
        kept = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in inputs)
        state = WindowState(t=0, windows=state.windows, pending=output, window_input=kept)
    else:
        for new, old in zip(inputs, state.window_input):
            if isinstance(new, torch.Tensor) and not (
                    new.shape == old.shape and torch.equal(new, old)):
                raise changed_input_error(what, state.t + 1, T, new, old, reset, sequence)
    t = state.t
    out = tree_map(lambda o: o[t] if isinstance(o, torch.Tensor) else o, state.pending)
    if t + 1 == T:
        return out, WindowState(windows=state.windows + 1)
    return out, replace(state, t=t + 1)


def delayed_step(x: torch.Tensor, state: WindowState, T: int,
                 integrate: Callable[[Any, torch.Tensor, int], Any],
                 fire: Callable[[Any], torch.Tensor], silence: Callable[[], torch.Tensor],
                 warmup: int = 0) -> tuple[torch.Tensor, WindowState]:
    """One call of a layer streaming with one window of delay.

    :param x: this step's input
    :param state: the state before the call
    :param T: the window length
    :param integrate: ``integrate(acc, x, t) -> acc``: add step ``t``'s input to what the window
        holds (``acc`` is ``None`` at ``t = 0``)
    :param fire: ``fire(acc) -> [T, ...]``: the window's output once it is complete (it draws
        the window's random numbers: called once per window, at its last step)
    :param silence: the output while no window has been fired yet (zeros of the output shape)
    :param warmup: windows after a reset that are integrated but not fired (their input is not
        valid yet: a layer behind ``d`` delayed layers); they draw no random numbers
    :return: ``(the previous window's output at this step, the new state)``
    """
    acc = integrate(state.acc, x, state.t)
    out = state.pending[state.t] if state.pending is not None else silence()
    if state.t + 1 < T:
        return out, replace(state, t=state.t + 1, acc=acc)
    pending = fire(acc) if state.windows >= warmup else None
    return out, WindowState(windows=state.windows + 1, pending=pending)


def delay_step(x: torch.Tensor, queue: tuple, steps: int) -> tuple[torch.Tensor, tuple]:
    """Delay a stream by ``steps`` calls (zeros until then): ``(output, new queue)``; the queue
    starts as ``()``. In delayed streaming a residual branch that passes fewer TPP layers is
    delayed by whole windows (``steps = windows·T``) so that branches meet in step."""
    queue = (*queue, x)
    if len(queue) > steps:
        return queue[0], queue[1:]
    return torch.zeros_like(x), queue
