r"""SpikingJelly's TPP modules: :class:`TPPNode` (a ``neuron.BaseNode``) and
:class:`TemporalPermutation`, thin wrappers over :mod:`tpp_plugin.functional` (the math),
:mod:`tpp_plugin.engine` (windows in time, random streams) and :mod:`tpp_plugin.kernels.cupy`.

They keep SpikingJelly's conventions: ``v_threshold``, ``step_mode``, state in memories reset by
``functional.reset_net``, ``backend``.
"""

from __future__ import annotations

import math

import torch
from spikingjelly.activation_based import base
from spikingjelly.activation_based import neuron as sj_neuron
from torch import nn

from ... import count_domain
from ... import functional as F
from ...engine import RandomStream, Seeded, WindowState, delayed_step, synchronous_step
from ...engine.window import check_streaming_mode
from ...kernels import cupy as kernels

__all__ = ["TPPNode", "TemporalPermutation", "IS_LEGACY_NODE", "check_v_init"]

#: ``True`` where ``neuron.BaseNode`` takes ``backend=`` (the 0.0.0.0.14 line)
IS_LEGACY_NODE = "backend" in sj_neuron.BaseNode.__init__.__code__.co_varnames

_SINGLE_STEP_NEEDS_T = (
    "{cls} in single-step mode needs the window length: pass T=... (the number of single-step "
    "calls per window, e.g. the T of your evaluation loop), or call "
    "functional.set_step_mode(net, 'm') and feed [T, N, ...] sequences"
)
#: how a SpikingJelly user starts a new window, and feeds whole sequences (for errors)
RESET_HOW = "Call functional.reset_net(net)"
SEQUENCE_HOW = "multi-step mode: functional.set_step_mode(net, 'm')"


def check_v_init(v_init) -> float:
    """A finite number."""
    if isinstance(v_init, bool) or not isinstance(v_init, (int, float)):
        raise TypeError(f"v_init must be a number, got {type(v_init).__name__}")
    if not math.isfinite(v_init):
        raise ValueError(f"v_init must be finite, got {v_init}")
    return float(v_init)


