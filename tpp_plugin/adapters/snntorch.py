r"""snnTorch adapter: :class:`TPP`, :class:`TemporalPermutation`, reset integration, converter.

Registering the plugin (``import tpp_plugin``, or ``tpp_plugin.registry.register('snntorch')``)
adds ``snntorch.TPP`` and ``snntorch.TemporalPermutation`` and wraps ``snntorch.utils.reset`` so
that it also resets the plugin's neurons anywhere in a network;
``tpp_plugin.registry.unregister('snntorch')`` undoes all three.

Two ways to run a TPP neuron, both drawing the same random numbers for the same seed:

* **time loop** (snnTorch's tutorial pattern), one step ``[B, ...]`` per call. The neuron needs
  a whole window before it fires, so its output is delayed by one window of ``num_steps`` steps;
  a network with ``L`` TPP layers on its longest path needs :func:`steps_needed`
  ``= (L+1)·num_steps`` calls, and its valid output is that of the last ``num_steps`` calls.
* **sequence**, a whole ``[T, B, ...]`` input in one call (``TPP(..., sequence=True)`` or
  :meth:`TPP.forward_sequence`), without the delay.

All firing math is :mod:`tpp_plugin.functional`'s (``backend='torch'``) or the CUDA window
kernel's of :mod:`tpp_plugin.kernels.cupy` (``backend='cupy'``, the kernel SpikingJelly's
``TPPNode(backend='cupy')`` runs); this module only adapts state, shapes and snnTorch's
conventions.
"""

from __future__ import annotations

import copy
import functools
import importlib
import importlib.util
import inspect
import math
import sys
from collections import deque
from numbers import Integral, Real

import snntorch
import snntorch.utils
import torch
from torch import fx, nn

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


def _refuse_surrogate(spike_grad, surrogate_disable) -> None:
    """TPP fires at random from a whole window: there is no surrogate gradient to select."""
    if spike_grad is not None or surrogate_disable is False:
        what = "spike_grad" if spike_grad is not None else "surrogate_disable=False"
        raise TypeError(
            f"TPP does not take {what}: it is an inference neuron for converted networks, with no "
            "surrogate gradient (its spikes are drawn at random from a whole window's potential); "
            "train the ANN (e.g. with tpp_plugin.QCFS) and convert it, or use snn.Leaky to train"
        )


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


#: implementations of the TPP neuron's firing phase (as SpikingJelly's ``TPPNode.backend``)
BACKENDS = ("torch", "cupy")


