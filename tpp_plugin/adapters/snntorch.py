r"""snnTorch adapter: :class:`TPP`, :class:`TemporalPermutation`, reset integration, converter.

Registering the plugin (``import tpp_plugin``, or ``tpp_plugin.registry.register('snntorch')``)
adds ``snntorch.TPP`` and ``snntorch.TemporalPermutation`` and wraps ``snntorch.utils.reset`` so
that it also resets the plugin's neurons anywhere in a network;
``tpp_plugin.registry.unregister('snntorch')`` undoes all three.

Two ways to run a TPP neuron, both drawing the same random numbers for the same seed:

* **time loop** (snnTorch's tutorial pattern), one step ``[B, ...]`` per call. The neuron needs
  a whole window before it fires, so its output is delayed by one window of ``num_steps`` steps;
  a network with ``L`` TPP layers needs :func:`steps_needed` ``= (L+1)·num_steps`` calls, and its
  valid output is that of the last ``num_steps`` calls.
* **sequence**, a whole ``[T, B, ...]`` input in one call (``TPP(..., sequence=True)`` or
  :meth:`TPP.forward_sequence`), without the delay.

All firing math is :mod:`tpp_plugin.functional`'s; this module only adapts state, shapes and
snnTorch's conventions.
"""

from __future__ import annotations

import copy
import math
import warnings
from numbers import Integral, Real

import snntorch
import snntorch.utils
import torch
from torch import nn

from .. import functional as F
from ..convert import calibrate_thresholds, check_calibration_mode
from ..qcfs import QCFS
from ..registry import NEURON_NAMES, current_default_neuron

__all__ = [
    "TPP",
    "IF",
    "TemporalPermutation",
    "TimeFlatten",
    "convert",
    "reset",
    "steps_needed",
    "install",
]


# ----------------------------------------------------------------------------------------------
# randomness: a seed or a generator, on the device of the data
# ----------------------------------------------------------------------------------------------
def _check_seed(seed, generator):
    F.check_seed(seed, generator)
    return torch.Generator().manual_seed(int(seed)) if seed is not None else generator


def _check_mem_argument(neuron, mem) -> None:
    """snnTorch's rule for an explicit ``mem`` argument; a sequence always starts afresh."""
    if mem is None:
        return
    if neuron.init_hidden:
        raise TypeError("`mem` should not be passed as an argument while `init_hidden=True`")
    if neuron.sequence:
        raise TypeError("`mem` cannot be passed in sequence mode: every sequence starts afresh")


def _returns(neuron, spk, mem):
    """snnTorch's return convention: ``(spk, mem)``, or ``spk`` alone with ``init_hidden``."""
    if neuron.output or not neuron.init_hidden:
        return spk, mem
    return spk


def _check_graded_spikes_factor(factor) -> None:
    """A finite number or a finite floating tensor (spikes are multiplied by it)."""
    if isinstance(factor, torch.Tensor):
        F.check_tensor(factor, "graded_spikes_factor")
        return
    if isinstance(factor, bool) or not isinstance(factor, Real):
        raise TypeError(
            f"graded_spikes_factor must be a finite number or tensor, got {type(factor).__name__}"
        )
    if not math.isfinite(factor):
        raise ValueError(f"graded_spikes_factor must be finite, got {factor}")


class _Seeded:
    """Mixin: ``self.seed``/``self.generator``; a seeded generator follows the data's device."""

    def manual_seed(self, seed: int) -> None:
        """Restart this module's random stream from ``seed`` (the same method as SpikingJelly's
        ``TPPNode.manual_seed``; a ``generator`` given at construction is dropped).

        :param seed: an int in ``[0, 2**64)``
        :raises TypeError: if ``seed`` is not an int (the state is then unchanged)
        :raises ValueError: if it is out of range (likewise)

        Example::

            >>> tpp = TPP(num_steps=4, sequence=True, init_hidden=True, seed=0)
            >>> x = torch.full((4, 1, 3), 0.3)
            >>> a = tpp(x); tpp.manual_seed(0); b = tpp(x)
            >>> torch.equal(a, b)
            True
        """
        seed = F.check_seed_value(seed)
        self.seed, self.generator = seed, torch.Generator().manual_seed(seed)

    def _generator_for(self, device: torch.device):
        g = self.generator
        if g is not None and self.seed is not None and g.device.type != device.type:
            # the stream restarts from the seed on the new device
            g = torch.Generator(device=device).manual_seed(self.seed)
            self.generator = g
        return g