def _join_windows(parts) -> torch.Tensor:
    """Concatenate per-window outputs along time (a single window is returned as is, uncopied)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class _WindowModule(Seeded):
    """Window bookkeeping, random stream and backend of :class:`TPPNode` and
    :class:`TemporalPermutation` (a mixin over SpikingJelly's ``MemoryModule``)."""

    def _init_window(self, T, seed, generator, backend, streaming):
        self.T = None if T is None else F.check_window(T)
        self.streaming = check_streaming_mode(streaming)
        self.random_stream = RandomStream(seed, generator)
        self.backend = backend
        self.register_memory("t", 0)
        self.register_memory("spike_buffer", None)
        self.register_memory("window_input", None)
        self.register_memory("stream_shape", None)

    # -- the contract (tpp_plugin.contract.TPPLayer) -------------------------------------------
    @property
    def window_length(self) -> int | None:
        return self.T

    @property
    def sequence_mode(self) -> bool:
        return self.step_mode == "m"

    @property
    def spike_scale(self) -> float:
        return 1.0

    # -- randomness (seed, manual_seed: engine.Seeded) ------------------------------------------
    @property
    def generator(self) -> torch.Generator | None:
        """The ``torch.Generator`` given at construction (``None`` for a seed or torch's global
        generator)."""
        return self.random_stream.generator

    # -- backend ---------------------------------------------------------------------------------
    @property
    def supported_backends(self):
        return ("torch", "cupy")

    @property
    def backend(self) -> str:
        return self._tpp_backend

    @backend.setter
    def backend(self, value: str):
        if value not in self.supported_backends:
            raise ValueError(f"backend must be one of {self.supported_backends}, got {value!r}")
        if value == "cupy":
            kernels.load_nvrtc()  # ImportError with the install command if CuPy/NVRTC is missing
        self._tpp_backend = value

    # -- windows ---------------------------------------------------------------------------------
    def _window_length(self, x_seq: torch.Tensor) -> int:
        return F.check_sequence(x_seq, "x_seq", self.T, finite=False)

    def _check_streaming(self, x: torch.Tensor) -> int:
        """Validate one single-step input; return the window length."""
        if self.T is None:
            raise ValueError(_SINGLE_STEP_NEEDS_T.format(cls=type(self).__name__))
        F.check_tensor(x, "x", min_dim=1, finite=False)
        mid_stream = self.t != 0 or self.spike_buffer is not None
        if self.streaming == "delayed" and mid_stream and self.stream_shape != tuple(x.shape):
            raise ValueError(
                f"x has shape {tuple(x.shape)} but this stream started with shape "
                f"{self.stream_shape} (a delayed stream still owes the previous window's "
                "output); call functional.reset_net(net) between batches"
            )
        self.stream_shape = tuple(x.shape)
        return self.T

    def _synchronous_step(self, x: torch.Tensor, T: int) -> torch.Tensor:
        """Window-synchronous single step (:func:`tpp_plugin.engine.synchronous_step`): the
        whole window at its first call, from ``x`` repeated ``T`` times."""
        if self.t == 0:
            F.check_tensor(x, "x")
        state = WindowState(t=self.t, pending=self.spike_buffer,
                            window_input=None if self.t == 0 else (self.window_input,))
        out, state = synchronous_step((x,), state, T, self.multi_step_forward,
                                      what=type(self).__name__, reset=RESET_HOW,
                                      sequence=SEQUENCE_HOW)
        self.t, self.spike_buffer = state.t, state.pending
        self.window_input = state.window_input[0] if state.window_input else None
        return out

    def _delayed_step(self, x: torch.Tensor, T: int, acc, integrate, fire, silence):
        """Delayed single step (:func:`tpp_plugin.engine.delayed_step`); returns the output
        and what the window integrated so far (``None`` at a window boundary)."""
        state = WindowState(t=self.t, acc=acc if self.t else None, pending=self.spike_buffer)
        out, state = delayed_step(x, state, T, integrate, fire, silence)
        self.t, self.spike_buffer = state.t, state.pending
        return out, state.acc

    def _check_multi_step_allowed(self):
        if self.t != 0:
            raise RuntimeError(
                f"{type(self).__name__} is in the middle of a single-step window "
                f"({self.t}/{self.T} steps); call functional.reset_net(net) before a "
                "multi-step call"
            )

    def _base_init(self, step_mode: str, backend: str, **node_kwargs) -> None:
        """SpikingJelly's own ``__init__`` (``BaseNode``'s for a neuron), before the window's."""
        if isinstance(self, sj_neuron.BaseNode):
            extra = {"backend": "torch"} if IS_LEGACY_NODE else {}
            sj_neuron.BaseNode.__init__(self, v_threshold=1.0, v_reset=None,
                                        surrogate_function=None, detach_reset=False,
                                        step_mode=step_mode, **extra, **node_kwargs)
        else:
            base.MemoryModule.__init__(self)
            self.step_mode = step_mode


class TPPNode(_WindowModule, sj_neuron.BaseNode):
    r"""Two-phase probabilistic (TPP) spiking neuron (Bojković, Wu & Gu, ICML 2025).

    Phase 1 integrates a whole window of ``T`` inputs, ``v = v_init + Σ_t x_t``, without firing;
    phase 2 fires for ``T`` steps, at step ``t`` with probability
    ``clamp(v / (θ·(T − t + 1)), 0, 1)`` and soft reset ``v ← v − θ``. Spikes therefore land at
    random times, which removes the *temporal misalignment* that makes converted IF networks
    fail at low ``T``.
    ``count='exact'`` rounds ``v`` to a whole number of thresholds first (deterministic count,
    random positions): a network of such neurons computes exactly the QCFS ANN with ``L = T``.

    A ``neuron.BaseNode``: SpikingJelly's tools that look for neurons
    (``monitor.OutputMonitor(net, neuron.BaseNode)``, ``op_counter``) see it. In a
    window-synchronous single-step loop a network computes each window at its first call, so a
    hook or monitor on this neuron fires once per window with ``[T, N, *]``; monitor in
    multi-step mode to see every layer's whole spike train, IF and TPP alike.

    :param v_threshold: threshold θ (> 0): a number, or a tensor broadcastable to the potential
        (e.g. per channel)
    :param v_reset: must be ``None`` (soft reset is the neuron's only meaning); accepted so that
        SpikingJelly's neuron factories can build it
    :param v_init: potential each window starts from; ``0`` is the paper's rule (``θ/2`` over-fires
        by about half a spike per neuron)
    :param count: ``'bernoulli'`` (default), ``'exact'`` or ``'unbiased'`` (``floor(v/θ)``
        spikes plus one with probability ``frac(v/θ)``, at uniform positions: mean count exactly
        ``clamp(v/θ, 0, T)``)
    :param T: window length. Required in single-step mode; in multi-step mode the sequence length
        must be a multiple of it (default: the whole sequence is one window)
    :param step_mode: ``'s'`` (single-step, default like every SpikingJelly neuron) or ``'m'``
    :param streaming: single-step behaviour: ``'synchronous'`` (default) or ``'delayed'`` (below)
    :param pool: a pooling module applied to the window potential before firing, e.g.
        ``nn.MaxPool2d(2)``: the converters put a ``ReLU → MaxPool`` pair here, so an exact-count
        network computes the ANN's max-pool exactly (the max of window sums, which IF neurons
        can only approximate)
    :param seed: seed of this neuron's own random stream (reproducible spikes; one stream per
        device, kept across moves: :class:`tpp_plugin.engine.RandomStream`)
    :param generator: a ``torch.Generator`` to draw from instead (mutually exclusive with ``seed``)
    :param store_v_seq: in multi-step mode keep ``v_seq``, the potential after each firing step
    :param backend: ``'torch'`` (reference, any device) or ``'cupy'`` (CUDA kernels,
        :mod:`tpp_plugin.kernels.cupy`: with a scalar threshold and no ``pool`` one fused launch
        for all windows; with a tensor threshold torch accumulates and the kernel fires
        ``v/θ``, as snnTorch's ``TPP(backend='cupy')`` does; CUDA tensors; every ``count``; its
        own Philox random stream, so its spikes differ from the torch backend's except for the
        counts with ``count='exact'``; the fused path does not check inputs for NaN/inf)
    :param surrogate_function: must be ``None``: TPP is an inference neuron without a surrogate
        gradient (accepted as a keyword for SpikingJelly's neuron factories)
    :param detach_reset: must be ``False`` (as above)

    * **Multi-step** ``[T·k, N, *]`` → ``[T·k, N, *]``: each window of ``T`` steps is
      accumulated, then fired; output steps line up with input steps.
    * **Single-step, synchronous** (default) ``[N, *]`` → ``[N, *]``: the input is taken as
      constant within a window of ``T`` calls (rate coding): the first call computes the window
      from ``x`` repeated ``T`` times and returns its step 1, calls ``2..T`` check that ``x`` is
      unchanged (else ``ValueError``) and return steps ``2..T`` — exactly the multi-step output,
      with no delay. A converted network gets the same behaviour as a whole
      (:func:`~tpp_plugin.adapters.spikingjelly.window_synchronous`).
    * **Single-step, delayed** (``streaming='delayed'``): causal streaming for input that changes.
      Calls ``1..T`` accumulate and return zeros; calls ``T+1..2T`` return the first window's
      spikes while accumulating the next. A net with ``L`` TPP layers on its longest path needs
      ``(L + 1)·T`` steps (:func:`~tpp_plugin.adapters.spikingjelly.steps_needed`). For the same
      seed the streamed spikes equal the multi-step spikes bit for bit.

    State (reset by ``functional.reset_net``): ``v`` — the potential of the window being
    integrated (``v_init`` at a window boundary); ``t`` — steps of the window so far;
    ``spike_buffer`` — the fired window being emitted; ``window_input`` — the synchronous
    window's input.

    Example::

        >>> from spikingjelly.activation_based import functional
        >>> node = TPPNode(count='exact', step_mode='m', seed=0)
        >>> x_seq = torch.full((4, 2, 3), 0.5)          # [T, N, C], Σx = 2θ per neuron
        >>> node(x_seq).sum(0)
        tensor([[2., 2., 2.],
                [2., 2., 2.]])
        >>> functional.reset_net(node)
    """

    def __init__(
        self,
        v_threshold: float = 1.0,
        v_reset=None,
        v_init: float = 0.0,
        count: str = "bernoulli",
        T: int | None = None,
        step_mode: str = "s",
        seed: int | None = None,
        generator: torch.Generator | None = None,
        store_v_seq: bool = False,
        backend: str = "torch",
        surrogate_function=None,
        detach_reset: bool = False,
        streaming: str = "synchronous",
        pool: nn.Module | None = None,
    ):
        if v_reset is not None:
            raise ValueError(
                f"TPPNode only has a soft reset (v ← v − θ); v_reset must be None, got {v_reset!r}"
            )
        if surrogate_function is not None or detach_reset:
            raise ValueError(
                "TPPNode is an inference neuron: it has no surrogate gradient, so "
                "surrogate_function must be None and detach_reset False (train the ANN, e.g. "
                "with tpp_plugin.QCFS activations, then convert)"
            )
        if pool is not None and (
                not isinstance(pool, nn.Module) or isinstance(pool, base.StepModule)):
            raise TypeError(
                f"pool must be a plain torch module such as nn.MaxPool2d(2), got {pool!r}"
            )
        v_threshold = F.check_threshold(v_threshold, "v_threshold")
        v_init = check_v_init(v_init)
        count = F.check_count(count)
        self._base_init(step_mode, backend, store_v_seq=bool(store_v_seq))
        self._init_window(T, seed, generator, backend, streaming)
        self.pool = pool
        self.v_threshold = v_threshold
        self.v_init = v_init
        self.count = count
        self.set_reset_value("v", self.v_init)
        self.v = self.v_init

    def extra_repr(self) -> str:
        streaming = "" if self.streaming == "synchronous" else f", streaming={self.streaming!r}"
        return (
            f"v_threshold={self.v_threshold}, v_init={self.v_init}, count={self.count!r}, "
            f"T={self.T}, step_mode={self.step_mode}, backend={self.backend}{streaming}"
        )

    def _pooled(self, v: torch.Tensor) -> torch.Tensor:
        return v if self.pool is None else self.pool(v)

    def fire(self, v: torch.Tensor, T: int, return_v_seq: bool = False):
        """Phase 2 of one window from its (pooled) potential ``v``: spikes ``[T, *v.shape]``
        (and the potential after each step with ``return_v_seq``), from this neuron's stream."""
        if self.backend == "cupy":
            stream = self.random_stream.philox()
            if isinstance(self.v_threshold, torch.Tensor) and not return_v_seq:
                return kernels.fire_potentials(v.unsqueeze(0), T, self.v_threshold, self.count,
                                               stream)
            return kernels.tpp_window(v.unsqueeze(0), T, self.v_threshold, self.count, stream,
                                      steps_in=1, return_v_seq=return_v_seq)
        return F.tpp_fire(
            v, T, self.v_threshold, self.count, self.random_stream.generator_for(v.device),
            return_v_seq=return_v_seq,
        )

    def count_forward(self, x: torch.Tensor, T: int, bernoulli: str) -> torch.Tensor:
        """Count-domain forward (:func:`tpp_plugin.count_mode`): ``count/T`` from the mean
        current ``x``."""
        return count_domain.window_counts(
            x, T, v_init=self.v_init, threshold=self.v_threshold, count=self.count,
            stream=self.random_stream, bernoulli=bernoulli, pool=self.pool,
            fire=self.fire if self.backend == "cupy" else None).div_(T)

    def single_step_forward(self, x: torch.Tensor) -> torch.Tensor:
        T = self._check_streaming(x)
        if self.streaming == "synchronous":
            return self._synchronous_step(x, T)
        F.check_tensor(x, "x")
        out, v = self._delayed_step(
            x, T, self.v,
            integrate=lambda acc, x, t: x + self.v_init if acc is None else acc + x,
            fire=lambda v: self.fire(self._pooled(v), T),
            silence=lambda: torch.zeros_like(self._pooled(x)))
        self.v = self.v_init if v is None else v
        return out

    def multi_step_forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        T = self._window_length(x_seq)
        self._check_multi_step_allowed()
        fused = (self.backend == "cupy" and self.pool is None
                 and not isinstance(self.v_threshold, torch.Tensor))
        if fused:  # all windows in one fused launch
            fired = kernels.tpp_window(
                x_seq, T, self.v_threshold, self.count, self.random_stream.philox(),
                v_init=self.v_init, return_v_seq=self.store_v_seq,
            )
            if not self.store_v_seq:
                return fired
            spikes, self.v_seq = fired
            return spikes
        F.check_tensor(x_seq, "x_seq")
        # every window is accumulated and checked before the first one draws random numbers
        potentials = [
            self._pooled(F.tpp_accumulate(x_seq[s : s + T], self.v_init))
            for s in range(0, x_seq.shape[0], T)
        ]
        if isinstance(self.v_threshold, torch.Tensor):
            F.check_broadcast(self.v_threshold, potentials[0].shape, "v_threshold")
        windows = [self.fire(v, T, self.store_v_seq) for v in potentials]
        if self.store_v_seq:
            windows, v_seq = zip(*windows)
            self.v_seq = _join_windows(v_seq)
        return _join_windows(windows)


class TemporalPermutation(_WindowModule, base.MemoryModule):
    r"""Randomly rearrange spike trains in time; every neuron keeps its spike count.

    Placed after the IF neurons of a converted network this is the paper's misalignment
    experiment: it raises accuracy at low ``T``.

    :param scope: ``'neuron'`` — an independent permutation per neuron (default); ``'sample'`` —
        one per sample; ``'layer'`` — one for the whole tensor
    :param T: window length; required in single-step mode
    :param streaming: single-step behaviour, as for :class:`TPPNode`: ``'synchronous'``
        (default: the input is constant within a window — then its permutation is the input
        itself — and a changed input raises) or ``'delayed'`` (buffers one window and emits it
        permuted, one window of delay)
    :param seed: seed of the module's own random stream
    :param generator: a ``torch.Generator`` to draw from instead
    :param step_mode: ``'s'`` (default) or ``'m'``
    :param backend: ``'torch'`` or ``'cupy'`` (a fused CUDA Fisher–Yates kernel for
        ``scope='neuron'``, windows of up to 1024 steps; the ``'sample'``/``'layer'`` scopes are
        a single gather and use torch ops on either backend)

    Shape: multi-step ``[T·k, N, *]`` → same; single-step ``[N, *]`` → same.

    Example::

        >>> perm = TemporalPermutation(step_mode='m', seed=0)
        >>> s = torch.tensor([[[1.]], [[1.]], [[0.]], [[0.]]])   # [T=4, N=1, 1]
        >>> perm(s).sum(0)
        tensor([[2.]])
    """

    def __init__(
        self,
        scope: str = "neuron",
        T: int | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        step_mode: str = "s",
        backend: str = "torch",
        streaming: str = "synchronous",
    ):
        scope = F.check_scope(scope)
        self._base_init(step_mode, backend)
        self._init_window(T, seed, generator, backend, streaming)
        self.scope = scope
        self.register_memory("window", None)

    def extra_repr(self) -> str:
        return f"scope={self.scope!r}, T={self.T}, step_mode={self.step_mode}"

    def count_forward(self, x: torch.Tensor, T: int, bernoulli: str) -> torch.Tensor:
        """Count-domain forward: a permutation keeps every count (and draws nothing)."""
        return x

    def _permute(self, x_seq: torch.Tensor, T: int | None = None) -> torch.Tensor:
        """Permute every window of ``T`` steps (default: ``x_seq`` is one window)."""
        T = x_seq.shape[0] if T is None else T
        if self.backend == "cupy" and self.scope == "neuron":
            return kernels.tpp_permute(x_seq, T, self.random_stream.philox())
        generator = self.random_stream.generator_for(x_seq.device)
        return _join_windows(
            [
                F.permute_time(x_seq[s : s + T], self.scope, generator)
                for s in range(0, x_seq.shape[0], T)
            ]
        )

    def single_step_forward(self, x: torch.Tensor) -> torch.Tensor:
        T = self._check_streaming(x)
        if self.streaming == "synchronous":
            return self._synchronous_step(x, T)

        def integrate(window, x, t):
            window = x.new_empty((T, *x.shape)) if window is None else window
            window[t] = x
            return window

        out, self.window = self._delayed_step(x, T, self.window, integrate, self._permute,
                                              lambda: torch.zeros_like(x))
        return out

    def multi_step_forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        T = self._window_length(x_seq)
        F.check_tensor(x_seq, "x_seq")  # NaN/inf refused, as by snnTorch's TemporalPermutation
        self._check_multi_step_allowed()
        return self._permute(x_seq, T)