def _check_backend(backend) -> str:
    """``'torch'`` or ``'cupy'``; ``'cupy'`` needs CuPy and NVRTC (checked now, with the install
    command in the error)."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "cupy":
        from ..kernels.cupy import load_nvrtc

        load_nvrtc()  # ImportError with the install command if CuPy/NVRTC is missing
    return backend


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
        self._philox = None  # the 'cupy' backend's stream restarts from the seed too

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

        pooled = snn.TPP(num_steps=num_steps, count='exact', pool=nn.MaxPool2d(2),
                         sequence=True, init_hidden=True)
        pooled(torch.rand(num_steps, 1, 3, 8, 8)).shape       # [4, 1, 3, 4, 4]

    :param threshold: firing threshold :math:`U_{\rm thr}` (> 0); a number or a tensor
        broadcastable to the input's shape. Defaults to 1
    :type threshold: float or torch.Tensor, optional

    :param num_steps: the window length :math:`T` (>= 1). Required
    :type num_steps: int

    :param count: ``'bernoulli'`` (the paper's rule), ``'exact'`` or ``'unbiased'`` (``floor(w)``
        spikes plus one with probability ``frac(w)``: mean exactly ``clamp(w, 0, T)``).
        Defaults to ``'bernoulli'``
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

    :param pool: a pooling module applied to the *window potential* before firing, e.g.
        ``nn.MaxPool2d(2)``: the neuron accumulates :math:`V` of the input's shape, fires from
        ``pool(V)`` and its spikes have the pooled shape. With a max-pool this is the exact
        spiking form of ``ReLU → MaxPool`` (rounding to whole thresholds is monotone, so it
        commutes with the max); :func:`convert` sets it. Defaults to None
    :type pool: torch.nn.Module, optional

    :param backend: ``'torch'`` (default; any device) or ``'cupy'``: the firing phase runs in
        the CUDA window kernel of :mod:`tpp_plugin.kernels.cupy` (the one SpikingJelly's
        ``TPPNode(backend='cupy')`` runs) — in sequence mode one launch for all windows of a
        call, in the time loop one per completed window. It needs CuPy and CUDA input. The
        accumulation, ``pool``, ``v_init``, the checks and ``w = V/U_thr`` stay torch's (the
        kernel gets ``w`` and a threshold of 1), so every threshold works (per-channel too) and
        ``count='exact'`` gives the torch backend's counts neuron for neuron. The kernel draws
        from its own Philox stream (seeded by ``seed``; each window takes the next counter, so
        the time loop and sequence mode still give the same spikes): bernoulli and unbiased
        counts agree with the torch backend's in distribution, not draw for draw. 16-bit inputs
        fire from a float32 ``w`` (as on the torch backend) and their spikes are cast back.
        Defaults to ``'torch'``
    :type backend: str, optional

    :param spike_grad: refused: TPP has no surrogate gradient (nor ``surrogate_disable=False``)

    Inputs: \input_, mem
        - **input_** of shape `(batch, ...)` (time loop) or `(k·num_steps, batch, ...)`
          (sequence): input current, finite floating point.
        - **mem** (time loop, `init_hidden=False` only; optional): the potential returned by the
          previous call. Ignored at a window boundary (a new window starts from `v_init`);
          within a window a different tensor replaces the potential accumulated so far.

    Outputs: spk, mem
        - **spk** of the input's shape (pooled, with ``pool``): spikes (0 or
          `graded_spikes_factor`). In the time loop these belong to the previous window (zeros
          during the first).
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
        pool: nn.Module | None = None,
        backend: str = "torch",
        spike_grad=None,
        surrogate_disable=None,
    ):
        # validate everything before SpikingNeuron.__init__ registers the instance
        _refuse_surrogate(spike_grad, surrogate_disable)
        backend = _check_backend(backend)
        if pool is not None and not isinstance(pool, nn.Module):
            raise TypeError(f"pool must be an nn.Module (e.g. nn.MaxPool2d(2)) or None, got "
                            f"{type(pool).__name__}")
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
        self.pool = pool  # pools the window potential before firing (see the class docstring)
        self._philox = None  # the 'cupy' backend's random stream (created on first use)
        self._tpp_backend = backend
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

    # -- backend -------------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        """``'torch'`` or ``'cupy'`` (see the class docstring); may be set on a built network."""
        return self._tpp_backend

    @backend.setter
    def backend(self, value: str):
        self._tpp_backend = _check_backend(value)

    def _check_cupy_input(self, x: torch.Tensor, name: str) -> None:
        """The ``'cupy'`` backend's refusal of a non-CUDA input (or a dtype the kernel lacks),
        before any state changes or random numbers are drawn."""
        from ..kernels import cupy as kernels

        kernels.check_cuda_tensor(x, name, kernels.SUPPORTED_DTYPES)

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

    def _fire(self, v, T: int | None = None):
        """Phase 2 of one window: spikes ``[T, *pooled shape]`` from the potential ``v``."""
        if self.pool is not None:
            v = self.pool(v)
        T = self.num_steps if T is None else T
        if self.backend == "cupy":
            return self._fire_cupy(v.unsqueeze(0), T)
        generator = self._generator_for(v.device)
        return F.tpp_fire(v, T, self.threshold, self.count, generator)

    def _fire_cupy(self, potentials: torch.Tensor, T: int) -> torch.Tensor:
        """Phase 2 of ``k`` windows, ``potentials`` ``[k, *shape]`` (pooled, ``v_init``
        included), in one launch of the window kernel: spikes ``[k·T, *shape]``.

        ``w = v/θ`` is the torch backend's own (:func:`tpp_plugin.functional.tpp_fire` computes
        it the same way: float32 for 16-bit ``v``), so the kernel fires ``w`` with ``θ = 1``:
        ``w·1`` is exact, every threshold shape works, and exact counts match neuron for neuron.
        """
        from ..kernels import cupy as kernels

        F.check_threshold(self.threshold, shape=potentials.shape[1:])
        rdtype = F._random_dtype(potentials.dtype)
        w = F._potential_in_thresholds(potentials, T, self.threshold, "bernoulli", rdtype)
        spikes = kernels.tpp_window(w, T, 1.0, self.count, kernels.module_stream(self), steps_in=1)
        return spikes.to(potentials.dtype)

    def _step_forward(self, input_, mem):
        F.check_tensor(input_, "input_", min_dim=1)
        if self.backend == "cupy":
            self._check_cupy_input(input_, "input_")
        step, shape = self._step, input_.shape
        if step > 0 and self.mem.shape != shape:
            raise ValueError(
                f"input_ has shape {tuple(shape)} but the current window was accumulated with "
                f"shape {tuple(self.mem.shape)}; call reset_mem() (or snntorch.utils.reset) "
                "before changing the input shape"
            )
        has_pending = self.pending.dim() > 1
        if has_pending and self.pending.shape[1:] != self._fired_shape(shape):
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
        spk = self.pending[step] if has_pending else new_mem.new_zeros(self._fired_shape(shape))
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
        if self.backend == "cupy":
            self._check_cupy_input(x_seq, name)
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
        if self.backend == "cupy":  # every window in one kernel launch
            if self.pool is not None:
                potentials = [self.pool(v) for v in potentials]
            spikes = self._fire_cupy(torch.stack(potentials), T)
        else:
            spikes = torch.cat([self._fire(v) for v in potentials])
        return spikes * self.graded_spikes_factor, torch.stack(mems)

    def _fired_shape(self, shape) -> torch.Size:
        """Shape of the spikes fired from a potential of ``shape`` (pooled if ``pool`` is set)."""
        if self.pool is None:
            return torch.Size(shape)
        return self.pool(torch.empty(shape, device="meta")).shape

    def extra_repr(self) -> str:
        th = self.threshold
        th = f"{float(th):.4g}" if th.dim() == 0 else f"tensor{tuple(th.shape)}"
        backend = "" if self.backend == "torch" else f", backend={self.backend!r}"
        return (
            f"threshold={th}, num_steps={self.num_steps}, count={self.count!r}, "
            f"sequence={self.sequence}, init_hidden={self.init_hidden}{backend}"
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


class _WindowDelay(TimeFlatten):
    r"""Time loop: delay a branch by ``windows`` whole windows of ``num_steps`` steps (zeros
    until then), so that it meets a branch that passed ``windows`` more TPP layers in step. The
    identity in count mode; cleared by :func:`reset` and ``snntorch.utils.reset``."""

    def __init__(self, windows: int, num_steps: int):
        super().__init__(nn.Identity())
        self.windows, self.num_steps = windows, num_steps
        self._queue: deque = deque()

    def forward(self, x):
        if not isinstance(x, torch.Tensor):  # sizes and shapes do not change along time
            return x
        self._queue.append(x)
        if len(self._queue) > self.windows * self.num_steps:
            return self._queue.popleft()
        return torch.zeros_like(x)

    def reset_mem(self):
        """Forget the buffered steps."""
        self._queue.clear()

    def extra_repr(self) -> str:
        return f"windows={self.windows}, num_steps={self.num_steps}"


# ----------------------------------------------------------------------------------------------
# resets, steps
# ----------------------------------------------------------------------------------------------
def _reset_plugin_modules(net: nn.Module) -> None:
    for module in net.modules():
        if isinstance(module, (TPP, IF, _WindowDelay)):
            module.reset_mem()


def _wrap_reset(original):
    def reset(net):
        result = original(net)
        _reset_plugin_modules(net)
        return result

    return reset


def reset(net: nn.Module) -> None:
    """``snntorch.utils.reset(net)``, plus a reset of every plugin neuron (:class:`TPP`,
    :class:`IF`) and branch delay anywhere in ``net`` — nested containers included — registered
    or not.

    Example::

        reset(net)                       # before each new batch in a time loop
    """
    snntorch.utils.reset(net)
    _reset_plugin_modules(net)


def _loop_tpp(module: nn.Module) -> list:
    return [m for m in module.modules() if isinstance(m, TPP) and not m.sequence]


def _longest_tpp_path(net: nn.Module) -> int:
    """Time-loop TPP layers on the longest path through ``net`` (an ``fx.GraphModule``: along
    its graph; any other module: all of them, as in a chain)."""
    if not isinstance(net, fx.GraphModule):
        return len(_loop_tpp(net))
    depth: dict = {}
    for node in net.graph.nodes:
        inputs = [depth[n] for n in node.all_input_nodes]
        own = len(_loop_tpp(net.get_submodule(node.target))) if node.op == "call_module" else 0
        depth[node] = max(inputs, default=0) + own
    return max(depth.values(), default=0)


def steps_needed(net: nn.Module, num_steps: int | None = None) -> int:
    """Time-loop calls a net needs to output one full window: ``(L+1)·num_steps`` for ``L``
    TPP layers on its longest path (each delays by one window; a residual net's shortcuts are
    delayed to match, see :func:`convert`); its valid output is the last ``num_steps`` calls.

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
        windows = {m.num_steps for m in _loop_tpp(net)}
        if len(windows) != 1:
            why = f"TPP windows differ: {windows}" if windows else "net has no time-loop TPP layer"
            raise ValueError(f"num_steps must be given: {why}")
        num_steps = windows.pop()
    num_steps = F.check_window(num_steps, "num_steps")
    return (_longest_tpp_path(net) + 1) * num_steps


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
    "warmup_windows", "pool",
)
_FUNCTIONAL_ACTIVATIONS = {
    torch.relu, torch.relu_, nn.functional.relu, nn.functional.relu_, nn.functional.relu6,
    nn.functional.leaky_relu, nn.functional.gelu, nn.functional.silu, torch.sigmoid,
    torch.tanh, "relu", "relu_", "sigmoid", "tanh",
}
_SUPPORTED = (
    "Linear, Conv1d/2d/3d, BatchNorm1d/2d/3d, (Adaptive)AvgPool, (Adaptive)MaxPool, Flatten, "
    "Unflatten, Identity, Dropout, and nn.ReLU / tpp_plugin.QCFS activations"
)