# ----------------------------------------------------------------------------------------------
# the TPP neuron
# ----------------------------------------------------------------------------------------------
class TPP(_Seeded, snntorch.SpikingNeuron):
    r"""Two-phase probabilistic (TPP) neuron (Bojković, Wu, Gu, ICML 2025).

    Over a window of ``num_steps`` = :math:`T` inputs it first **accumulates** without spiking,

    .. math::

            V = V_{\rm init} + \sum_{t=1}^{T} I_{\rm in}[t],

    then **fires** :math:`T` steps: at step :math:`t` it spikes with probability
    :math:`p_t = {\rm clamp}(V / (U_{\rm thr}(T-t+1)), 0, 1)` and subtracts
    :math:`U_{\rm thr}` when it does. The spikes land at random times; when :math:`V` is
    :math:`k U_{\rm thr}` with whole :math:`0 \le k \le T` exactly :math:`k` of them fire, and
    in general about :math:`{\rm clamp}(V/U_{\rm thr}, 0, T)` on average (not exactly for a
    fractional :math:`V/U_{\rm thr}`: see :func:`tpp_plugin.functional.expected_count`).
    With ``count='exact'`` the potential is first rounded to
    :math:`U_{\rm thr}\,{\rm clamp}(\lfloor V/U_{\rm thr} + ½\rfloor, 0, T)`: the count is then
    deterministic (a network of such neurons computes exactly the QCFS ANN with :math:`L = T`)
    and only the spike times are random. Each window starts again from :math:`V_{\rm init}`.

    **Time loop** (default): one step per call. Calls :math:`1..T` accumulate the first window
    and output zeros; calls :math:`T+1..2T` emit that window's spikes while accumulating the
    next, and so on: the output is delayed by one window. A net of :math:`L` TPP layers needs
    :func:`steps_needed` :math:`= (L+1)T` steps (its valid output is the last :math:`T`).
    **Sequence** (``sequence=True``, or :meth:`forward_sequence`): a whole ``[k·T, B, ...]``
    input in one call, cut into :math:`k` windows, without the delay. For the same seed both
    give bit-identical spikes (the window's random numbers are drawn at the window boundary).

    The neuron is not differentiable (there is no surrogate gradient for its random firing);
    it is meant for converted networks (see :func:`convert`).

    Example::

        >>> import torch
        >>> import snntorch as snn
        >>> import tpp_plugin  # registers snn.TPP
        >>> num_steps = 4
        >>> lif = snn.TPP(threshold=1.0, num_steps=num_steps, seed=0)
        >>> cur = torch.full((2, 3), 0.5)            # Σ over a window = 2 thresholds
        >>> spk_rec = []
        >>> for step in range(2 * num_steps):        # one window delay
        ...     spk, mem = lif(cur)
        ...     spk_rec.append(spk)
        >>> torch.stack(spk_rec)[num_steps:].sum(0)  # 2 spikes per neuron (v = 2θ is whole)
        tensor([[2., 2., 2.],
                [2., 2., 2.]])
        >>> seq = snn.TPP(threshold=1.0, num_steps=num_steps, seed=0, sequence=True)
        >>> spk_seq, mem_seq = seq(cur.expand(num_steps, 2, 3))   # same spikes, no delay
        >>> torch.equal(spk_seq, torch.stack(spk_rec)[num_steps:])
        True

    :param threshold: firing threshold :math:`U_{\rm thr}` (> 0); a number or a tensor
        broadcastable to the input's shape. Defaults to 1
    :type threshold: float or torch.Tensor, optional

    :param num_steps: the window length :math:`T` (>= 1). Required
    :type num_steps: int

    :param count: ``'bernoulli'`` (the paper's rule) or ``'exact'``. Defaults to ``'bernoulli'``
    :type count: str, optional

    :param v_init: potential each window starts from. Defaults to 0 — the paper's rule;
        :math:`U_{\rm thr}/2` over-fires by about half a spike per neuron
    :type v_init: float or torch.Tensor, optional

    :param sequence: If `True`, :meth:`forward` takes whole sequences ``[T, B, ...]`` (as
        :meth:`forward_sequence`). Defaults to False (one time step per call)
    :type sequence: bool, optional

    :param init_hidden: Instantiates state variables as instance variables (the only state
        there is: ``mem`` may be passed but is not needed). Defaults to False
    :type init_hidden: bool, optional

    :param output: If `True` as well as `init_hidden=True`, states are returned when neuron is
        called. Defaults to False
    :type output: bool, optional

    :param graded_spikes_factor: output spikes are scaled by this value (the converter sets it
        to the threshold). Defaults to 1.0
    :type graded_spikes_factor: float or torch.Tensor, optional

    :param learn_graded_spikes_factor: Option to enable a learnable graded spikes factor.
        Defaults to False
    :type learn_graded_spikes_factor: bool, optional

    :param seed: seed of the neuron's own ``torch.Generator`` (re-created on the input's
        device if that changes). Defaults to None (torch's global generator)
    :type seed: int, optional

    :param generator: a ``torch.Generator`` on the input's device to draw from, instead of
        ``seed``. Defaults to None
    :type generator: torch.Generator, optional

    :param warmup_windows: time loop only: after a reset, accumulate this many windows without
        firing (and without drawing random numbers). A layer behind ``d`` TPP layers receives
        only zeros (or bias) for its first ``d`` windows; :func:`convert` sets ``d`` so that a
        time-loop net fires no spurious warm-up spikes and draws exactly the random numbers of
        the same net in sequence mode. Defaults to 0
    :type warmup_windows: int, optional

    Inputs: \input_, mem
        - **input_** of shape `(batch, ...)` (time loop) or `(k·num_steps, batch, ...)`
          (sequence): input current, finite floating point.
        - **mem** (time loop, `init_hidden=False` only; optional): the potential returned by the
          previous call. Ignored at a window boundary (a new window starts from `v_init`);
          within a window a different tensor replaces the potential accumulated so far.

    Outputs: spk, mem
        - **spk** of the input's shape: spikes (0 or `graded_spikes_factor`). In the time loop
          these belong to the previous window (zeros during the first).
        - **mem** of the input's shape: the potential *being accumulated* — `v_init` plus the
          current window's inputs so far, this step's included (in sequence mode, one such value
          per step). It is not the potential that produced `spk`.

    Returned as snnTorch neurons do: `init_hidden=False` → `(spk, mem)`; `init_hidden=True` →
    `spk`, or `(spk, mem)` with `output=True`.

    State (non-persistent buffers, so it follows ``.to()`` and stays out of ``state_dict``):
    ``mem``, ``pending`` (spikes of the last full window, to be emitted), the position in the
    window and the number of windows since the last reset. Clear it with :meth:`reset_mem`,
    :meth:`reset_hidden` or ``snntorch.utils.reset``.
    """

    def __init__(
        self,
        threshold=1.0,
        *,
        num_steps: int,
        count: str = "bernoulli",
        v_init=0.0,
        sequence: bool = False,
        init_hidden: bool = False,
        output: bool = False,
        graded_spikes_factor=1.0,
        learn_graded_spikes_factor: bool = False,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        warmup_windows: int = 0,
    ):
        # validate everything before SpikingNeuron.__init__ registers the instance
        num_steps = F.check_window(num_steps, "num_steps")
        F.check_count(count)
        threshold = F.check_threshold(threshold)
        if isinstance(v_init, torch.Tensor):
            F.check_tensor(v_init, "v_init")
        elif isinstance(v_init, bool) or not isinstance(v_init, Real) or not math.isfinite(v_init):
            raise TypeError(f"v_init must be a finite number or tensor, got {v_init!r}")
        gen = _check_seed(seed, generator)
        if isinstance(warmup_windows, bool) or not isinstance(warmup_windows, Integral) or (
            warmup_windows < 0
        ):
            raise ValueError(f"warmup_windows must be an int >= 0, got {warmup_windows!r}")
        _check_graded_spikes_factor(graded_spikes_factor)
        super().__init__(
            threshold=threshold,
            surrogate_disable=True,  # no surrogate gradient: firing is random
            init_hidden=init_hidden,
            output=output,
            graded_spikes_factor=graded_spikes_factor,
            learn_graded_spikes_factor=learn_graded_spikes_factor,
        )
        self.num_steps = num_steps
        self.count = count
        self.sequence = bool(sequence)
        self.seed = None if seed is None else int(seed)
        self.generator = gen
        self.warmup_windows = int(warmup_windows)
        self.register_buffer("v_init", torch.as_tensor(v_init).detach().clone())
        self.register_buffer("mem", torch.zeros(0), persistent=False)
        self.register_buffer("pending", torch.zeros(0), persistent=False)
        self._step = 0  # position in the current window
        self._window = 0  # windows completed since the last reset

    # -- state ---------------------------------------------------------------------------------
    def reset_mem(self):
        """Clear the state (window potential, pending spikes, position in the window).

        :return: the (zeroed) membrane potential ``mem``
        """
        self.mem = torch.zeros_like(self.mem)
        self.pending = self.pending.new_zeros(0)
        self._step = self._window = 0
        return self.mem

    def init_tpp(self):
        """Alias of :meth:`reset_mem`, after snnTorch's ``init_leaky``."""
        return self.reset_mem()

    @classmethod
    def reset_hidden(cls):
        """Clear the state of every :class:`TPP` instance (snnTorch's class-wide reset)."""
        for neuron in cls.instances:
            if isinstance(neuron, cls):
                neuron.reset_mem()

    @classmethod
    def detach_hidden(cls):
        """Detach the potential of every :class:`TPP` instance from the current graph."""
        for neuron in cls.instances:
            if isinstance(neuron, cls):
                neuron.mem = neuron.mem.detach()

    # -- forward -------------------------------------------------------------------------------
    def forward(self, input_, mem=None):
        _check_mem_argument(self, mem)
        if self.sequence:
            return _returns(self, *self._sequence(input_, "input_"))
        return _returns(self, *self._step_forward(input_, mem))

    def forward_sequence(self, x_seq):
        r"""Run a whole sequence ``[k·num_steps, B, ...]`` (``k`` windows) in one call.

        Independent of the time-loop state (which it leaves untouched); returns as
        :meth:`forward`, with ``spk`` and ``mem`` of shape ``[k·num_steps, B, ...]``.

        Example::

            >>> tpp = TPP(num_steps=4, count='exact', init_hidden=True, seed=0)
            >>> tpp.forward_sequence(torch.full((4, 1), 0.5)).sum(0)
            tensor([2.])
        """
        return _returns(self, *self._sequence(x_seq, "x_seq"))

    def _fire(self, v):
        generator = self._generator_for(v.device)
        return F.tpp_fire(v, self.num_steps, self.threshold, self.count, generator)

    def _step_forward(self, input_, mem):
        F.check_tensor(input_, "input_", min_dim=1)
        step, shape = self._step, input_.shape
        if step > 0 and self.mem.shape != shape:
            raise ValueError(
                f"input_ has shape {tuple(shape)} but the current window was accumulated with "
                f"shape {tuple(self.mem.shape)}; call reset_mem() (or snntorch.utils.reset) "
                "before changing the input shape"
            )
        has_pending = self.pending.dim() > 1
        if has_pending and self.pending.shape[1:] != shape:
            raise ValueError(
                f"input_ has shape {tuple(shape)} but the spikes still to be emitted have shape "
                f"{tuple(self.pending.shape[1:])}; call reset_mem() (or snntorch.utils.reset) "
                "before changing the input shape"
            )
        if isinstance(self.threshold, torch.Tensor) and self.threshold.dim():
            F.check_broadcast(self.threshold, shape)
        base = self.mem
        if mem is not None and step > 0 and mem is not self.mem:
            F.check_tensor(mem, "mem")
            if mem.shape != shape:
                raise ValueError(
                    f"mem has shape {tuple(mem.shape)}, expected input_'s {tuple(shape)}"
                )
            base = mem
        # phase 1, one step (the same additions, in the same order, as functional.tpp_accumulate)
        new_mem = input_ + self.v_init if step == 0 else base + input_
        F.check_window_sum(new_mem, input_.dtype, "input_")
        spk = self.pending[step] if has_pending else torch.zeros_like(new_mem)
        step, window, pending = step + 1, self._window, self.pending
        if step == self.num_steps:  # window complete: draw all its random numbers, fire
            if window < self.warmup_windows:  # input not valid yet: stay silent, draw nothing
                pending = pending.new_zeros(0)
            else:
                pending = self._fire(new_mem)
            step, window = 0, window + 1
        # commit the state only now, so that a failure above leaves it unchanged
        self.mem, self.pending, self._step, self._window = new_mem, pending, step, window
        return spk * self.graded_spikes_factor, new_mem

    def _sequence(self, x_seq, name):
        T = self.num_steps
        F.check_tensor(x_seq, name, min_dim=2)
        if x_seq.shape[0] == 0 or x_seq.shape[0] % T:
            raise ValueError(
                f"{name} has {x_seq.shape[0]} time steps, which is not a positive multiple of "
                f"the window num_steps={T}"
            )
        if isinstance(self.threshold, torch.Tensor) and self.threshold.dim():
            F.check_broadcast(self.threshold, x_seq.shape[1:])
        # every window is accumulated and checked before the first one draws random numbers
        potentials, mems = [], []
        for start in range(0, x_seq.shape[0], T):
            v = x_seq[start] + self.v_init
            mems.append(v)
            for t in range(start + 1, start + T):
                v = v + x_seq[t]
                mems.append(v)
            potentials.append(F.check_window_sum(v, x_seq.dtype, name))
        spikes = [self._fire(v) for v in potentials]
        return torch.cat(spikes) * self.graded_spikes_factor, torch.stack(mems)

    def extra_repr(self) -> str:
        th = self.threshold
        th = f"{float(th):.4g}" if th.dim() == 0 else f"tensor{tuple(th.shape)}"
        return (
            f"threshold={th}, num_steps={self.num_steps}, count={self.count!r}, "
            f"sequence={self.sequence}, init_hidden={self.init_hidden}"
        )


