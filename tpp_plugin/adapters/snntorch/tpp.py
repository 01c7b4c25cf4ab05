r"""snnTorch's TPP neuron, :class:`TPP` (``snn.TPP`` once registered): a thin wrapper over
:mod:`tpp_plugin.functional` (the math), :mod:`tpp_plugin.engine` (windows, random streams) and
:mod:`tpp_plugin.kernels.cupy`, with snnTorch's conventions (``threshold``, ``init_hidden``,
``(spk, mem)`` returns, class-wide resets)."""

from __future__ import annotations

import math
from numbers import Integral, Real

import snntorch
import torch
from torch import nn

from ... import count_domain
from ... import functional as F
from ...engine import RandomStream, Seeded, WindowState, delayed_step, synchronous_step
from ...engine.window import check_streaming_mode
from ...kernels import cupy as kernels
from .common import (
    check_backend,
    check_graded_spikes_factor,
    check_mem_argument,
    refuse_surrogate,
    returns,
)

__all__ = ["TPP", "RESET_HOW", "SEQUENCE_HOW"]

#: how an snnTorch user starts a new window, and feeds whole sequences (for errors)
RESET_HOW = "Call snntorch.utils.reset(net) (or the neuron's reset_mem())"
SEQUENCE_HOW = "sequence mode: sequence=True, or convert(..., sequence=True)"