def _type_name(module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


class _Tracer(fx.Tracer):
    """Stop at the layers the converter knows (QCFS included); trace custom modules through."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        known = _LAYERS + _MAX_POOLS + _DROPOUTS + _ACTIVATIONS
        return isinstance(m, known) or super().is_leaf_module(m, qualname)


def _trace(ann: nn.Module) -> fx.GraphModule:
    try:
        graph = _Tracer().trace(ann)
    except Exception as error:  # noqa: BLE001 - any tracing failure: say what to do
        raise TypeError(
            f"convert: cannot trace {_type_name(ann)} with torch.fx ({type(error).__name__}: "
            f"{error}); the forward must not branch on tensor values — or pass an nn.Sequential"
        ) from error
    return fx.GraphModule(ann, graph, class_name=type(ann).__name__)


def _node_label(node: fx.Node) -> str:
    target = node.target if isinstance(node.target, str) else getattr(
        node.target, "__qualname__", str(node.target))
    return f"graph node {node.name!r} ({node.op} {target})"


def _is_max_pool(node, modules) -> bool:
    return node.op == "call_module" and isinstance(modules[node.target], _MAX_POOLS)


def _pair_max_pools(activations, modules) -> dict:
    """``{activation node: [max-pool nodes]}``: the max-pool feeding an activation (if the
    activation is its only user) and the one the activation feeds (if it is the activation's
    only user), in order. The TPP neuron will max-pool its window potential with them: rounding
    to whole thresholds is monotone, so ``round(max(V)) = max(round(V))``."""
    pool_of, taken = {}, set()
    for act in activations:
        src = act.args[0] if act.args else None
        pre = src if (isinstance(src, fx.Node) and _is_max_pool(src, modules)
                      and len(src.users) == 1 and src not in taken) else None
        users = list(act.users)
        post = users[0] if (len(users) == 1 and _is_max_pool(users[0], modules)
                            and users[0].args[0] is act) else None
        pools = [p for p in (pre, post) if p is not None]
        if pools:
            pool_of[act] = pools
            taken.update(pools)
    return pool_of


def _check_graph(graph: fx.Graph, modules: dict, pool_of: dict, neuron: str) -> None:
    """Refuse what the spiking net cannot compute: unknown modules anywhere; after the first
    neuron, non-affine ops on spikes and (TPP) max-pools not merged into a neuron."""
    from ..count_domain import _call_is_affine  # the count-domain rule: affine in the window sum

    merged = {p for pools in pool_of.values() for p in pools}
    spiking: dict = {}
    for node in graph.nodes:
        on_spikes = any(spiking.get(n, False) for n in node.all_input_nodes)
        spiking[node] = on_spikes
        if node.target in _FUNCTIONAL_ACTIVATIONS and node.op in ("call_function", "call_method"):
            raise TypeError(
                f"convert: {_node_label(node)} is an activation function, which the converter "
                "cannot turn into a neuron (it has no module to calibrate): use an nn.ReLU "
                "module (or tpp_plugin.QCFS) in the ANN's forward"
            )
        if node.op == "call_module":
            module = modules[node.target]
            if isinstance(module, _ACTIVATIONS):
                spiking[node] = True
            elif not isinstance(module, _LAYERS + _MAX_POOLS + _DROPOUTS):
                raise TypeError(
                    f"convert: cannot convert module {node.target!r} of type {_type_name(module)}"
                    f" ({_node_label(node)}); supported: {_SUPPORTED}"
                )
            elif isinstance(module, _MAX_POOLS) and neuron == "tpp" and on_spikes \
                    and node not in merged:
                raise ValueError(
                    f"convert: cannot rewrite max pooling {node.target!r} ({_node_label(node)}) "
                    "for TPP neurons: a TPP neuron max-pools its window potential exactly only "
                    "when the max-pool directly follows (or precedes) an activation whose output "
                    "nothing else uses; max-pooling spikes would not compute the ANN's max. "
                    "Move it next to an activation, use average pooling, or neuron='if'"
                )
        elif node.op in ("call_function", "call_method") and on_spikes \
                and not _call_is_affine(node, spiking):
            raise TypeError(
                f"convert: {_node_label(node)} is not affine and acts on spikes; between "
                "spiking layers only affine ops (conv, linear, BatchNorm, average pooling, "
                "flatten/view/reshape, add) convert — use nn.ReLU modules for activations and "
                "nn.MaxPool modules for max pooling"
            )


def _window_of_input(node: fx.Node, pool_of: dict) -> fx.Node:
    """The node whose value a neuron integrates: the input of the max-pool before the
    activation if it has one, else the activation's input."""
    pools = pool_of.get(node, ())
    if pools and pools[0].args[0] is not node:  # max-pool → activation
        return pools[0].args[0]
    return node.args[0]


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
) -> nn.Module:
    r"""Convert a ReLU or QCFS ANN into an snnTorch network.

    Every *use* of an activation becomes its own spiking neuron (a module called twice, as the
    shared ``ReLU(inplace=True)`` of a torchvision ``BasicBlock``, becomes two neurons) with
    threshold :math:`θ` — that call's calibrated maximum for ``nn.ReLU`` (from ``calibration``
    data), :math:`λ` for :class:`tpp_plugin.QCFS` — whose spikes are scaled by :math:`θ`
    (``graded_spikes_factor=θ``), so the next layer sees :math:`θ·s_t` and a neuron firing
    :math:`n` times in :math:`T` steps stands for the activation :math:`θn/T`. The layers between
    activations are deep copies of the ANN's, in eval mode (BatchNorm uses its running
    statistics); dropout is dropped. Feed the image as a constant input current at every step;
    the output summed (or averaged) over the window is the logits.

    **Max pooling** next to an activation (``ReLU → MaxPool`` or ``MaxPool → ReLU``) becomes one
    :class:`TPP` with ``pool=`` that max-pools its window potential before firing — exact: a
    ``count='exact'`` network computes the ANN with every activation rounded to :math:`T`
    levels, max-pools included. IF neurons keep the max-pool on spikes (an approximation).

    **Structure.** An ``nn.Sequential`` of layers (nested ones allowed) gives an
    ``nn.Sequential``; any other model (residual adds, ``torch.flatten``,
    ``x.view(x.size(0), -1)``, shared modules, a Sequential of custom blocks) is traced with
    ``torch.fx`` into an ``fx.GraphModule`` of the same structure. In sequence mode the graph
    folds time into the batch (``[T, B, ...] → [T·B, ...]``), so every layer and reshape sees
    one step per sample, and the neurons unfold it. In the time loop, a residual branch that
    passes fewer TPP layers than the other is delayed by whole windows, so both meet in step;
    :func:`steps_needed` counts the TPP layers of the longest path.

    :param ann: the ANN, in eval mode: ``Linear``, ``Conv1d/2d/3d``, ``BatchNorm1d/2d/3d``,
        average and max pooling, ``Flatten``, ``Unflatten``, ``Identity``, ``Dropout`` modules
        and ``nn.ReLU`` or ``QCFS`` activations, joined by a ``nn.Sequential`` or by a
        ``forward`` that ``torch.fx`` can trace, with affine functions (add, flatten, view,
        reshape, ...) between spiking layers
    :type ann: torch.nn.Module
    :param calibration: iterable of batches (tensors or ``(x, y)``) to calibrate ReLU
        thresholds; required if the ANN has any ``nn.ReLU``
    :param num_steps: the window length :math:`T`
    :type num_steps: int
    :param neuron: ``'tpp'`` (:class:`TPP`) or ``'if'`` (:class:`IF`: ``snn.Leaky(beta=1,
        reset_mechanism='subtract')`` starting at :math:`θ/2`). Defaults to the active
        :func:`tpp_plugin.registry.default_neuron` (whose arguments then come first in
        ``neuron_kwargs``), else ``'tpp'``
    :param mode: ReLU threshold statistic: ``'max'``, a percentile like ``'99.9%'``, or a
        fraction of the max; or ``'tpp'``: per-channel thresholds, bias corrections and refitted
        weights chosen for ``num_steps`` and the neurons' ``count``
        (:func:`tpp_plugin.calibration.calibrate_for_T`, docs/calibration.md); or
        the :class:`~tpp_plugin.calibration.CalibrationResult` of an earlier
        ``calibrate_for_T(ann, calibration, num_steps, fuse=False)``, to build several networks
        (e.g. one per ``count``) from one calibration. Defaults to ``'max'``
    :param momentum: moving-average momentum of the statistic across batches
    :param sequence: If `True` (default) the net takes whole sequences ``[T, B, ...]``; if
        `False` it takes one time step ``[B, ...]`` per call (snnTorch's time loop; run
        :func:`steps_needed` steps and read the last ``num_steps``: TPP layers stay silent until
        their input is valid, and draw the same random numbers as in sequence mode)
    :param permutation: add a :class:`TemporalPermutation` of this scope after every neuron
        (sequence mode only). Defaults to None
    :param neuron_kwargs: more arguments of the neuron, e.g. ``count='exact'``, ``seed=0``
        (each TPP layer and permutation gets its own seed drawn from it), ``generator`` or
        ``backend='cupy'`` (:class:`TPP`'s CUDA kernel for the firing phase, on every TPP layer;
        ``'torch'`` is the default and the only implementation of ``neuron='if'``)
    :return: the spiking network, in eval mode, on the ANN's device and dtype
    :rtype: torch.nn.Sequential or torch.fx.GraphModule
    :raises TypeError: naming the module or graph node that cannot be converted (an unknown
        module, a non-affine function on spikes, a forward ``torch.fx`` cannot trace)
    :raises ValueError: naming a max-pool that a TPP network cannot compute (not next to an
        activation, or that activation's output used elsewhere too)

    Example::

        import snntorch.functional as SF
        from tpp_plugin.adapters.snntorch import convert, reset, steps_needed
        from tpp_plugin.experiments.models import resnet, train_ann

        ann = train_ann(resnet(image_size=8), train_loader)       # residual, not Sequential
        num_steps = 4
        snn_net = convert(ann, calibration=[x_train[:512]], num_steps=num_steps, mode='99.9%')
        with torch.no_grad():                                      # an fx.GraphModule
            out = snn_net(images.expand(num_steps, *images.shape))  # [T, B, classes]
        acc = SF.accuracy_rate(out, labels)

        loop_net = convert(ann, [x_train[:512]], num_steps=num_steps, sequence=False)
        reset(loop_net)
        with torch.no_grad():                 # (9 + 1)·num_steps calls: 9 TPP layers deep
            rec = [loop_net(images) for _ in range(steps_needed(loop_net))]
        logits = torch.stack(rec[-num_steps:]).mean(0)
    """
    if not isinstance(ann, nn.Module):
        raise TypeError(f"convert needs an nn.Module, got {type(ann).__name__}")
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
    if neuron == "tpp":
        _refuse_surrogate(neuron_kwargs.get("spike_grad"), neuron_kwargs.get("surrogate_disable"))
        _check_backend(neuron_kwargs.get("backend", "torch"))
    elif neuron_kwargs.get("backend", "torch") != "torch":
        raise ValueError(
            f"convert: backend={neuron_kwargs['backend']!r} is an implementation of the TPP "
            "neuron; the IF neuron (snn.Leaky) has only snnTorch's: drop backend= or use "
            "neuron='tpp'"
        )
    else:
        neuron_kwargs.pop("backend", None)
    seed = neuron_kwargs.pop("seed", None)
    generator = neuron_kwargs.pop("generator", None)
    _check_seed(seed, generator)
    calibrated = None
    from ..calibration import CalibrationResult, apply_bias_shifts, calibrate_for_T

    if isinstance(mode, CalibrationResult):  # thresholds chosen for num_steps, earlier
        calibrated = _check_calibration_result(mode, num_steps, calibration)
        ann = apply_bias_shifts(copy.deepcopy(ann), calibrated)
    elif isinstance(mode, str) and mode.lower() == "tpp":  # thresholds chosen for num_steps
        if calibration is None:
            raise ValueError("convert: mode='tpp' calibrates for num_steps: pass calibration=")
        # calibrated for the neurons' counting rule ('exact' for IF)
        count = (neuron_kwargs.get("count", inspect.signature(TPP).parameters["count"].default)
                 if neuron == "tpp" else "exact")
        calibrated = calibrate_for_T(ann, calibration, num_steps, fuse=False, count=count)
        ann = apply_bias_shifts(copy.deepcopy(ann), calibrated)
    else:
        mode = check_calibration_mode(mode)

    traced = _trace(ann)
    graph, modules = traced.graph, dict(traced.named_modules())
    activations = [n for n in graph.nodes
                   if n.op == "call_module" and isinstance(modules[n.target], _ACTIVATIONS)]
    pool_of = _pair_max_pools(activations, modules) if neuron == "tpp" else {}
    _check_graph(graph, modules, pool_of, neuron)

    # thresholds, one per activation call
    calls, uses = [], {}
    for node in activations:
        calls.append((modules[node.target], uses.get(node.target, 0)))
        uses[node.target] = uses.get(node.target, 0) + 1
    relu_calls = [i for i, (m, _) in enumerate(calls) if isinstance(m, nn.ReLU)]
    thresholds = [m.threshold if isinstance(m, QCFS) else None for m, _ in calls]
    scales = list(thresholds)  # graded_spikes_factor: the threshold, or a calibrated step
    if calibrated is not None:
        _use_calibration(calibrated, [activations[i] for i in relu_calls], relu_calls,
                         thresholds, scales, ann, calibration)
    elif relu_calls:
        if calibration is None:
            raise ValueError(
                "convert: the ANN has nn.ReLU activations, whose thresholds come from "
                "calibration data: pass calibration=<data loader> (or train with tpp_plugin.QCFS)"
            )
        values = calibrate_thresholds(
            ann, calibration, [calls[i] for i in relu_calls], mode, momentum,
            names=[f"convert: activation {activations[i].name!r}" for i in relu_calls])
        for i, th in zip(relu_calls, values):
            thresholds[i] = scales[i] = th

    ref = next(iter(ann.parameters()), None)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    n_random = len(activations) * (2 if permutation else 1)
    seeds = iter(
        F.spawn_seeds(seed, n_random)
        if seed is not None
        else [None] * n_random
    )

    def random_source():  # one seed per random layer, drawn from `seed`; or the shared generator
        return dict(seed=next(seeds), generator=generator)

    def make_cell(i: int, depth: int) -> list:
        """The neuron of activation call ``i`` (and its permutation), ``depth`` TPP layers deep."""
        theta = torch.as_tensor(thresholds[i], dtype=dtype, device=device)
        scale = torch.as_tensor(scales[i], dtype=dtype, device=device).clone()
        common = dict(threshold=theta, graded_spikes_factor=scale, init_hidden=True)
        if neuron == "tpp":
            pools = [_layer_copy(modules[p.target]) for p in pool_of.get(activations[i], ())]
            pool = nn.Sequential(*pools) if len(pools) > 1 else (pools[0] if pools else None)
            # time loop: the layer behind `depth` TPP layers sees valid input from window depth+1
            cell = TPP(num_steps=num_steps, sequence=sequence, pool=pool,
                       warmup_windows=0 if sequence else depth, **common, **random_source(),
                       **neuron_kwargs)
        else:
            next(seeds)
            cell = IF(sequence=sequence, **common, **neuron_kwargs)
        cells = [cell.to(device=device, dtype=dtype)]
        if permutation:
            cells.append(TemporalPermutation(permutation, **random_source()))
        return cells

    chain = isinstance(ann, nn.Sequential) and _is_chain(graph)
    build = _build_sequential if chain else _build_graph
    net = build(traced, activations, pool_of, make_cell, neuron, num_steps, sequence)
    return net.eval()


