r"""SpikingJelly glue: :class:`TPPNode`, :class:`TemporalPermutation` and the converter hooks.

Works on PyPI ``spikingjelly==2.0.0`` (``ann2snn.RateCodingRecipe``) and
``spikingjelly==0.0.0.0.14`` (``ann2snn.Converter(dataloader, ...)``). All firing math is in
:mod:`tpp_plugin.functional`.

After ``import tpp_plugin``::

    from spikingjelly.activation_based import ann2snn, functional
    converter = ann2snn.Converter(
        ann2snn.RateCodingRecipe(loader, mode='99.9%', neuron='tpp'))   # 2.0.0
    # converter = ann2snn.Converter(loader, mode='99.9%', neuron='tpp')  # 0.0.0.0.14
    snn = converter.convert(ann)                       # 0.0.0.0.14: converter(ann)
    functional.set_step_mode(snn, 'm')
    out = snn(x.unsqueeze(0).repeat(T, 1, 1, 1, 1)).mean(0)
"""

from __future__ import annotations

import copy
import functools
import inspect
import math
import warnings

import torch
from spikingjelly.activation_based import ann2snn, base, layer
from spikingjelly.activation_based import functional as sj_functional
from spikingjelly.activation_based import neuron as sj_neuron
from spikingjelly.activation_based.ann2snn.modules import VoltageScaler
from torch import fx, nn

from .. import functional as F
from ..convert import (
    batch_inputs,
    check_calibration_mode,
    check_momentum,
    named_modules_of_type,
    set_submodule,
)
from ..qcfs import QCFS
from ..registry import NEURON_NAMES, _warn_once, current_default_neuron

__all__ = [
    "TPPNode",
    "TemporalPermutation",
    "NeuronFactory",
    "make_neuron",
    "swap_neurons",
    "insert_permutation",
    "convert_qcfs",
    "QCFSRecipe",
    "TPPCalibrationRecipe",
    "convert_calibrated",
    "calibrated_thresholds",
    "ChannelScaler",
    "WindowSynchronizer",
    "window_synchronous",
    "absorb_max_pools",
    "align_delays",
    "WindowDelay",
    "steps_needed",
    "STREAMING_MODES",
    "IS_LEGACY",
    "reset",
    "install",
]

#: ``True`` on the ``0.0.0.0.14`` line (``ann2snn.Converter(dataloader, ...)``, no recipes)
IS_LEGACY = not hasattr(ann2snn, "RateCodingRecipe")

_SINGLE_STEP_NEEDS_T = (
    "{cls} in single-step mode needs the window length: pass T=... (the number of single-step "
    "calls per window, e.g. the T of your evaluation loop), or call "
    "functional.set_step_mode(net, 'm') and feed [T, N, ...] sequences"
)
_CHANGED_INPUT = (
    "{what}: the input of single-step call {step}/{T} differs from the first call of this "
    "window{shape}. In single-step mode a TPP network computes each window of T steps at its "
    "first call, which needs the same input at every step of the window (rate coding, as in "
    "SpikingJelly's ann2snn examples). Call functional.reset_net(net) before a new batch; for "
    "input that changes over time feed [T, N, ...] in multi-step mode "
    "(functional.set_step_mode(net, 'm')), or stream causally with streaming='delayed' "
    "(one window of delay per TPP layer; docs/design.md, 'Window semantics')"
)
#: single-step behaviours of :class:`TPPNode` and :class:`TemporalPermutation`
STREAMING_MODES = ("synchronous", "delayed")


def _check_streaming_mode(streaming) -> str:
    if streaming not in STREAMING_MODES:
        raise ValueError(f"streaming must be one of {STREAMING_MODES}, got {streaming!r}")
    return streaming


def _check_v_init(v_init) -> float:
    if isinstance(v_init, bool) or not isinstance(v_init, (int, float)):
        raise TypeError(f"v_init must be a number, got {type(v_init).__name__}")
    if not math.isfinite(v_init):
        raise ValueError(f"v_init must be finite, got {v_init}")
    return float(v_init)