# ----------------------------------------------------------------------------------------------
# an IF neuron that starts at θ/2 (the converter's baseline)
# ----------------------------------------------------------------------------------------------
class IF(snntorch.Leaky):
    r"""Integrate-and-fire neuron starting at half the threshold: ``snn.Leaky`` with
    ``beta=1``, ``reset_mechanism='subtract'`` and initial potential :math:`U_{\rm thr}/2`.

    The half-threshold start is the usual fix for rate-coded conversion (a plain IF starting at
    0 under-fires by half a spike). It survives every snnTorch reset (``snntorch.utils.reset``,
    ``Leaky.reset_hidden``, :meth:`reset_mem`) because the stored state ``self.mem`` is the
    potential *relative to the start*, :math:`U - U_{\rm thr}/2`, whose reset value is snnTorch's
    zero; the neuron fires when :math:`U > U_{\rm thr}`. ``mem`` passed in and returned is the
    membrane potential :math:`U` itself. NIR export sees a plain ``Leaky`` and drops the offset.

    ``sequence=True`` makes :meth:`forward` take a whole ``[T, B, ...]`` sequence, starting from
    :math:`U_{\rm thr}/2` and leaving the time-loop state untouched.

    Example::

        >>> lif = IF(threshold=1.0, init_hidden=True)
        >>> [float(lif(torch.tensor([0.25]))) for _ in range(4)]   # U: .75, 1.0, 1.25 → spike
        [0.0, 0.0, 1.0, 0.0]

    :param threshold: firing threshold :math:`U_{\rm thr}` (> 0). Defaults to 1
    :param sequence: take ``[T, B, ...]`` sequences. Defaults to False
    :param kwargs: ``spike_grad``, ``surrogate_disable``, ``init_hidden``, ``learn_threshold``,
        ``output``, ``graded_spikes_factor``, ``learn_graded_spikes_factor``, as ``snn.Leaky``
    """

    def __init__(
        self,
        threshold=1.0,
        *,
        sequence: bool = False,
        spike_grad=None,
        surrogate_disable: bool = False,
        init_hidden: bool = False,
        learn_threshold: bool = False,
        output: bool = False,
        graded_spikes_factor=1.0,
        learn_graded_spikes_factor: bool = False,
    ):
        threshold = F.check_threshold(threshold)
        _check_graded_spikes_factor(graded_spikes_factor)
        super().__init__(
            beta=1.0,
            threshold=threshold,
            spike_grad=spike_grad,
            surrogate_disable=surrogate_disable,
            init_hidden=init_hidden,
            learn_threshold=learn_threshold,
            reset_mechanism="subtract",
            output=output,
            graded_spikes_factor=graded_spikes_factor,
            learn_graded_spikes_factor=learn_graded_spikes_factor,
        )
        self.sequence = bool(sequence)
        self._mem_out = None  # the potential last returned, to take it back without rounding

    def _offset(self):
        return self.threshold / 2

    def extra_repr(self) -> str:
        th = self.threshold
        th = f"{float(th):.4g}" if th.dim() == 0 else f"tensor{tuple(th.shape)}"
        return f"threshold={th}, v_start=threshold/2, sequence={self.sequence}"

    def fire(self, mem):
        return super().fire(mem + self._offset())

    def mem_reset(self, mem):
        return super().mem_reset(mem + self._offset())

    def reset_mem(self):
        """Reset the potential to :math:`U_{\\rm thr}/2` and return it."""
        self._mem_out = super().reset_mem() + self._offset()
        return self._mem_out

    def forward(self, input_, mem=None):
        _check_mem_argument(self, mem)
        if self.sequence:
            F.check_tensor(input_, "input_", min_dim=2, finite=False)
            if input_.shape[0] == 0:
                raise ValueError(
                    f"input_ has an empty time dimension (shape {tuple(input_.shape)}); "
                    "sequence mode needs [T, B, ...] with T >= 1"
                )
            saved = self.mem, self._mem_out
            self.mem = self.mem.new_zeros(0)
            try:
                steps = [self._step_forward(x, None) for x in input_]
            finally:
                self.mem, self._mem_out = saved
            spk, mem = (torch.stack(s) for s in zip(*steps))
        else:
            spk, mem = self._step_forward(input_, mem)
        return _returns(self, spk, mem)

    def _step_forward(self, input_, mem):
        if mem is not None:
            mem = None if mem is self._mem_out else mem - self._offset()
        out = super().forward(input_, mem)
        spk = out[0] if isinstance(out, tuple) else out
        self._mem_out = self.mem + self._offset()
        return spk, self._mem_out