def _check_calibration_result(result, num_steps: int, calibration):
    """A :class:`~tpp_plugin.calibration.CalibrationResult` passed as ``mode``: calibrated for
    ``num_steps``, on the unfused ANN (this converter keeps batch norms), with ``calibration``
    data at hand (one batch gives the activations' shapes)."""
    if result.T != num_steps:
        raise ValueError(f"convert: the calibration was made for T={result.T}, but "
                         f"num_steps={num_steps}; calibrate for the window the network runs")
    if result.settings.get("fuse", False):
        raise ValueError("convert: the calibration folded batch norms into the convolutions "
                         "(fuse=True), which this converter keeps: calibrate with fuse=False")
    if calibration is None:
        raise ValueError("convert: with a calibration result as mode, pass calibration= too "
                         "(one batch gives the activations' shapes)")
    return result


def _use_calibration(result, nodes, relu_calls, thresholds, scales, ann, calibration) -> None:
    """Put a :func:`tpp_plugin.calibration.calibrate_for_T` result into the per-call lists:
    per-channel values shaped to broadcast over each call's output ``[B, C, *spatial]``."""
    if list(result.names) != [n.name for n in nodes]:
        raise RuntimeError(
            f"convert: the calibration's ReLU calls {list(result.names)} do not match the "
            f"converter's {[n.name for n in nodes]}"
        )
    ranks = _output_ranks(ann, calibration, nodes)
    steps = result.output_scales or result.thresholds
    for j, i in enumerate(relu_calls):
        def shaped(t, rank=ranks[j]):
            t = torch.as_tensor(t)
            return t.reshape(-1, *[1] * (rank - 2)) if t.dim() == 1 else t

        thresholds[i], scales[i] = shaped(result.thresholds[j]), shaped(steps[j])