def _join_windows(parts) -> torch.Tensor:
    """Concatenate per-window outputs along time (a single window is returned as is, uncopied)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class _TPPModule(base.MemoryModule):
    """Window bookkeeping, randomness and backend shared by :class:`TPPNode` and
    :class:`TemporalPermutation`."""

    def __init__(self, T, seed, generator, step_mode, backend, streaming="synchronous"):
        super().__init__()
        self.T = None if T is None else F.check_window(T)
        self.streaming = _check_streaming_mode(streaming)
        F.check_seed(seed, generator)
        self.seed = seed
        self.generator = generator
        self._seeded = {}
        self._philox = None
        self.backend = backend
        self.step_mode = step_mode
        self.register_memory("t", 0)
        self.register_memory("spike_buffer", None)
        self.register_memory("window_input", None)
        self.register_memory("stream_shape", None)

    # -- randomness ------------------------------------------------------------------------------
    def manual_seed(self, seed: int) -> None:
        """Restart this module's random stream from ``seed`` (on every device).

        The one public way to reseed a module (snnTorch's :class:`~tpp_plugin.adapters.snntorch.TPP`
        has the same method). A ``generator`` given at construction is dropped.

        :param seed: an int in ``[0, 2**64)``
        :raises TypeError: if ``seed`` is not an int (the state is then unchanged)
        :raises ValueError: if it is out of range (likewise)

        Example::

            >>> node = TPPNode(step_mode='m', seed=0)
            >>> x = torch.full((4, 1, 3), 0.3)
            >>> a = node(x); node.manual_seed(0); b = node(x)
            >>> torch.equal(a, b)
            True
        """
        seed = F.check_seed_value(seed)
        self.seed, self.generator, self._seeded, self._philox = seed, None, {}, None

    def _generator(self, device: torch.device):
        if self.generator is not None or self.seed is None:
            return self.generator
        key = str(device)
        if key not in self._seeded:
            self._seeded[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._seeded[key]

    def _philox_stream(self):
        """The ``'cupy'`` backend's random stream: the module's own for a seed, else a fresh key
        drawn from the generator (or torch's global generator) for every call
        (:func:`tpp_plugin.kernels.cupy.module_stream`)."""
        from ..kernels.cupy import module_stream

        return module_stream(self)

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
            from ..kernels.cupy import load_nvrtc

            load_nvrtc()  # ImportError with the install command if CuPy/NVRTC is missing
        self._tpp_backend = value

    # -- windows ---------------------------------------------------------------------------------
    def _window_length(self, x_seq: torch.Tensor) -> int:
        F.check_tensor(x_seq, "x_seq", min_dim=2, finite=False)
        steps = x_seq.shape[0]
        if steps == 0:
            raise ValueError(
                f"x_seq has an empty time dimension (shape {tuple(x_seq.shape)}); multi-step "
                "mode needs [T, N, ...] with T >= 1"
            )
        T = self.T or steps
        if steps % T:
            raise ValueError(
                f"x_seq has {steps} time steps, which is not a multiple of the window T={T}"
            )
        return T

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
        """Window-synchronous single step: the whole window is computed at its first call from
        ``x`` repeated ``T`` times (exactly the multi-step result); later calls of the window
        check that ``x`` is unchanged and return the next step."""
        if self.t == 0:
            F.check_tensor(x, "x")
            self.spike_buffer = self.multi_step_forward(x.unsqueeze(0).expand(T, *x.shape))
            self.window_input = x.clone()
        elif not torch.equal(x, self.window_input):
            shape = (f" (shape {tuple(x.shape)}, the window started with "
                     f"{tuple(self.window_input.shape)})"
                     if x.shape != self.window_input.shape else "")
            raise ValueError(_CHANGED_INPUT.format(
                what=type(self).__name__, step=self.t + 1, T=T, shape=shape))
        out = self.spike_buffer[self.t]
        self.t = (self.t + 1) % T
        if self.t == 0:
            self.spike_buffer = self.window_input = None
        return out

    def _check_multi_step_allowed(self):
        if self.t != 0:
            raise RuntimeError(
                f"{type(self).__name__} is in the middle of a single-step window "
                f"({self.t}/{self.T} steps); call functional.reset_net(net) before a "
                "multi-step call"
            )


class TPPNode(_TPPModule):
    r"""Two-phase probabilistic (TPP) spiking neuron (Bojković, Wu & Gu, ICML 2025).

    Phase 1 integrates a whole window of ``T`` inputs, ``v = v_init + Σ_t x_t``, without firing;
    phase 2 fires for ``T`` steps, at step ``t`` with probability
    ``clamp(v / (θ·(T − t + 1)), 0, 1)`` and soft reset ``v ← v − θ``. Spikes therefore land at
    random times, which removes the *temporal misalignment* that makes converted IF networks
    fail at low ``T``.
    ``count='exact'`` rounds ``v`` to a whole number of thresholds first (deterministic count,
    random positions): a network of such neurons computes exactly the QCFS ANN with ``L = T``.

    :param v_threshold: threshold θ (> 0)
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
    :param seed: seed of this neuron's own random stream (reproducible spikes)
    :param generator: a ``torch.Generator`` to draw from instead (mutually exclusive with ``seed``)
    :param store_v_seq: in multi-step mode keep ``v_seq``, the potential after each firing step
    :param backend: ``'torch'`` (reference, any device) or ``'cupy'`` (one fused CUDA kernel
        launch for all windows, :mod:`tpp_plugin.kernels.cupy`; CUDA tensors, scalar threshold;
        every ``count``; its own Philox random stream, so its spikes differ from the torch
        backend's except for the counts with ``count='exact'``; inputs are not checked for
        NaN/inf)
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
      (:func:`window_synchronous`).
    * **Single-step, delayed** (``streaming='delayed'``): causal streaming for input that changes.
      Calls ``1..T`` accumulate and return zeros; calls ``T+1..2T`` return the first window's
      spikes while accumulating the next. A net with ``L`` TPP layers on its longest path needs
      ``(L + 1)·T`` steps (:func:`steps_needed`). For the same seed the streamed spikes equal the
      multi-step spikes bit for bit.

    State (reset by ``functional.reset_net``): ``v`` — the potential of the window being
    integrated; ``t`` — steps of the window so far; ``spike_buffer`` — the fired window being
    emitted; ``window_input`` — the synchronous window's input.

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
        super().__init__(T, seed, generator, step_mode, backend, streaming)
        self.pool = pool
        self.v_threshold = F.check_threshold(v_threshold, "v_threshold")
        self.v_reset = None
        self.v_init = _check_v_init(v_init)
        self.count = F.check_count(count)
        self.store_v_seq = bool(store_v_seq)
        self.register_memory("v", self.v_init)
        if self.store_v_seq:
            self.register_memory("v_seq", None)

    def extra_repr(self) -> str:
        streaming = "" if self.streaming == "synchronous" else f", streaming={self.streaming!r}"
        return (
            f"v_threshold={self.v_threshold}, v_init={self.v_init}, count={self.count!r}, "
            f"T={self.T}, step_mode={self.step_mode}, backend={self.backend}{streaming}"
        )

    def _pooled(self, v: torch.Tensor) -> torch.Tensor:
        return v if self.pool is None else self.pool(v)

    def _fire(self, v: torch.Tensor, T: int, return_v_seq: bool = False):
        if self.backend == "cupy":
            from ..kernels import cupy as kernels

            return kernels.tpp_window(
                v.unsqueeze(0), T, self.v_threshold, self.count, self._philox_stream(),
                steps_in=1, return_v_seq=return_v_seq,
            )
        return F.tpp_fire(
            v, T, self.v_threshold, self.count, self._generator(v.device),
            return_v_seq=return_v_seq,
        )

    def single_step_forward(self, x: torch.Tensor) -> torch.Tensor:
        T = self._check_streaming(x)
        if self.streaming == "synchronous":
            return self._synchronous_step(x, T)
        F.check_tensor(x, "x")
        if self.spike_buffer is not None:
            out = self.spike_buffer[self.t]
        else:
            out = torch.zeros_like(self._pooled(x))
        v = self.v + x
        if self.t + 1 == T:
            self.spike_buffer = self._fire(self._pooled(v), T)
            self.v, self.t = self.v_init, 0
        else:
            self.v, self.t = v, self.t + 1
        return out

    def multi_step_forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        T = self._window_length(x_seq)
        self._check_multi_step_allowed()
        if self.backend == "cupy" and self.pool is None:  # all windows in one fused launch
            from ..kernels import cupy as kernels

            fired = kernels.tpp_window(
                x_seq, T, self.v_threshold, self.count, self._philox_stream(),
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
        windows = [self._fire(v, T, self.store_v_seq) for v in potentials]
        if self.store_v_seq:
            windows, v_seq = zip(*windows)
            self.v_seq = _join_windows(v_seq)
        return _join_windows(windows)


class TemporalPermutation(_TPPModule):
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
        super().__init__(T, seed, generator, step_mode, backend, streaming)
        self.scope = F.check_scope(scope)
        self.register_memory("window", None)

    def extra_repr(self) -> str:
        return f"scope={self.scope!r}, T={self.T}, step_mode={self.step_mode}"

    def _permute(self, x_seq: torch.Tensor, T: int | None = None) -> torch.Tensor:
        """Permute every window of ``T`` steps (default: ``x_seq`` is one window)."""
        T = x_seq.shape[0] if T is None else T
        if self.backend == "cupy" and self.scope == "neuron":
            from ..kernels import cupy as kernels

            return kernels.tpp_permute(x_seq, T, self._philox_stream())
        generator = self._generator(x_seq.device)
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
        out = self.spike_buffer[self.t] if self.spike_buffer is not None else torch.zeros_like(x)
        window = self.window if self.window is not None else x.new_empty((T, *x.shape))
        window[self.t] = x
        if self.t + 1 == T:
            self.spike_buffer = self._permute(window)
            self.window, self.t = None, 0
        else:
            self.window, self.t = window, self.t + 1
        return out

    def multi_step_forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        T = self._window_length(x_seq)
        F.check_tensor(x_seq, "x_seq")  # NaN/inf refused, as by snnTorch's TemporalPermutation
        self._check_multi_step_allowed()
        return self._permute(x_seq, T)


# ------------------------------------------------------------------------------------------------
# building and swapping neurons
# ------------------------------------------------------------------------------------------------
def _neuron_kind(neuron) -> str | type:
    if isinstance(neuron, str):
        key = neuron.lower()
        if key not in NEURON_NAMES:
            raise ValueError(
                f"neuron must be one of {NEURON_NAMES} or a neuron class, got {neuron!r}"
            )
        return key
    if isinstance(neuron, type) and issubclass(neuron, nn.Module):
        return neuron
    raise TypeError(f"neuron must be a name {NEURON_NAMES} or an nn.Module class, got {neuron!r}")


def make_neuron(neuron="tpp", v_threshold: float = 1.0, **kwargs) -> nn.Module:
    """Build one spiking neuron for a converted network.

    :param neuron: ``'tpp'`` (:class:`TPPNode`), ``'if'`` (SpikingJelly's ``IFNode`` with soft
        reset — the converters' default; ``v_init=`` sets its initial potential, e.g. ``0.5``
        for θ/2), or a neuron class called as ``neuron(v_threshold=..., **kwargs)``
    :param v_threshold: threshold of the neuron (``1.0`` inside SpikingJelly's scaler pair)
    :param kwargs: neuron arguments (for ``'tpp'`` those of :class:`TPPNode`)
    """
    kind = _neuron_kind(neuron)
    if kind == "tpp":
        return TPPNode(v_threshold=v_threshold, **kwargs)
    if kind == "if":
        v_init = _check_v_init(kwargs.pop("v_init", 0.0))
        node = sj_neuron.IFNode(v_threshold=v_threshold, v_reset=None, **kwargs)
        if v_init:
            node.set_reset_value("v", v_init)
            node.v = v_init
        return node
    return kind(v_threshold=v_threshold, **kwargs)


class NeuronFactory:
    """A neuron factory for SpikingJelly's converters: ``factory(scale)`` and ``factory.create()``.

    Each neuron it builds gets threshold ``v_threshold`` (the converters wrap it in a
    ``VoltageScaler`` pair, so the calibration ``scale`` is not needed). With ``seed=s`` the
    ``i``-th neuron gets seed ``functional.spawn_seeds(s, i + 1)[i]``: layers draw independent,
    reproducible streams, and different ``s`` share none (see ``docs/design.md``, "Seeds").

    Example::

        >>> factory = NeuronFactory('tpp', count='exact', step_mode='m', seed=0)
        >>> a, b = factory(), factory.create()
        >>> [a.seed, b.seed] == F.spawn_seeds(0, 2)
        True
    """

    def __init__(self, neuron="tpp", v_threshold: float = 1.0, **kwargs):
        _neuron_kind(neuron)
        if kwargs.get("seed") is not None:
            F.check_seed_value(kwargs["seed"], "neuron_kwargs['seed']")
        self.neuron, self.v_threshold, self.kwargs = neuron, v_threshold, kwargs
        self._built = 0

    def create(self, scale=None) -> nn.Module:
        kwargs = dict(self.kwargs)
        if kwargs.get("seed") is not None:
            kwargs["seed"] = F.spawn_seeds(kwargs["seed"], self._built + 1)[-1]
        self._built += 1
        return make_neuron(self.neuron, self.v_threshold, **kwargs)

    def __call__(self, scale=None) -> nn.Module:
        return self.create(scale)

    def __repr__(self) -> str:
        return f"NeuronFactory({self.neuron!r}, v_threshold={self.v_threshold}, **{self.kwargs})"


#: SpikingJelly neurons the converters build, which :func:`swap_neurons` replaces
_IF_TYPES = (sj_neuron.IFNode,) + (
    (sj_neuron.HalfThresholdIFNode,) if hasattr(sj_neuron, "HalfThresholdIFNode") else ()
)
_SPIKING_TYPES = _IF_TYPES + (TPPNode,)


def _is_half_threshold(node: nn.Module) -> bool:
    half = getattr(sj_neuron, "HalfThresholdIFNode", None)
    return half is not None and type(node) is half


def _invalidate_reset_cache(net: nn.Module) -> None:
    invalidate = getattr(sj_functional, "invalidate_reset_cache", None)
    if invalidate is not None:
        invalidate(net)


def _threshold_of(node: nn.Module) -> float:
    th = node.v_threshold
    return float(th.item() if isinstance(th, torch.Tensor) else th)


def swap_neurons(net: nn.Module, neuron="tpp", **kwargs) -> nn.Module:
    """Replace every ``IFNode``/:class:`TPPNode` in a converted network (in place).

    Each new neuron keeps the old one's threshold and step mode. Works on any SpikingJelly line
    and on networks converted by any recipe that uses those neurons.

    :param net: converted network
    :param neuron: ``'tpp'``, ``'if'`` or a neuron class (see :func:`make_neuron`)
    :param kwargs: neuron arguments; ``seed=s`` gives the ``i``-th neuron seed
        ``functional.spawn_seeds(s, n)[i]``
    :return: ``net``

    Example::

        >>> from spikingjelly.activation_based import neuron
        >>> snn = nn.Sequential(nn.Linear(3, 2), neuron.IFNode(v_reset=None))
        >>> snn = swap_neurons(snn, 'tpp', count='exact', seed=0)
        >>> type(snn[1]).__name__, snn[1].seed == F.spawn_seeds(0, 1)[0]
        ('TPPNode', True)
    """
    found = list(named_modules_of_type(net, _SPIKING_TYPES))
    if not found:
        raise ValueError("net has no IFNode or TPPNode to swap")
    seed = kwargs.pop("seed", None)
    seeds = F.spawn_seeds(seed, len(found)) if seed is not None else None
    for i, (name, old) in enumerate(found):
        node_seed = None if seed is None else seeds[i]
        set_submodule(net, name, _replacement(old, neuron, kwargs, node_seed))
    return _finish(net)


def _replacement(old: nn.Module, neuron, kwargs: dict, seed) -> nn.Module:
    """The neuron that takes ``old``'s place: same threshold, step mode and max-pool; a
    half-threshold IF stays half-threshold as ``'if'`` unless ``v_init`` is given."""
    node_kwargs = {"step_mode": old.step_mode, **kwargs}
    if seed is not None:
        node_kwargs["seed"] = seed
    kind = _neuron_kind(neuron)
    if kind == "if" and _is_half_threshold(old):
        node_kwargs.setdefault("v_init", 0.5)
    pool = getattr(old, "pool", None)
    if pool is not None:
        if kind != "tpp":
            raise ValueError(
                "this TPPNode max-pools its window potential (a converted ReLU → MaxPool pair); "
                "only a TPP neuron can take its place: convert the ANN again for IF neurons"
            )
        node_kwargs.setdefault("pool", pool)
    return make_neuron(neuron, _threshold_of(old), **node_kwargs)


def insert_permutation(
    net: nn.Module, scope: str = "neuron", T: int | None = None, seed: int | None = None
) -> nn.Module:
    """Put a :class:`TemporalPermutation` right after every spiking neuron (in place).

    With IF neurons this is the paper's temporal-misalignment experiment.

    :param net: converted network
    :param scope: permutation scope (see :class:`TemporalPermutation`)
    :param T: window length (needed in single-step mode)
    :param seed: the ``i``-th permutation gets seed ``functional.spawn_seeds(seed, n)[i]``
    :return: ``net``

    Example::

        >>> from spikingjelly.activation_based import neuron
        >>> snn = nn.Sequential(neuron.IFNode(v_reset=None, step_mode='m'))
        >>> snn = insert_permutation(snn, seed=0)
        >>> [type(m).__name__ for m in snn[0]]
        ['IFNode', 'TemporalPermutation']
    """
    F.check_scope(scope)
    found = list(named_modules_of_type(net, _SPIKING_TYPES))
    if not found:
        raise ValueError("net has no IFNode or TPPNode to follow with a permutation")
    seeds = F.spawn_seeds(seed, len(found)) if seed is not None else [None] * len(found)
    for i, (name, node) in enumerate(found):
        perm = TemporalPermutation(scope, T=T, seed=seeds[i], step_mode=node.step_mode)
        set_submodule(net, name, nn.Sequential(node, perm))
    return _finish(net)


# ------------------------------------------------------------------------------------------------
# window-synchronous single-step networks
# ------------------------------------------------------------------------------------------------
_SYNC_ATTR = "window_sync"


class WindowSynchronizer(base.MemoryModule):
    r"""The state of a window-synchronous network (see :func:`window_synchronous`).

    In single-step mode the first call of each window runs the network once in multi-step mode
    on its input repeated ``T`` times and keeps the output ``[T, N, ...]``; the next ``T − 1``
    calls check that the input is unchanged and return the following steps. Reset by
    ``functional.reset_net``; ``functional.set_step_mode(net, 'm')`` turns it into a
    pass-through.
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
        if self.t == 0:
            T = _synchronous_window(root)
            modules = [m for m in root.modules()
                       if isinstance(m, base.StepModule) and m is not self]
            modes = [m.step_mode for m in modules]
            for m in modules:
                m.step_mode = "m"
            try:
                seq = tuple(a.unsqueeze(0).expand(T, *a.shape) if isinstance(a, torch.Tensor)
                            else a for a in args)
                self.window_output = forward(root, *seq, **kwargs)
            finally:
                for m, mode in zip(modules, modes):
                    m.step_mode = mode
            self.window_T = T
            self.window_input = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        else:
            T = self.window_T
            for a, b in zip(args, self.window_input):
                if isinstance(a, torch.Tensor) and not torch.equal(a, b):
                    shape = (f" (shape {tuple(a.shape)}, the window started with "
                             f"{tuple(b.shape)})" if a.shape != b.shape else "")
                    raise ValueError(_CHANGED_INPUT.format(
                        what="window-synchronous TPP network", step=self.t + 1, T=T,
                        shape=shape))
        t = self.t
        out = torch.utils._pytree.tree_map(
            lambda o: o[t] if isinstance(o, torch.Tensor) else o, self.window_output)
        self.t = (t + 1) % T
        if self.t == 0:
            self.window_input = self.window_output = None
        return out


def _synchronous_forward(root: nn.Module, *args, **kwargs):
    return _synchronizer(root).step(root, args, kwargs)


def _synchronizer(net: nn.Module, create: bool = True):
    """The network's :class:`WindowSynchronizer`. It lives inside the first TPP module — a
    ``MemoryModule`` that ``reset_net``, ``set_step_mode`` and deep copies reach, and whose
    forward ignores children (a child of the root would join an ``nn.Sequential``'s chain)."""
    sync = next((m for m in net.modules() if isinstance(m, WindowSynchronizer)), None)
    if sync is None and create:  # e.g. its holder was swapped out: start afresh
        holder = next(iter(_tpp_modules(net)))
        sync = WindowSynchronizer()
        sync.step_mode = holder.step_mode
        holder.add_module(_SYNC_ATTR, sync)
        _invalidate_reset_cache(net)
    return sync


def _tpp_modules(net: nn.Module) -> list:
    return [m for m in net.modules() if isinstance(m, _TPPModule)]


def _synchronous_window(net: nn.Module) -> int:
    windows = {m.T for m in _tpp_modules(net)}
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

    The converters and :func:`swap_neurons` / :func:`insert_permutation` call this for you
    whenever the result has TPP layers (``streaming='synchronous'``, the default). Networks
    whose TPP layers stream with ``streaming='delayed'`` are returned unchanged.

    :param net: a network with :class:`TPPNode` / :class:`TemporalPermutation` layers
    :return: ``net``
    :raises ValueError: if its TPP layers mix ``'synchronous'`` and ``'delayed'`` streaming

    Example::

        >>> import tpp_plugin
        >>> from spikingjelly.activation_based import functional
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
    modes = {m.streaming for m in _tpp_modules(net)}
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
        _invalidate_reset_cache(net)
        return net
    _synchronizer(net)
    if installed:
        return net
    net.forward = functools.partial(_synchronous_forward, net)
    if isinstance(net, fx.GraphModule):  # GraphModule's deepcopy keeps only what its graph uses
        net.meta.setdefault("_user_preserved_attributes", {})["forward"] = net.forward
    return net


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

        >>> steps_needed(nn.Sequential(TPPNode(T=8), TPPNode(T=8)))
        8
        >>> steps_needed(nn.Sequential(TPPNode(T=8, streaming='delayed'),
        ...                            TPPNode(T=8, streaming='delayed')))
        24
    """
    layers = _tpp_modules(net)
    if T is None:
        T = _synchronous_window(net)
    T = F.check_window(T)
    delayed = [m for m in layers if m.streaming == "delayed"]
    if not delayed:
        return T
    return (_longest_delay(net, delayed) + 1) * T


def _longest_delay(net: nn.Module, delayed: list) -> int:
    """The largest number of ``delayed`` modules on one path through ``net``'s fx graph (all of
    them, for a plain chain of modules that cannot be traced)."""
    try:
        gm = net if isinstance(net, fx.GraphModule) else fx.symbolic_trace(net)
    except Exception:  # not traceable: assume one chain
        return len(delayed)
    return max(_window_delays(gm).values(), default=0)


def _window_delays(gm: fx.GraphModule) -> dict:
    """Windows of delay of each graph node's output in delayed streaming: the delayed TPP
    modules (and :class:`WindowDelay` buffers) on the longest path to it."""
    modules = dict(gm.named_modules())
    depth: dict = {}
    for node in gm.graph.nodes:
        d = max((depth[a] for a in node.all_input_nodes), default=0)
        module = modules.get(node.target) if node.op == "call_module" else None
        if module is not None:
            for m in module.modules():
                if isinstance(m, _TPPModule) and m.streaming == "delayed":
                    d += 1
                elif isinstance(m, WindowDelay):
                    d += m.windows
        depth[node] = d
    return depth


class WindowDelay(base.MemoryModule):
    """Delays a single-step stream by ``windows`` windows of ``T`` steps (zeros until then); the
    identity in multi-step mode, where TPP layers have no delay. :func:`align_delays` puts it
    on the shorter branches of a delayed-streaming network."""

    def __init__(self, windows: int, T: int, step_mode: str = "s"):
        super().__init__()
        self.windows, self.T = F.check_window(windows, "windows"), F.check_window(T)
        self.step_mode = step_mode
        self.register_memory("queue", None)

    def extra_repr(self) -> str:
        return f"windows={self.windows}, T={self.T}, step_mode={self.step_mode}"

    def single_step_forward(self, x: torch.Tensor) -> torch.Tensor:
        self.queue = [*(self.queue or []), x]
        if len(self.queue) > self.windows * self.T:
            out, self.queue = self.queue[0], self.queue[1:]
            return out
        return torch.zeros_like(x)

    def multi_step_forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        return x_seq


def align_delays(gm: nn.Module) -> nn.Module:
    """Equalise the delay of every branch of a delayed-streaming network (in place).

    With ``streaming='delayed'`` each TPP layer delays its stream by one window. Where branches
    with different numbers of TPP layers meet (a residual ``add``: the shortcut passes fewer),
    the shorter ones get a :class:`WindowDelay`, so every op combines the same window of every
    branch. A no-op for other networks.

    :param gm: a converted network (``fx.GraphModule``)
    :return: ``gm``
    """
    if not isinstance(gm, fx.GraphModule):
        return gm
    delayed = [m for m in _tpp_modules(gm) if m.streaming == "delayed"]
    windows = {m.T for m in delayed}
    if len(windows) != 1 or None in windows:  # nothing to align yet: single steps need T first
        return gm
    T = windows.pop()
    depth = _window_delays(gm)
    count = 0
    for node in list(gm.graph.nodes):
        inputs = node.all_input_nodes
        if len(inputs) < 2:
            continue
        longest = max(depth[a] for a in inputs)
        for arg in inputs:
            if depth[arg] == longest:
                continue
            name = f"window_delay_{count}"
            while hasattr(gm, name):
                count += 1
                name = f"window_delay_{count}"
            gm.add_submodule(name, WindowDelay(longest - depth[arg], T, delayed[0].step_mode))
            with gm.graph.inserting_before(node):
                delay = gm.graph.call_module(name, args=(arg,))
            node.replace_input_with(arg, delay)
            depth[delay] = longest
            count += 1
    gm.graph.lint()
    gm.recompile()
    _invalidate_reset_cache(gm)
    return gm


# ------------------------------------------------------------------------------------------------
# max-pooling of window potentials
# ------------------------------------------------------------------------------------------------
_MAX_POOL_TYPES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)


def _scaler_types() -> tuple:
    from spikingjelly.activation_based.ann2snn import modules as ann2snn_modules

    names = ("VoltageScaler", "ChannelVoltageScaler")
    return tuple(getattr(ann2snn_modules, n) for n in names if hasattr(ann2snn_modules, n))


def _unwrapped(module):
    """The module inside a one-module step-mode container, else ``module``."""
    if isinstance(module, nn.Sequential) and len(module) == 1:
        return module[0]
    return module


def _plain_max_pool(module: nn.Module) -> nn.Module:
    """A plain torch copy of a (possibly SpikingJelly step-mode) max-pool module."""
    if getattr(module, "return_indices", False):
        raise ValueError(f"a max-pool with return_indices=True cannot be converted: {module}")
    for cls in _MAX_POOL_TYPES:
        if isinstance(module, cls):
            if "Adaptive" in cls.__name__:
                return cls(module.output_size)
            return cls(module.kernel_size, module.stride, module.padding, module.dilation,
                       ceil_mode=module.ceil_mode)
    raise TypeError(f"not a max-pool: {module!r}")


def absorb_max_pools(gm: nn.Module) -> nn.Module:
    r"""Move every max-pool next to a :class:`TPPNode` into the neuron (in place).

    A TPP neuron has its whole window before it fires, so it can max-pool *window potentials*:
    ``ReLU → MaxPool`` (as ``neuron → scaler → MaxPool``) and ``MaxPool → ReLU`` (as
    ``MaxPool → scaler → neuron``, SpikingJelly's channel-wise recipes) both become the neuron
    with ``pool=MaxPool``. An exact-count network then computes the ANN with max-pooling and
    T-level rounding exactly (a monotone rounding commutes with max); IF neurons can only pool
    per-step currents or spikes, an approximation.

    :param gm: a converted network (``fx.GraphModule``; other modules are returned as they are)
    :return: ``gm``
    :raises ValueError: for a max-pool that acts on spikes but has no TPP neuron right before or
        after it (one whose output feeds nothing else), naming the graph node
    """
    if not isinstance(gm, fx.GraphModule) or not any(
            isinstance(m, TPPNode) for m in gm.modules()):
        return gm
    modules = dict(gm.named_modules())
    scalers = _scaler_types()

    def module_of(node):
        return _unwrapped(modules.get(node.target)) if node.op == "call_module" else None

    def spiking(node, seen=None) -> bool:  # does the node's value depend on a spiking neuron?
        seen = set() if seen is None else seen
        for arg in node.all_input_nodes:
            if arg in seen:
                continue
            seen.add(arg)
            if isinstance(module_of(arg), base.MemoryModule) or spiking(arg, seen):
                return True
        return False

    def free_neuron(node):
        module = module_of(node)
        ok = isinstance(module, TPPNode) and module.pool is None and len(node.users) == 1
        return module if ok else None

    changed = False
    for node in list(gm.graph.nodes):
        pool = module_of(node)
        if not isinstance(pool, _MAX_POOL_TYPES):
            continue
        before = node.args[0]
        while isinstance(module_of(before), scalers) and len(before.users) == 1:
            before = before.args[0]
        after = next(iter(node.users)) if len(node.users) == 1 else None
        while after is not None and isinstance(module_of(after), scalers):
            after = next(iter(after.users)) if len(after.users) == 1 else None
        neuron = free_neuron(before) if isinstance(before, fx.Node) else None
        if neuron is None and after is not None:
            neuron = free_neuron(after) if len(node.users) == 1 else None
        if neuron is None:
            if spiking(node):
                raise ValueError(
                    f"max-pool {node.target!r} acts on spikes, and no TPP neuron sits right "
                    "before or after it (with nothing else using its output), so it cannot pool "
                    "window potentials: put it directly after a ReLU (ReLU → MaxPool) or use "
                    "average pooling"
                )
            continue
        neuron.pool = _plain_max_pool(pool)
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
        changed = True
    if changed:
        gm.graph.lint()
        gm.delete_all_unused_submodules()
        gm.recompile()
        _invalidate_reset_cache(gm)
    return gm


def _finish(net: nn.Module) -> nn.Module:
    """What every conversion or swap ends with: max-pools into TPP neurons, window-synchronous
    single steps (and, on 0.0.0.0.14, multi-step support, which the synchronous window uses)."""
    if IS_LEGACY and isinstance(net, fx.GraphModule):
        make_step_mode_capable(net)
    _invalidate_reset_cache(net)
    return window_synchronous(align_delays(absorb_max_pools(net)))


# ------------------------------------------------------------------------------------------------
# QCFS conversion (no calibration: threshold = λ)
# ------------------------------------------------------------------------------------------------
def _qcfs_default_kwargs(neuron, neuron_kwargs) -> dict:
    kwargs = dict(neuron_kwargs or {})
    if _neuron_kind(neuron) == "if":
        kwargs.setdefault("v_init", 0.5)  # θ/2 in units of the (scaled) threshold
    return kwargs


def _replace_activation_nodes(gm: fx.GraphModule, thresholds: dict, factory: NeuronFactory):
    """Replace each ``call_module`` node whose target is in ``thresholds`` by
    ``VoltageScaler(1/θ) → neuron → VoltageScaler(θ)``, named like SpikingJelly's converters."""
    nodes = [n for n in gm.graph.nodes if n.op == "call_module" and n.target in thresholds]
    blocks = [(n, VoltageScaler(1.0 / thresholds[n.target]), factory.create(thresholds[n.target]),
               VoltageScaler(thresholds[n.target])) for n in nodes]
    return _insert_spiking_blocks(gm, blocks, "tpp_spiking")


def _insert_spiking_blocks(gm: fx.GraphModule, blocks, stem: str) -> fx.GraphModule:
    """Replace each activation node of ``blocks = [(node, scaler0, neuron, scaler1)]`` by
    ``scaler0 → neuron → scaler1``, registered as ``<parent>.<stem>_<i>.{scaler0,if_node,
    scaler1}`` like SpikingJelly's converters (in place)."""
    for count, (node, *modules) in enumerate(blocks):
        parent = node.target.rpartition(".")[0]
        prefix = f"{parent}.{stem}_{count}" if parent else f"{stem}_{count}"
        last = node
        for leaf, module in zip(("scaler0", "if_node", "scaler1"), modules):
            gm.add_submodule(f"{prefix}.{leaf}", module)
            with gm.graph.inserting_after(last):
                last = gm.graph.call_module(
                    f"{prefix}.{leaf}", args=node.args if leaf == "scaler0" else (last,))
        node.replace_all_uses_with(last)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def _qcfs_thresholds_as_relu(ann: nn.Module) -> tuple[nn.Module, dict]:
    """A copy of ``ann`` with every QCFS replaced by ``nn.ReLU`` (an FX leaf), and their λ."""
    qcfs = list(named_modules_of_type(ann, QCFS))
    if not qcfs:
        raise ValueError(
            "the model has no tpp_plugin.QCFS activation; use the rate-coding converter"
        )
    ann = copy.deepcopy(ann)
    thresholds = {}
    for name, module in qcfs:
        thresholds[name] = module.threshold
        set_submodule(ann, name, nn.ReLU())
    return ann, thresholds


if not IS_LEGACY:
    from spikingjelly.activation_based.ann2snn.recipes.step_mode_adapters import (
        _RATE_CODING_SAFE_MODULE_TYPES,
        _RATE_CODING_STATELESS_MODULE_TYPES,
        adapt_step_mode_graph,
    )

    def _adapt_step_modes(fx_model, recipe: str, device):
        """SpikingJelly 2.x's step-mode adaptation of a converted graph, as its own recipes do."""
        return adapt_step_mode_graph(
            fx_model,
            context=f"{recipe} step-mode backend",
            wrap_module_types=_RATE_CODING_STATELESS_MODULE_TYPES,
            safe_module_types=_RATE_CODING_SAFE_MODULE_TYPES,
            safe_call_functions=(torch.nn.functional.dropout,),
        ).to(device)

    class QCFSRecipe(ann2snn.ConversionRecipe):
        """SpikingJelly 2.x recipe for QCFS-trained ANNs: each ``QCFS(λ, L)`` becomes a spiking
        neuron with threshold ``λ`` — no calibration data needed.

        :param neuron: ``'tpp'`` (default), ``'if'`` (initial potential θ/2 unless ``v_init`` is
            given) or a neuron class
        :param neuron_kwargs: neuron arguments, e.g. ``{'count': 'exact', 'seed': 0}``

        Example::

            >>> from spikingjelly.activation_based import functional
            >>> from tpp_plugin import QCFS
            >>> qcfs_ann = nn.Sequential(nn.Linear(3, 4), QCFS(L=4), nn.Linear(4, 2))
            >>> recipe = QCFSRecipe(neuron='tpp', neuron_kwargs={'count': 'exact', 'seed': 0})
            >>> snn = ann2snn.Converter(recipe).convert(qcfs_ann)
            >>> functional.set_step_mode(snn, 'm')
            >>> snn(torch.rand(4, 5, 3)).shape            # [T, N, features]
            torch.Size([4, 5, 2])
        """

        _tpp_switchable = True  # it takes neuron= itself

        def __init__(self, neuron="tpp", neuron_kwargs: dict | None = None):
            self.factory = NeuronFactory(neuron, **_qcfs_default_kwargs(neuron, neuron_kwargs))
            self._thresholds: dict = {}

        def before_trace(self, converter, ann):
            ann, self._thresholds = _qcfs_thresholds_as_relu(ann)
            return ann.eval()

        def replace(self, converter, fx_model):
            fx_model = _replace_activation_nodes(fx_model, self._thresholds, self.factory)
            return _adapt_step_modes(fx_model, "QCFSRecipe", converter.device)

        def finalize(self, converter, fx_model):
            return _finish(fx_model)

else:
    QCFSRecipe = None


def convert_qcfs(ann: nn.Module, neuron="tpp", neuron_kwargs: dict | None = None) -> nn.Module:
    """Convert a QCFS-trained ANN to a SpikingJelly SNN on either SpikingJelly line.

    On 2.x this runs ``ann2snn.Converter(QCFSRecipe(...)).convert(ann)``; on 0.0.0.0.14 it traces
    the model with ``torch.fx`` and wraps the stateless layers in step-mode containers, so the
    result runs in both step modes. The ANN itself is not modified.

    :param ann: model with :class:`tpp_plugin.QCFS` activations
    :param neuron: ``'tpp'`` (default), ``'if'`` or a neuron class
    :param neuron_kwargs: neuron arguments
    :return: the SNN (an ``fx.GraphModule``), in single-step mode

    Example::

        >>> from spikingjelly.activation_based import functional
        >>> from tpp_plugin import QCFS
        >>> ann = nn.Sequential(nn.Linear(3, 4), QCFS(L=4), nn.Linear(4, 2)).eval()
        >>> snn = convert_qcfs(ann, 'tpp', {'count': 'exact', 'seed': 0})
        >>> functional.set_step_mode(snn, 'm')
        >>> x, T = torch.rand(5, 3), 4
        >>> out = snn(x.unsqueeze(0).repeat(T, 1, 1)).mean(0)
        >>> torch.allclose(out, ann(x), atol=1e-5)      # exact counts == the QCFS ANN, L = T
        True
    """
    if not IS_LEGACY:
        return ann2snn.Converter(QCFSRecipe(neuron, neuron_kwargs)).convert(ann)
    factory = NeuronFactory(neuron, **_qcfs_default_kwargs(neuron, neuron_kwargs))
    relu_ann, thresholds = _qcfs_thresholds_as_relu(ann)
    device = next(relu_ann.parameters(), torch.empty(0)).device
    gm = fx.symbolic_trace(relu_ann.eval())
    gm = _replace_activation_nodes(gm, thresholds, factory)
    return _finish(make_step_mode_capable(gm).to(device))


# ------------------------------------------------------------------------------------------------
# 0.0.0.0.14: make converted graphs run in multi-step mode
# ------------------------------------------------------------------------------------------------
_STATELESS_TYPES = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.Flatten, nn.Dropout,
    nn.Dropout2d, nn.Identity,
)


class _StepFlatten(nn.Module, base.StepModule):
    """``torch.flatten(x, start_dim, end_dim)`` that skips the time dimension in multi-step mode."""

    def __init__(self, start_dim: int = 0, end_dim: int = -1):
        super().__init__()
        self.start_dim, self.end_dim = start_dim, end_dim
        self.step_mode = "s"

    def forward(self, x):
        if self.step_mode == "s":
            return torch.flatten(x, self.start_dim, self.end_dim)
        flat = torch.flatten(x.flatten(0, 1), self.start_dim, self.end_dim)
        return flat.unflatten(0, x.shape[:2])


def make_step_mode_capable(gm: fx.GraphModule) -> fx.GraphModule:
    """Wrap the stateless torch layers of a converted graph in ``layer.StepModeContainer`` and
    rewrite ``torch.flatten`` calls, so ``functional.set_step_mode(gm, 'm')`` works (in place).

    Nodes that cannot be made time-aware (e.g. ``x.view(x.size(0), -1)``) are reported with a
    warning: the graph still runs in single-step mode.
    """
    wrapped = {id(inner) for outer in gm.modules() if isinstance(outer, base.StepModule)
               for inner in outer.modules() if inner is not outer}  # idempotent
    for name, module in list(gm.named_modules()):
        if (type(module) in _STATELESS_TYPES and not isinstance(module, base.StepModule)
                and id(module) not in wrapped):
            set_submodule(gm, name, layer.StepModeContainer(False, module))
    unsupported = []
    for node in list(gm.graph.nodes):
        is_flatten = (node.op == "call_function" and node.target is torch.flatten) or (
            node.op == "call_method" and node.target == "flatten"
        )
        if is_flatten:
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            target = f"step_flatten_{len(unsupported)}_{id(node)}"
            gm.add_submodule(target, _StepFlatten(start, end))
            with gm.graph.inserting_after(node):
                new = gm.graph.call_module(target, args=(node.args[0],))
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
        elif node.op in ("call_method",) and node.target in ("view", "reshape", "size"):
            unsupported.append(node.format_node())
    gm.graph.lint()
    gm.recompile()
    if unsupported:
        warnings.warn(
            "these graph nodes do not know the time dimension and fail in multi-step mode "
            f"(use nn.Flatten instead): {unsupported}",
            RuntimeWarning,
            stacklevel=2,
        )
    return gm


# ------------------------------------------------------------------------------------------------
# registration
# ------------------------------------------------------------------------------------------------
def _neuron_hook_kwargs(neuron, neuron_kwargs, neuron_factory):
    """The :class:`NeuronFactory` a converter hook installs, or ``None`` (the framework's own
    neuron): ``neuron=``/``neuron_kwargs=`` if given, else the active
    :func:`tpp_plugin.registry.default_neuron` unless the caller passed its own factory."""
    if neuron is None:
        if neuron_kwargs:
            raise TypeError("neuron_kwargs needs neuron= (e.g. neuron='tpp')")
        default = current_default_neuron()
        if default is None or neuron_factory is not None:
            return None
        name, default_kwargs = default
        return NeuronFactory(name, **default_kwargs)
    if neuron_factory is not None:
        raise TypeError("pass either neuron= or neuron_factory=, not both")
    return NeuronFactory(neuron, **dict(neuron_kwargs or {}))


def _wrap_recipe_init(original):
    """``neuron=``/``neuron_kwargs=`` for a SpikingJelly 2.x recipe that builds IF neurons:
    remembered on the recipe and applied to its result by the converter hook."""

    def __init__(self, *args, neuron=None, neuron_kwargs=None, **kwargs):
        self._tpp_factory = _neuron_hook_kwargs(neuron, neuron_kwargs, kwargs.get("neuron_factory"))
        if self._tpp_factory is not None:
            _check_calibration_arguments(original, self, args, kwargs)
        original(self, *args, **kwargs)

    return __init__


def _check_calibration_arguments(init, owner, args, kwargs) -> None:
    """Refuse, before the framework sees them, what SpikingJelly would refuse late, obscurely or
    not at all (for a recipe or 0.0.0.0.14 converter the plugin switches): a bad
    ``mode``/``momentum``, an empty calibration loader."""
    try:
        bound = inspect.signature(init).bind(owner, *args, **kwargs)
    except TypeError:
        return  # the framework's own error says which argument is wrong
    bound.apply_defaults()
    values = bound.arguments
    if "mode" in values:
        check_calibration_mode(values["mode"])
    if "momentum" in values:
        check_momentum(values["momentum"])
    loader = values.get("dataloader")
    if loader is not None and hasattr(loader, "__len__") and len(loader) == 0:
        raise ValueError(
            f"{type(owner).__name__}: the calibration dataloader is empty; thresholds come from "
            "its batches"
        )


def _run_calibration(convert, owner, ann):
    """``convert(ann)`` with a model error during calibration named as the data's fault it is."""
    try:
        return convert(ann)
    except RuntimeError as exc:
        loader = getattr(owner, "dataloader", None)
        first = next(iter(loader), None) if loader is not None else None
        if first is None:
            raise
        shape = tuple(batch_inputs(first).shape)
        raise ValueError(
            f"{type(owner).__name__}: running the model on the calibration batches failed "
            f"(first batch of shape {shape}; the model's error: {exc}); calibrate with batches "
            "shaped like the model's input"
        ) from exc


def _swap_recipe_neurons(net: nn.Module, factory: NeuronFactory) -> None:
    """Replace the IF neurons a recipe built (threshold 1 inside its scaler pair) by the
    factory's, in graph order."""
    kind = _neuron_kind(factory.neuron)
    for name, old in list(named_modules_of_type(net, _IF_TYPES, exact=True)):
        new = factory.create()
        if kind == "if" and _is_half_threshold(old) and "v_init" not in factory.kwargs:
            new = make_neuron("if", factory.v_threshold, **{**factory.kwargs, "v_init": 0.5})
        new.step_mode = old.step_mode
        set_submodule(net, name, new)


def _wrap_converter_convert(original):
    """SpikingJelly 2.x ``Converter.convert``: apply the recipe's ``neuron=`` (or the active
    :func:`~tpp_plugin.registry.default_neuron`), then :func:`absorb_max_pools` and
    :func:`window_synchronous`. A recipe the plugin cannot switch is named in a warning."""

    def convert(self, ann):
        recipe = self.recipe
        switchable = hasattr(recipe, "_tpp_factory") or getattr(recipe, "_tpp_switchable", False)
        default = current_default_neuron()
        if not switchable and default is not None:
            _warn_once(
                f"tpp_plugin: {type(recipe).__name__} builds its own neurons and takes no "
                f"neuron=; its result keeps them (the default neuron {default[0]!r} applies to "
                "RateCodingRecipe, LocalThresholdBalancingRecipe and QCFSRecipe)"
            )
        factory = getattr(recipe, "_tpp_factory", None)
        if factory is None:
            snn = original(self, ann)
        else:
            snn = _run_calibration(functools.partial(original, self), recipe, ann)
            _swap_recipe_neurons(snn, factory)
        return _finish(snn)

    return convert


def _wrap_legacy_converter_init(original):
    def __init__(self, *args, neuron=None, neuron_kwargs=None, **kwargs):
        factory = _neuron_hook_kwargs(neuron, neuron_kwargs, None)
        if factory is not None:
            _check_calibration_arguments(original, self, args, kwargs)
        original(self, *args, **kwargs)
        self.neuron_factory = factory

    return __init__


def _wrap_legacy_converter_forward(original):
    def forward(self, ann):
        factory = getattr(self, "neuron_factory", None)
        if factory is None:
            return original(self, ann)
        snn = _run_calibration(functools.partial(original, self), self, ann)
        _swap_recipe_neurons(snn, factory)
        return _finish(make_step_mode_capable(snn))

    return forward


#: SpikingJelly 2.x recipes that build IF neurons and get ``neuron=``/``neuron_kwargs=``
_SWITCHABLE_RECIPES = tuple(
    name for name in ("RateCodingRecipe", "LocalThresholdBalancingRecipe") if hasattr(ann2snn, name)
)


def reset(net: nn.Module) -> None:
    """Reset every SpikingJelly ``MemoryModule`` in ``net`` (used by :func:`tpp_plugin.reset`)."""
    for module in net.modules():
        if isinstance(module, base.MemoryModule):
            module.reset()


def install(patcher) -> None:
    """Register into SpikingJelly (called by :func:`tpp_plugin.register`)."""
    patcher.add(sj_neuron, "TPPNode", TPPNode)
    patcher.add(layer, "TemporalPermutation", TemporalPermutation)
    if IS_LEGACY:
        patcher.wrap(ann2snn.Converter, "__init__", _wrap_legacy_converter_init)
        patcher.wrap(ann2snn.Converter, "forward", _wrap_legacy_converter_forward)
    else:
        for recipe in _SWITCHABLE_RECIPES:
            patcher.wrap(getattr(ann2snn, recipe), "__init__", _wrap_recipe_init)
        patcher.wrap(ann2snn.FXConverter, "convert", _wrap_converter_convert)
        patcher.add(ann2snn, "QCFSRecipe", QCFSRecipe)
        patcher.add(ann2snn, "TPPCalibrationRecipe", TPPCalibrationRecipe)


# ------------------------------------------------------------------------------------------------
# T-aware threshold calibration (tpp_plugin.calibration)
# ------------------------------------------------------------------------------------------------
class ChannelScaler(VoltageScaler, base.StepModule):
    """Multiplies its input by a per-channel ``[C]`` scale along ``channel_dim`` (of each step, in
    multi-step mode). SpikingJelly 0.0.0.0.14 has no channel-wise scaler; this one is a
    ``VoltageScaler`` (scale in the buffer ``scale``), so the plugin's count mode and max-pool
    absorption treat it as the affine scaler it is. On 2.x the converters use SpikingJelly's own
    ``ChannelVoltageScaler``.

    :param scale: positive finite ``[C]`` tensor (or a number: the same for every channel)
    :param channel_dim: the channel dimension of a single-step input ``[N, C, *]``
    :param step_mode: ``'s'`` (``[N, C, *]``) or ``'m'`` (``[T, N, C, *]``)

    Example::

        >>> s = ChannelScaler(torch.tensor([1.0, 2.0]))
        >>> s(torch.ones(3, 2, 4)).sum((0, 2))
        tensor([12., 24.])
    """

    def __init__(self, scale=1.0, channel_dim: int = 1, step_mode: str = "s"):
        scale = torch.as_tensor(scale).detach().clone()
        if scale.dim() > 1 or scale.numel() == 0:
            raise ValueError(f"scale must be a number or a 1-D tensor, got shape "
                             f"{tuple(scale.shape)}")
        F.check_threshold(scale.double(), "scale")
        super().__init__(1.0)
        self.scale = scale
        self.channel_dim = int(channel_dim)
        self.step_mode = step_mode

    def extra_repr(self) -> str:
        return (f"scale_shape={tuple(self.scale.shape)}, channel_dim={self.channel_dim}, "
                f"step_mode={self.step_mode}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale.to(dtype=x.dtype, device=x.device)
        if scale.dim() == 0:
            return x * scale
        dim = self.channel_dim + (1 if self.step_mode == "m" and self.channel_dim >= 0 else 0)
        dim = dim + x.dim() if dim < 0 else dim
        if not 0 <= dim < x.dim() or x.shape[dim] != scale.numel():
            raise ValueError(
                f"ChannelScaler with {scale.numel()} channels (channel_dim={self.channel_dim}, "
                f"step_mode={self.step_mode!r}) cannot scale an input of shape {tuple(x.shape)}"
            )
        shape = [1] * x.dim()
        shape[dim] = scale.numel()
        return x * scale.reshape(shape)


def _channel_scaler(scale: torch.Tensor, channel_dim: int) -> nn.Module:
    """A scaler for a threshold: ``VoltageScaler`` for a scalar, else SpikingJelly's
    ``ChannelVoltageScaler`` (2.x) or :class:`ChannelScaler` (0.0.0.0.14)."""
    if scale.dim() == 0:
        return VoltageScaler(float(scale))
    channel_cls = next((c for c in _scaler_types() if c.__name__ == "ChannelVoltageScaler"), None)
    if channel_cls is not None:
        return channel_cls(scale, channel_dim=channel_dim)
    return ChannelScaler(scale, channel_dim=channel_dim)


def _calibration_factory(neuron, neuron_kwargs, T) -> NeuronFactory:
    kwargs = dict(neuron_kwargs or {})
    if _neuron_kind(neuron) == "tpp":
        kwargs.setdefault("T", T)  # single-step loops of T steps work out of the box
    return NeuronFactory(neuron, **kwargs)


def _replace_calibrated(gm: fx.GraphModule, result, factory: NeuronFactory) -> fx.GraphModule:
    """Apply the bias shifts of ``result`` and replace each calibrated ReLU call by
    ``scaler(1/θ) → neuron(v_threshold=1) → scaler(s)`` (in place; ``s`` the output scale,
    ``θ`` unless the calibration chose another)."""
    from ..calibration import activation_nodes, apply_bias_shifts

    apply_bias_shifts(gm, result)
    by_name = dict(zip(result.names, result.thresholds))
    nodes = activation_nodes(gm)
    if [n.name for n in nodes] != list(result.names):
        raise ValueError("the calibration does not belong to this graph (its ReLU calls differ)")
    scales = dict(zip(result.names, result.output_scales or [None] * len(result.names)))
    device = next(gm.parameters(), torch.empty(0)).device
    blocks = []
    for node in nodes:
        theta = by_name[node.name].to(device)
        scale = theta if scales[node.name] is None else scales[node.name].to(device)
        blocks.append((node, _channel_scaler(1.0 / theta, result.channel_dim), factory.create(),
                       _channel_scaler(scale, result.channel_dim)))
    return _insert_spiking_blocks(gm, blocks, "tpp_calibrated")


def _calibration_kwargs(kwargs: dict, neuron, neuron_kwargs) -> dict:
    """The checked arguments of ``calibrate_for_T``; ``count`` defaults to the counting rule of
    the neurons the network will have (a TPP neuron's ``count``, ``'exact'`` for others)."""
    import inspect

    from ..calibration import calibrate_for_T

    allowed = set(list(inspect.signature(calibrate_for_T).parameters)[3:]) - {"fuse"}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise TypeError(f"unknown calibration argument(s) {unknown}; choose from "
                        f"{sorted(allowed)}")
    kwargs = dict(kwargs)
    if "count" not in kwargs:
        kind = _neuron_kind(neuron)
        tpp = kind == "tpp" or (isinstance(kind, type) and issubclass(kind, TPPNode))
        default = inspect.signature(TPPNode).parameters["count"].default
        kwargs["count"] = (neuron_kwargs or {}).get("count", default) if tpp else "exact"
    return kwargs


if not IS_LEGACY:

    class TPPCalibrationRecipe(ann2snn.ConversionRecipe):
        r"""SpikingJelly 2.x recipe: thresholds calibrated for the target ``T``
        (:func:`tpp_plugin.calibration.calibrate_for_T`) and the TPP neurons' counting rule.

        A network of exact-count TPP neurons computes the ANN with every ReLU output rounded to
        ``T`` levels of its threshold, so the recipe chooses the thresholds as post-training
        quantisation for that ``T``: per channel (default) or per layer, layer by layer with the
        earlier layers already quantised, plus bias correction folded into the conv/linear
        layers. Conv-BN pairs are fused first (``fuse_flag``). Each ReLU call becomes
        ``ChannelVoltageScaler(1/θ) → neuron(v_threshold=1) → ChannelVoltageScaler(θ)``
        (``VoltageScaler`` for a per-layer θ); a ``ReLU → MaxPool`` pair pools the neuron's
        window potentials. The input ANN is not modified.

        :param dataloader: calibration data: batches ``[N, *]`` or ``(inputs, labels)``
        :param T: the number of time steps the SNN will run (per window)
        :param neuron: ``'tpp'`` (default), ``'if'`` or a neuron class
        :param neuron_kwargs: neuron arguments, e.g. ``{'count': 'exact', 'seed': 0}``; for TPP
            ``T`` defaults to the recipe's ``T``
        :param fuse_flag: fuse conv-BN pairs before calibrating
        :param calibration: more arguments of :func:`~tpp_plugin.calibration.calibrate_for_T`
            (``granularity``, ``objective``, ``bias_correction``, ``refine``, ``channel_dim``,
            ``grid``, ``max_samples``, ``seed``, ...). ``count`` (the counting rule calibrated
            for) defaults to the TPP neurons' ``count`` (``'exact'`` for other neurons)

        After conversion the recipe keeps the calibration in ``recipe.result`` (for
        :func:`~tpp_plugin.calibration.calibration_report`).

        Shape: the converted network takes ``[T, N, *]`` in multi-step mode and ``[N, *]`` per
        call in single-step mode (window-synchronous), like any SpikingJelly conversion.

        Example::

            >>> from spikingjelly.activation_based import functional
            >>> ann = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(),
            ...                     nn.Linear(4 * 6 * 6, 3)).eval()
            >>> loader, x = [torch.rand(16, 1, 8, 8)], torch.rand(5, 1, 8, 8)
            >>> recipe = ann2snn.TPPCalibrationRecipe(loader, T=4, neuron='tpp',
            ...                                       neuron_kwargs={'count': 'exact'})
            >>> snn = ann2snn.Converter(recipe).convert(ann)
            >>> functional.set_step_mode(snn, 'm')
            >>> snn(x.unsqueeze(0).repeat(4, 1, 1, 1, 1)).mean(0).shape
            torch.Size([5, 3])
        """

        _tpp_switchable = True  # it takes neuron= itself

        def __init__(self, dataloader, T: int, neuron="tpp", neuron_kwargs: dict | None = None,
                     fuse_flag: bool = True, **calibration):
            self.dataloader = dataloader
            self.T = F.check_window(T)
            self.factory = _calibration_factory(neuron, neuron_kwargs, self.T)
            self.fuse_flag = bool(fuse_flag)
            self.calibration = _calibration_kwargs(calibration, neuron, neuron_kwargs)
            self.result = None

        def validate(self, converter):
            if self.dataloader is None:
                raise ValueError("TPPCalibrationRecipe needs a dataloader of calibration inputs")

        def before_trace(self, converter, ann):
            return copy.deepcopy(ann).eval()  # bias shifts and fusion must not touch the user's

        def after_trace(self, converter, fx_model):
            from ..calibration import fuse_conv_bn

            fx_model = fx_model.to(converter.device)
            return fuse_conv_bn(fx_model) if self.fuse_flag else fx_model

        def calibrate(self, converter, fx_model):
            from ..calibration import calibrate_for_T

            self.result = calibrate_for_T(fx_model, self.dataloader, self.T, fuse=False,
                                          **self.calibration)
            self.result.settings["fuse"] = self.fuse_flag  # the graph it belongs to is fused
            return fx_model

        def replace(self, converter, fx_model):
            fx_model = _replace_calibrated(fx_model, self.result, self.factory)
            return _adapt_step_modes(fx_model, "TPPCalibrationRecipe", converter.device)

        def finalize(self, converter, fx_model):
            return _finish(fx_model)

else:
    TPPCalibrationRecipe = None


def convert_calibrated(ann: nn.Module, dataloader, T: int, neuron="tpp",
                       neuron_kwargs: dict | None = None, fuse_flag: bool = True,
                       return_result: bool = False, **calibration):
    r"""Convert a ReLU ANN with thresholds calibrated for ``T`` time steps, on either
    SpikingJelly line (2.x: ``ann2snn.Converter(TPPCalibrationRecipe(...)).convert(ann)``;
    0.0.0.0.14: the same steps with ``torch.fx`` and the plugin's step-mode wrappers, per-channel
    scales in :class:`ChannelScaler`).

    :param ann: a ReLU network (not modified)
    :param dataloader: calibration data: batches ``[N, *]`` or ``(inputs, labels)``
    :param T: the number of time steps per window
    :param neuron: ``'tpp'`` (default), ``'if'`` or a neuron class
    :param neuron_kwargs: neuron arguments, e.g. ``{'count': 'exact'}`` (TPP's ``T`` defaults to
        ``T``)
    :param fuse_flag: fuse conv-BN pairs before calibrating
    :param return_result: also return the :class:`~tpp_plugin.calibration.CalibrationResult`
    :param calibration: more arguments of :func:`~tpp_plugin.calibration.calibrate_for_T`
        (``count`` defaults to the TPP neurons' ``count``, ``'exact'`` for other neurons)
    :return: the SNN (an ``fx.GraphModule`` in single-step mode), or ``(snn, result)``

    Example::

        >>> from spikingjelly.activation_based import functional
        >>> ann = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(),
        ...                     nn.Linear(4 * 6 * 6, 3)).eval()
        >>> loader, x = [torch.rand(16, 1, 8, 8)], torch.rand(5, 1, 8, 8)
        >>> snn = convert_calibrated(ann, loader, T=4, neuron_kwargs={'count': 'exact'})
        >>> functional.set_step_mode(snn, 'm')
        >>> snn(x.unsqueeze(0).repeat(4, 1, 1, 1, 1)).mean(0).shape
        torch.Size([5, 3])
    """
    from ..calibration import calibrate_for_T, fuse_conv_bn

    if not IS_LEGACY:
        recipe = TPPCalibrationRecipe(dataloader, T, neuron, neuron_kwargs, fuse_flag,
                                      **calibration)
        snn = ann2snn.Converter(recipe).convert(ann)
        return (snn, recipe.result) if return_result else snn
    T = F.check_window(T)
    factory = _calibration_factory(neuron, neuron_kwargs, T)
    calibration = _calibration_kwargs(calibration, neuron, neuron_kwargs)
    if dataloader is None:
        raise ValueError("convert_calibrated needs a dataloader of calibration inputs")
    model = copy.deepcopy(ann).eval()
    device = next(model.parameters(), torch.empty(0)).device
    with torch.no_grad():
        gm = fx.symbolic_trace(model)
        if fuse_flag:
            gm = fuse_conv_bn(gm)
        result = calibrate_for_T(gm, dataloader, T, fuse=False, **calibration)
        result.settings["fuse"] = bool(fuse_flag)
        gm = _replace_calibrated(gm, result, factory)
    snn = _finish(make_step_mode_capable(gm).to(device))
    return (snn, result) if return_result else snn


def calibrated_thresholds(snn: nn.Module) -> list:
    """The output scale of each spiking layer of a converted network, in graph order — its
    threshold for SpikingJelly's recipes: the scale of the scaler after each neuron (a 0-d
    tensor, or ``[C]`` for channel-wise recipes such as LTB's and
    :class:`TPPCalibrationRecipe`'s). For comparing calibrations
    (:func:`tpp_plugin.calibration.calibration_report`).

    :param snn: a converted network (``fx.GraphModule``)
    :return: a list of tensors

    Example::

        >>> ann = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(),
        ...                     nn.Linear(4 * 6 * 6, 3)).eval()
        >>> snn = convert_calibrated(ann, [torch.rand(16, 1, 8, 8)], T=2)
        >>> [tuple(t.shape) for t in calibrated_thresholds(snn)]  # one per channel
        [(4,)]
    """
    modules = dict(snn.named_modules())
    out = []
    for node in snn.graph.nodes:
        if node.op == "call_module" and isinstance(_unwrapped(modules[node.target]),
                                                   _SPIKING_TYPES):
            user = next(iter(node.users))
            scaler = _unwrapped(modules[user.target])
            out.append(scaler.scale.detach().clone())
    return out