# ----------------------------------------------------------------------------------------------
# temporal permutation, time-flattening wrapper
# ----------------------------------------------------------------------------------------------
class TemporalPermutation(_Seeded, nn.Module):
    r"""Randomly rearrange each spike train along time; every neuron keeps its spike count.

    Placed after IF neurons this is the paper's "temporal misalignment" experiment. Works on
    whole sequences only (it needs the full window).

    Example::

        >>> perm = TemporalPermutation(scope='neuron', seed=0)
        >>> spk_seq = torch.tensor([[1.], [1.], [0.], [0.]])   # [T, N]
        >>> perm(spk_seq).sum(0)
        tensor([2.])

    :param scope: ``'neuron'`` — an independent permutation per neuron (default); ``'sample'`` —
        one per sample (dim 1); ``'layer'`` — one for the whole tensor
    :type scope: str, optional
    :param seed: seed of the module's own ``torch.Generator``. Defaults to None
    :type seed: int, optional
    :param generator: a ``torch.Generator`` to draw from instead. Defaults to None
    :type generator: torch.Generator, optional

    Inputs: x_seq
        - **x_seq** of shape `(T, batch, ...)`: spike trains (or any values).

    Outputs: out
        - **out** of the same shape: ``x_seq`` permuted along dim 0.
    """

    def __init__(self, scope: str = "neuron", seed: int | None = None, generator=None):
        F.check_scope(scope)
        gen = _check_seed(seed, generator)
        super().__init__()
        self.scope = scope
        self.seed = None if seed is None else int(seed)
        self.generator = gen

    def forward(self, x_seq):
        # floating, finite, [T, ...] with T >= 1: the same inputs SpikingJelly's version accepts
        F.check_tensor(x_seq, "x_seq", min_dim=2 if self.scope == "sample" else 1)
        if x_seq.shape[0] == 0:
            raise ValueError(
                f"x_seq has an empty time dimension (shape {tuple(x_seq.shape)}); it needs "
                "[T, N, ...] with T >= 1"
            )
        return F.permute_time(x_seq, self.scope, self._generator_for(x_seq.device))

    def extra_repr(self) -> str:
        return f"scope={self.scope!r}"


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