@torch.no_grad()
def _output_ranks(ann: nn.Module, calibration, nodes) -> list:
    """The number of dimensions of each activation call's output, from one calibration batch."""
    from ..convert import batch_inputs

    modules = [ann.get_submodule(n.target) for n in nodes]
    ranks, seen = [], {}
    wanted = {(id(m), k) for m, k in _call_keys(modules)}

    def hook(module, _inputs, output):
        k = seen.get(id(module), 0)
        seen[id(module)] = k + 1
        if (id(module), k) in wanted:
            ranks.append(output.dim())

    handles = [m.register_forward_hook(hook) for m in set(modules)]
    try:
        ann(batch_inputs(next(iter(calibration))))
    finally:
        for h in handles:
            h.remove()
    return ranks


def _call_keys(modules) -> list:
    """``(module, k)``: the ``k``-th call of each module, in call order."""
    count: dict = {}
    keys = []
    for m in modules:
        keys.append((m, count.get(id(m), 0)))
        count[id(m)] = count.get(id(m), 0) + 1
    return keys


def _is_chain(graph: fx.Graph) -> bool:
    """Whether the graph is one input through a chain of modules (a Sequential of layers, not
    of custom blocks with their own forward)."""
    previous = None
    for node in graph.nodes:
        if node.op == "placeholder":
            if previous is not None:
                return False
        elif node.op not in ("call_module", "output") or node.all_input_nodes != [previous]:
            return False
        previous = node
    return True