class TPP(Seeded, snntorch.SpikingNeuron):
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

    **Time loop** (default): one step per call, in one of two behaviours (``streaming``):

    * ``'synchronous'`` (default): the input is constant within a window of :math:`T` calls
      (rate coding, as the tutorials feed ``cur``): the first call computes the whole window from
      its input repeated :math:`T` times and returns its step 1; calls :math:`2..T` check that
      the input is unchanged (else ``ValueError``) and return steps :math:`2..T` — exactly what
      sequence mode returns, with no delay. A converted network (:func:`convert`,
      ``sequence=False``) behaves the same as a whole.
    * ``'delayed'``: causal streaming for input that changes. Calls :math:`1..T` accumulate the
      first window and output zeros; calls :math:`T+1..2T` emit that window's spikes while
      accumulating the next, and so on: the output is delayed by one window. A net of :math:`L`
      such layers needs :func:`steps_needed` :math:`= (L+1)T` steps (its valid output is the
      last :math:`T`).

    **Sequence** (``sequence=True``, or :meth:`forward_sequence`): a whole ``[k·T, B, ...]``
    input in one call, cut into :math:`k` windows. For the same seed all three give
    bit-identical spikes (the window's random numbers are drawn at the window boundary).

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
        >>> for step in range(num_steps):            # window-synchronous: no delay
        ...     spk, mem = lif(cur)
        ...     spk_rec.append(spk)
        >>> torch.stack(spk_rec).sum(0)              # 2 spikes per neuron (v = 2θ is whole)
        tensor([[2., 2., 2.],
                [2., 2., 2.]])
        >>> seq = snn.TPP(threshold=1.0, num_steps=num_steps, seed=0, sequence=True)
        >>> spk_seq, mem_seq = seq(cur.expand(num_steps, 2, 3))   # the same spikes at once
        >>> torch.equal(spk_seq, torch.stack(spk_rec))
        True
        >>> causal = snn.TPP(num_steps=num_steps, seed=0, streaming='delayed')
        >>> late = [causal(cur)[0] for _ in range(2 * num_steps)]   # one window of delay
        >>> torch.equal(torch.stack(late[num_steps:]), spk_seq)
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

    :param seed: seed of the neuron's own random streams (one per device, each started from the
        seed and kept across moves: :class:`tpp_plugin.engine.RandomStream`). Defaults to None
        (torch's global generator)
    :type seed: int, optional

    :param generator: a ``torch.Generator`` on the input's device to draw from, instead of
        ``seed``. Defaults to None
    :type generator: torch.Generator, optional

    :param streaming: the time loop's behaviour: ``'synchronous'`` (default) or ``'delayed'``
        (above). Defaults to ``'synchronous'``
    :type streaming: str, optional

    :param warmup_windows: delayed time loop only: after a reset, accumulate this many windows
        without firing (and without drawing random numbers). A layer behind ``d`` TPP layers
        receives only zeros (or bias) for its first ``d`` windows; :func:`convert` sets ``d`` so
        that a time-loop net fires no spurious warm-up spikes and draws exactly the random
        numbers of the same net in sequence mode. Defaults to 0
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
          `graded_spikes_factor`). In the delayed time loop these belong to the previous window
          (zeros during the first).
        - **mem** of the input's shape: the potential *being accumulated* — `v_init` plus the
          current window's inputs so far, this step's included (in sequence mode, one such value
          per step). It is not the potential that produced `spk`. In the synchronous time loop
          the `mem` argument is not used (the window is computed at its first call).

    Returned as snnTorch neurons do: `init_hidden=False` → `(spk, mem)`; `init_hidden=True` →
    `spk`, or `(spk, mem)` with `output=True`.

    State (non-persistent buffers, so it follows ``.to()`` and stays out of ``state_dict``):
    ``mem``, ``pending`` (spikes of the window being emitted), ``window_input`` (the synchronous
    window's input), the position in the window and the number of windows since the last
    reset. Clear it with :meth:`reset_mem`,
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
        streaming: str = "synchronous",
        warmup_windows: int = 0,
        pool: nn.Module | None = None,
        backend: str = "torch",
        spike_grad=None,
        surrogate_disable=None,
    ):
        # validate everything before SpikingNeuron.__init__ registers the instance
        refuse_surrogate(spike_grad, surrogate_disable)
        backend = check_backend(backend)
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
        stream = RandomStream(seed, generator)
        streaming = check_streaming_mode(streaming)
        if isinstance(warmup_windows, bool) or not isinstance(warmup_windows, Integral) or (
            warmup_windows < 0
        ):
            raise ValueError(f"warmup_windows must be an int >= 0, got {warmup_windows!r}")
        check_graded_spikes_factor(graded_spikes_factor)
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
        self.random_stream = stream
        self.streaming = streaming
        self.warmup_windows = int(warmup_windows)
        self.pool = pool  # pools the window potential before firing (see the class docstring)
        self._tpp_backend = backend
        self.register_buffer("v_init", torch.as_tensor(v_init).detach().clone())
        self.register_buffer("mem", torch.zeros(0), persistent=False)
        self.register_buffer("pending", torch.zeros(0), persistent=False)
        self.register_buffer("pending_mem", torch.zeros(0), persistent=False)
        self.register_buffer("window_input", torch.zeros(0), persistent=False)
        self._step = 0  # position in the current window
        self._window = 0  # windows completed since the last reset

    # -- the contract (tpp_plugin.contract.TPPLayer) -------------------------------------------
    @property
    def window_length(self) -> int:
        return self.num_steps

    @property
    def sequence_mode(self) -> bool:
        return self.sequence

    @property
    def spike_scale(self):
        return self.graded_spikes_factor

    @property
    def generator(self) -> torch.Generator | None:
        """The ``torch.Generator`` this neuron draws from on the device of its state (its own,
        for a seed; the one given at construction; ``None`` for torch's global generator)."""
        return self.random_stream.generator_for(self.mem.device)

    # -- state ---------------------------------------------------------------------------------
    def reset_mem(self):
        """Clear the state (window potential, pending spikes, position in the window).

        :return: the (zeroed) membrane potential ``mem``
        """
        self.mem = torch.zeros_like(self.mem)
        self.pending = self.pending.new_zeros(0)
        self.pending_mem = self.pending_mem.new_zeros(0)
        self.window_input = self.window_input.new_zeros(0)
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
        self._tpp_backend = check_backend(value)

    # -- forward -------------------------------------------------------------------------------
    def forward(self, input_, mem=None):
        check_mem_argument(self, mem)
        if self.sequence:
            return returns(self, *self._sequence(input_, "input_"))
        if self.streaming == "synchronous":
            return returns(self, *self._synchronous_step(input_))
        return returns(self, *self._step_forward(input_, mem))

    def forward_sequence(self, x_seq):
        r"""Run a whole sequence ``[k·num_steps, B, ...]`` (``k`` windows) in one call.

        Independent of the time-loop state (which it leaves untouched); returns as
        :meth:`forward`, with ``spk`` and ``mem`` of shape ``[k·num_steps, B, ...]``.

        Example::

            >>> tpp = TPP(num_steps=4, count='exact', init_hidden=True, seed=0)
            >>> tpp.forward_sequence(torch.full((4, 1), 0.5)).sum(0)
            tensor([2.])
        """
        return returns(self, *self._sequence(x_seq, "x_seq"))

    def count_forward(self, x: torch.Tensor, T: int, bernoulli: str):
        """Count-domain forward (:func:`tpp_plugin.count_mode`): ``count/T`` spikes (times the
        spike factor) from the mean current ``x``, returned as :meth:`forward` returns."""
        counts = count_domain.window_counts(
            x, T, v_init=self.v_init, threshold=self.threshold, count=self.count,
            stream=self.random_stream, bernoulli=bernoulli, pool=self.pool,
            fire=self._fire_pooled if self.backend == "cupy" else None)
        spk = counts.div_(T).mul_(self.graded_spikes_factor)
        if self.init_hidden and not self.output:
            return spk  # the membrane potential is not returned: do not compute it
        v = count_domain.window_potential(x, T, self.v_init)
        return returns(self, spk, v if self.pool is None else self.pool(v))

    def _fire_pooled(self, v, T: int):
        """Phase 2 of one window from its pooled potential ``v``: spikes ``[T, *v.shape]``."""
        if self.backend == "cupy":
            return kernels.fire_potentials(v.unsqueeze(0), T, self.threshold, self.count,
                                           self.random_stream.philox())
        generator = self.random_stream.generator_for(v.device)
        return F.tpp_fire(v, T, self.threshold, self.count, generator)

    def fire(self, v, T: int | None = None):
        """Phase 2 of one window: spikes ``[T, *pooled shape]`` from the potential ``v``."""
        if self.pool is not None:
            v = self.pool(v)
        return self._fire_pooled(v, self.num_steps if T is None else T)

    def _check_input(self, x: torch.Tensor, name: str, min_dim: int) -> None:
        F.check_tensor(x, name, min_dim=min_dim)
        if self.backend == "cupy":
            # refused before any state changes or random numbers are drawn
            kernels.check_cuda_tensor(x, name, kernels.SUPPORTED_DTYPES)

    def _synchronous_step(self, input_):
        """Window-synchronous step (:func:`tpp_plugin.engine.synchronous_step`)."""
        self._check_input(input_, "input_", min_dim=1)
        has_window = self._step > 0
        state = WindowState(
            t=self._step, windows=self._window,
            pending=(self.pending, self.pending_mem) if has_window else None,
            window_input=(self.window_input,) if has_window else None)
        (spk, mem), state = synchronous_step(
            (input_,), state, self.num_steps,
            lambda x_seq: self._sequence(x_seq, "input_", scaled=False),
            what=type(self).__name__, reset=RESET_HOW, sequence=SEQUENCE_HOW)
        if state.t:
            (self.pending, self.pending_mem), (self.window_input,) = (
                state.pending, state.window_input)
        else:
            self.pending, self.pending_mem, self.window_input = (
                self.pending.new_zeros(0), self.pending_mem.new_zeros(0),
                self.window_input.new_zeros(0))
        self.mem, self._step, self._window = mem, state.t, state.windows
        return spk * self.graded_spikes_factor, mem

    def _step_forward(self, input_, mem):
        """Delayed step (:func:`tpp_plugin.engine.delayed_step`)."""
        self._check_input(input_, "input_", min_dim=1)
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
        state = WindowState(t=step, windows=self._window, acc=new_mem,
                            pending=self.pending if has_pending else None)
        spk, state = delayed_step(
            input_, state, self.num_steps, lambda acc, x, t: new_mem, self.fire,
            lambda: new_mem.new_zeros(self._fired_shape(shape)), warmup=self.warmup_windows)
        # commit the state only now, so that a failure above leaves it unchanged
        pending = state.pending if state.pending is not None else self.pending.new_zeros(0)
        self.mem, self.pending, self._step, self._window = new_mem, pending, state.t, state.windows
        return spk * self.graded_spikes_factor, new_mem

    def _sequence(self, x_seq, name, scaled: bool = True):
        self._check_input(x_seq, name, min_dim=2)  # the one pass over the values (finite)
        T = F.check_sequence(x_seq, name, self.num_steps, finite=False, window_name="num_steps")
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
        if self.pool is not None:
            potentials = [self.pool(v) for v in potentials]
        if self.backend == "cupy":  # every window in one kernel launch
            spikes = kernels.fire_potentials(torch.stack(potentials), T, self.threshold,
                                             self.count, self.random_stream.philox())
        else:
            spikes = torch.cat([self._fire_pooled(v, T) for v in potentials])
        return (spikes * self.graded_spikes_factor if scaled else spikes), torch.stack(mems)

    def _fired_shape(self, shape) -> torch.Size:
        """Shape of the spikes fired from a potential of ``shape`` (pooled if ``pool`` is set)."""
        if self.pool is None:
            return torch.Size(shape)
        return self.pool(torch.empty(shape, device="meta")).shape

    def extra_repr(self) -> str:
        th = self.threshold
        th = f"{float(th):.4g}" if th.dim() == 0 else f"tensor{tuple(th.shape)}"
        backend = "" if self.backend == "torch" else f", backend={self.backend!r}"
        streaming = "" if self.streaming == "synchronous" else f", streaming={self.streaming!r}"
        return (
            f"threshold={th}, num_steps={self.num_steps}, count={self.count!r}, "
            f"sequence={self.sequence}, init_hidden={self.init_hidden}{backend}{streaming}"
        )