# ----------------------------------------------------------------------------------------------
# resets, steps
# ----------------------------------------------------------------------------------------------
def _reset_plugin_modules(net: nn.Module) -> None:
    for module in net.modules():
        if isinstance(module, (TPP, IF)):
            module.reset_mem()


def _wrap_reset(original):
    def reset(net):
        result = original(net)
        _reset_plugin_modules(net)
        return result

    return reset


def reset(net: nn.Module) -> None:
    """``snntorch.utils.reset(net)``, plus a reset of every plugin neuron (:class:`TPP`,
    :class:`IF`) anywhere in ``net`` — nested containers included — registered or not.

    Example::

        reset(net)                       # before each new batch in a time loop
    """
    snntorch.utils.reset(net)
    _reset_plugin_modules(net)


def steps_needed(net: nn.Module, num_steps: int | None = None) -> int:
    """Time-loop calls a net needs to output one full window: ``(L+1)·num_steps`` for ``L``
    TPP layers (each delays by one window); its valid output is the last ``num_steps`` calls.

    :param net: the network (a single neuron works too)
    :param num_steps: the window length; defaults to the TPP layers' ``num_steps`` (which must
        agree)
    :return: the number of time steps to run

    Example::

        for step in range(steps_needed(net, num_steps)):
            spk_rec.append(net(x))
        spk_out = torch.stack(spk_rec[-num_steps:])
    """
    layers = [m for m in net.modules() if isinstance(m, TPP) and not m.sequence]
    if num_steps is None:
        windows = {m.num_steps for m in layers}
        if len(windows) != 1:
            why = f"TPP windows differ: {windows}" if windows else "net has no time-loop TPP layer"
            raise ValueError(f"num_steps must be given: {why}")
        num_steps = windows.pop()
    num_steps = F.check_window(num_steps, "num_steps")
    return (len(layers) + 1) * num_steps