def _layer_copy(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module).eval()


def _build_sequential(traced, activations, pool_of, make_cell, neuron, num_steps, sequence):
    """The graph of an ``nn.Sequential`` is a chain: emit an ``nn.Sequential`` again."""
    modules = dict(traced.named_modules())
    merged = {p for pools in pool_of.values() for p in pools}
    index = {n: i for i, n in enumerate(activations)}
    layers, depth = [], 0
    for node in traced.graph.nodes:
        if node.op != "call_module" or node in merged:
            continue
        module = modules[node.target]
        if isinstance(module, _DROPOUTS):
            continue
        if node in index:
            layers += make_cell(index[node], depth)
            depth += neuron == "tpp"
        else:
            layers.append(TimeFlatten(_layer_copy(module)) if sequence else _layer_copy(module))
    return nn.Sequential(*layers)


def _build_graph(traced, activations, pool_of, make_cell, neuron, num_steps, sequence):
    """Any traced model: an ``fx.GraphModule`` with the same structure (see :func:`convert`)."""
    modules = dict(traced.named_modules())
    merged = {p for pools in pool_of.values() for p in pools}
    index = {n: i for i, n in enumerate(activations)}
    graph, root, env = fx.Graph(), {}, {}
    depth: dict = {}  # time loop: windows of delay of each new node's value (None: constant)
    delays: dict = {}
    context = _TimeContext()
    names = set()  # the names the kept layers and attributes take, and their parents'
    for node in traced.graph.nodes:
        kept = node.op == "get_attr" or (
            node.op == "call_module" and node not in merged and node not in index
            and not isinstance(modules[node.target], _DROPOUTS))
        if kept:
            parts = node.target.split(".")
            names |= {".".join(parts[: i + 1]) for i in range(len(parts))}

    def fresh(name: str) -> str:
        candidate, k = name, 0
        while candidate in names or candidate in root:
            k += 1
            candidate = f"{name}_{k}"
        names.add(candidate)
        return candidate

    def add_module(name: str, module: nn.Module, args, kwargs=None) -> fx.Node:
        if name not in root:
            root[name] = module
        return graph.call_module(name, args, kwargs or {})

    def aligned(arg):
        """Map old nodes to new ones; in the time loop, delay the values that are fewer windows
        late than the latest one, so that all meet in step."""
        arg = fx.node.map_arg(arg, env.__getitem__)
        found = []
        fx.node.map_arg(arg, found.append)
        late = max((depth[n] for n in found if depth[n] is not None), default=None)

        def delay(n):
            if depth[n] is None or depth[n] == late:
                return n
            key = (n, late - depth[n])
            if key not in delays:
                name = fresh(f"{n.name}_delay")
                delays[key] = add_module(name, _WindowDelay(late - depth[n], num_steps), (n,))
                depth[delays[key]] = late
            return delays[key]

        return fx.node.map_arg(arg, delay), late

    def late_of(arg):
        return aligned(arg) if not sequence else (fx.node.map_arg(arg, env.__getitem__), 0)

    for node in traced.graph.nodes:
        if node.op == "placeholder":
            new = graph.node_copy(node)
            if sequence:
                new = add_module(fresh("fold_time"), _FoldTime(context), (new,))
            env[node], depth[new] = new, 0
        elif node.op == "get_attr":
            new = graph.node_copy(node)
            root[node.target] = copy.deepcopy(_fetch(traced, node.target))
            env[node], depth[new] = new, None
        elif node.op == "call_module" and node in merged:
            continue  # part of a neuron
        elif node.op == "call_module" and isinstance(modules[node.target], _DROPOUTS):
            env[node] = env[node.args[0]]
        elif node.op == "call_module" and node in index:
            source = _window_of_input(node, pool_of)
            (arg,), late = late_of((source,))
            late = late or 0
            cells = make_cell(index[node], late)
            cell = cells[0] if len(cells) == 1 else nn.Sequential(*cells)
            new = add_module(fresh(node.name), _TimeCell(cell, context) if sequence else cell,
                             (arg,))
            depth[new] = late + (neuron == "tpp")
            env[node] = new
            for pool in pool_of.get(node, ()):
                if pool.args[0] is node:
                    env[pool] = new  # activation → max-pool: the pool's users read the neuron
        elif node.op == "call_module":
            (args, kwargs), late = late_of((node.args, node.kwargs))
            if node.target not in root:
                root[node.target] = _layer_copy(modules[node.target])
            new = graph.call_module(node.target, args, kwargs)
            env[node], depth[new] = new, late
        elif node.op in ("call_function", "call_method"):
            (args, kwargs), late = late_of((node.args, node.kwargs))
            new = graph.create_node(node.op, node.target, args, kwargs, node.name)
            env[node], depth[new] = new, late
        elif node.op == "output":
            result, _ = late_of(node.args[0])
            if sequence:
                result = fx.node.map_arg(result, functools.partial(
                    _unfold_output, add_module, fresh("unfold_time"), _UnfoldTime(context)))
            graph.output(result)
    net = fx.GraphModule(root, graph, class_name=f"Spiking{type(traced).__name__.lstrip('_')}")
    return net


def _unfold_output(add_module, name, unfold, node):
    return add_module(name, unfold, (node,))


def _fetch(module: nn.Module, target: str):
    obj = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


# ----------------------------------------------------------------------------------------------
# registration
# ----------------------------------------------------------------------------------------------
def _nir_problem(module: nn.Module) -> str | None:
    """Why ``module`` cannot be exported to NIR, or None."""
    if isinstance(module, TPP):
        return ("has no NIR primitive: NIR's neurons (LIF, CubaLIF, IF, ...) fire "
                "deterministically step by step, a TPP neuron fires at random once it has "
                "integrated a whole window")
    if isinstance(module, TemporalPermutation):
        return "has no NIR primitive: it shuffles whole spike trains along time"
    if isinstance(module, TimeFlatten):
        return ("is a sequence-mode wrapper with no NIR primitive: export a time-loop net "
                "(convert(..., sequence=False)) instead")
    return None


def _check_nir_exportable(net: nn.Module) -> None:
    modules = list(net.named_modules())  # neurons first: they are the real obstacle
    modules.sort(key=lambda item: not isinstance(item[1], (TPP, TemporalPermutation)))
    for name, module in modules:
        problem = _nir_problem(module)
        if problem:
            raise TypeError(
                f"snntorch.export_nir: cannot export module {name or '<root>'!r} "
                f"({_type_name(module)}): it {problem}"
            )