# ----------------------------------------------------------------------------------------------
# ANN → snnTorch conversion
# ----------------------------------------------------------------------------------------------
_LAYERS = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d, nn.Flatten, nn.Unflatten, nn.Identity,
)
_MAX_POOLS = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_ACTIVATIONS = (nn.ReLU, QCFS)
_RESERVED = (
    "threshold", "num_steps", "init_hidden", "output", "graded_spikes_factor", "sequence",
    "warmup_windows",
)


def _leaves(module: nn.Module, prefix: str = ""):
    for name, child in module.named_children():
        path = f"{prefix}{name}"
        if isinstance(child, nn.Sequential):
            yield from _leaves(child, path + ".")
        else:
            yield path, child


def _type_name(module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def convert(
    ann: nn.Module,
    calibration=None,
    *,
    num_steps: int,
    neuron: str | None = None,
    mode="max",
    momentum: float = 0.1,
    sequence: bool = True,
    permutation: str | None = None,
    **neuron_kwargs,
) -> nn.Sequential:
    r"""Convert a ReLU or QCFS ``nn.Sequential`` ANN into an snnTorch network.

    Every activation becomes a spiking neuron with threshold :math:`θ` — the activation's
    calibrated maximum for ``nn.ReLU`` (from ``calibration`` data), :math:`λ` for
    :class:`tpp_plugin.QCFS` — whose spikes are scaled by :math:`θ`
    (``graded_spikes_factor=θ``), so the next layer sees :math:`θ·s_t` and a neuron firing
    :math:`n` times in :math:`T` steps stands for the activation :math:`θn/T`. The layers between
    activations are deep copies of the ANN's, in eval mode; dropout is dropped. Feed the image
    as a constant input current at every step; the output layer's values summed (or averaged)
    over the window are the logits.

    :param ann: an ``nn.Sequential`` (nested ``nn.Sequential`` allowed) of ``Linear``,
        ``Conv1d/2d/3d``, ``BatchNorm1d/2d/3d``, average pooling, ``Flatten``, ``Unflatten``,
        ``Identity``, ``Dropout`` and max pooling (not affine on spikes: docs/design.md §4; warned
        for TPP), with ``nn.ReLU`` or ``QCFS`` activations
    :type ann: torch.nn.Sequential
    :param calibration: iterable of batches (tensors or ``(x, y)``) to calibrate ReLU
        thresholds; required if the ANN has any ``nn.ReLU``
    :param num_steps: the window length :math:`T`
    :type num_steps: int
    :param neuron: ``'tpp'`` (:class:`TPP`) or ``'if'`` (:class:`IF`: ``snn.Leaky(beta=1,
        reset_mechanism='subtract')`` starting at :math:`θ/2`). Defaults to the active
        :func:`tpp_plugin.registry.default_neuron` (whose arguments then come first in
        ``neuron_kwargs``), else ``'tpp'``
    :param mode: ReLU threshold statistic: ``'max'``, a percentile like ``'99.9%'``, or a
        fraction of the max. Defaults to ``'max'``
    :param momentum: moving-average momentum of the statistic across batches
    :param sequence: If `True` (default) the net takes whole sequences ``[T, B, ...]`` (layers
        wrapped in :class:`TimeFlatten`, neurons in sequence mode); if `False` it takes one time
        step ``[B, ...]`` per call (snnTorch's time loop; run :func:`steps_needed` steps and
        read the last ``num_steps``: TPP layers stay silent until their input is valid, and
        draw the same random numbers as in sequence mode)
    :param permutation: add a :class:`TemporalPermutation` of this scope after every neuron
        (sequence mode only). Defaults to None
    :param neuron_kwargs: more arguments of the neuron, e.g. ``count='exact'``, ``seed=0``
        (each TPP layer and permutation gets its own seed drawn from it) or ``generator``
    :return: the spiking network, in eval mode, on the ANN's device and dtype
    :rtype: torch.nn.Sequential

    Example::

        import snntorch.functional as SF
        from tpp_plugin.adapters.snntorch import convert, steps_needed

        num_steps = 4
        snn_net = convert(ann, calibration=train_loader, num_steps=num_steps, mode='99.9%')
        with torch.no_grad():
            out = snn_net(images.expand(num_steps, *images.shape))  # [T, B, classes]
        acc = SF.accuracy_rate(out, labels)
    """
    if not isinstance(ann, nn.Sequential):
        raise TypeError(
            f"convert needs an nn.Sequential model (nested nn.Sequential allowed), got "
            f"{_type_name(ann)}"
        )
    num_steps = F.check_window(num_steps, "num_steps")
    if neuron is None:
        default = current_default_neuron()
        neuron, default_kwargs = default if default is not None else ("tpp", {})
        neuron_kwargs = {**default_kwargs, **neuron_kwargs}
    if neuron not in NEURON_NAMES:
        raise ValueError(f"neuron must be 'tpp' or 'if', got {neuron!r}")
    if permutation is not None:
        F.check_scope(permutation)
        if not sequence:
            raise ValueError("permutation needs sequence=True (it permutes whole windows)")
    for key in _RESERVED:
        if key in neuron_kwargs:
            raise TypeError(f"convert sets the neuron's {key!r} itself; do not pass it")
    seed = neuron_kwargs.pop("seed", None)
    generator = neuron_kwargs.pop("generator", None)
    _check_seed(seed, generator)
    mode = check_calibration_mode(mode)

    leaves = list(_leaves(ann))
    for name, module in leaves:
        if not isinstance(module, _LAYERS + _MAX_POOLS + _DROPOUTS + _ACTIVATIONS):
            raise TypeError(
                f"convert: cannot convert module {name!r} of type {_type_name(module)}; supported: "
                "Linear, Conv1d/2d/3d, BatchNorm1d/2d/3d, (Adaptive)AvgPool, (Adaptive)MaxPool, "
                "Flatten, Unflatten, Identity, Dropout, and nn.ReLU / tpp_plugin.QCFS activations"
            )
        if isinstance(module, _MAX_POOLS) and neuron == "tpp":
            warnings.warn(
                f"convert: max pooling ({name!r}) acts on spikes, not on counts: the TPP network "
                "no longer computes the ANN's max (docs/design.md §4); prefer average pooling",
                UserWarning,
                stacklevel=2,
            )
    activations = [m for _, m in leaves if isinstance(m, _ACTIVATIONS)]
    relus = [m for m in activations if isinstance(m, nn.ReLU)]
    thresholds = {}
    if relus:
        if calibration is None:
            raise ValueError(
                "convert: the ANN has nn.ReLU activations, whose thresholds come from "
                "calibration data: pass calibration=<data loader> (or train with tpp_plugin.QCFS)"
            )
        values = calibrate_thresholds(ann, calibration, relus, mode, momentum)
        thresholds = {id(m): th for m, th in zip(relus, values)}

    ref = next(iter(ann.parameters()), None)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    n_random = len(activations) * (2 if permutation else 1)
    seeds = iter(
        torch.randint(2**62, (n_random,), generator=torch.Generator().manual_seed(seed)).tolist()
        if seed is not None
        else [None] * n_random
    )

    def random_source():  # one seed per random layer, drawn from `seed`; or the shared generator
        return dict(seed=next(seeds), generator=generator)

    layers, depth = [], 0
    for _, module in leaves:
        if isinstance(module, _DROPOUTS):
            continue
        if not isinstance(module, _ACTIVATIONS):
            layer = copy.deepcopy(module).eval()
            layers.append(TimeFlatten(layer) if sequence else layer)
            continue
        theta = thresholds[id(module)] if isinstance(module, nn.ReLU) else module.threshold
        theta = torch.tensor(theta, dtype=dtype, device=device)
        common = dict(threshold=theta, graded_spikes_factor=theta.clone(), init_hidden=True)
        if neuron == "tpp":
            # time loop: the layer behind `depth` TPP layers sees valid input from window depth+1
            cell = TPP(num_steps=num_steps, sequence=sequence, warmup_windows=0 if sequence
                       else depth, **common, **random_source(), **neuron_kwargs)
            depth += 1
        else:
            next(seeds)
            cell = IF(sequence=sequence, **common, **neuron_kwargs)
        layers.append(cell.to(device=device, dtype=dtype))
        if permutation:
            layers.append(TemporalPermutation(permutation, **random_source()))
    return nn.Sequential(*layers).eval()


# ----------------------------------------------------------------------------------------------
# registration
# ----------------------------------------------------------------------------------------------
def install(patcher) -> None:
    """Add ``snntorch.TPP`` and ``snntorch.TemporalPermutation``; wrap ``snntorch.utils.reset``
    so it also resets plugin neurons anywhere in a net. Undone by ``patcher.undo()``."""
    if not callable(getattr(snntorch.utils, "reset", None)):
        raise RuntimeError("this snnTorch has no snntorch.utils.reset; tpp_plugin needs >= 0.7")
    patcher.add(snntorch, "TPP", TPP)
    patcher.add(snntorch, "TemporalPermutation", TemporalPermutation)
    patcher.wrap(snntorch.utils, "reset", _wrap_reset)