def _wrap_export_to_nir(original):
    def export_to_nir(module, sample_data, *args, **kwargs):
        _check_nir_exportable(module)
        return original(module, sample_data, *args, **kwargs)

    return export_to_nir


def _wrap_extract_module(original):
    # also covers an export_to_nir imported before the plugin was registered
    def _extract_snntorch_module(module):
        problem = _nir_problem(module)
        if problem:
            raise TypeError(
                f"snntorch.export_nir: cannot export {_type_name(module)}: it {problem}"
            )
        return original(module)

    return _extract_snntorch_module


def _export_nir_module():
    """``snntorch.export_nir`` if it can be imported (it needs the ``nir`` and ``nirtorch``
    packages), else None."""
    if "snntorch.export_nir" in sys.modules:
        return sys.modules["snntorch.export_nir"]
    try:
        if importlib.util.find_spec("nir") is None or importlib.util.find_spec("nirtorch") is None:
            return None
        return importlib.import_module("snntorch.export_nir")
    except Exception:  # noqa: BLE001 - a broken optional exporter must not break registration
        return None


def install(patcher) -> None:
    """Add ``snntorch.TPP`` and ``snntorch.TemporalPermutation``; wrap ``snntorch.utils.reset``
    so it also resets plugin neurons anywhere in a net; make ``snntorch.export_nir`` (when
    ``nir`` is installed) refuse plugin modules with a clear ``TypeError``. Undone by
    ``patcher.undo()``."""
    if not callable(getattr(snntorch.utils, "reset", None)):
        raise RuntimeError("this snnTorch has no snntorch.utils.reset; tpp_plugin needs >= 0.7")
    patcher.add(snntorch, "TPP", TPP)
    patcher.add(snntorch, "TemporalPermutation", TemporalPermutation)
    patcher.wrap(snntorch.utils, "reset", _wrap_reset)
    export_nir = _export_nir_module()
    if export_nir is not None:
        for name, make in (("export_to_nir", _wrap_export_to_nir),
                           ("_extract_snntorch_module", _wrap_extract_module)):
            if callable(getattr(export_nir, name, None)):
                patcher.wrap(export_nir, name, make)
