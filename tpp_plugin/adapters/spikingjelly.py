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
import math
import warnings

import torch
from spikingjelly.activation_based import ann2snn, base, layer
from spikingjelly.activation_based import functional as sj_functional
from spikingjelly.activation_based import neuron as sj_neuron
from spikingjelly.activation_based.ann2snn.modules import VoltageScaler
from torch import fx, nn

from .. import functional as F
from ..convert import named_modules_of_type, set_submodule
from ..qcfs import QCFS
from ..registry import NEURON_NAMES, current_default_neuron

__all__ = [
    "TPPNode",
    "TemporalPermutation",
    "NeuronFactory",
    "make_neuron",
    "swap_neurons",
    "insert_permutation",
    "convert_qcfs",
    "QCFSRecipe",
    "IS_LEGACY",
    "reset",
    "install",
]

#: ``True`` on the ``0.0.0.0.14`` line (``ann2snn.Converter(dataloader, ...)``, no recipes)
IS_LEGACY = not hasattr(ann2snn, "RateCodingRecipe")

_SINGLE_STEP_NEEDS_T = (
    "{cls} in single-step mode needs the window length: pass T=... (streaming, one window of "
    "delay), or call functional.set_step_mode(net, 'm') and feed [T, N, ...] sequences"
)


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

    def __init__(self, T, seed, generator, step_mode, backend):
        super().__init__()
        self.T = None if T is None else F.check_window(T)
        F.check_seed(seed, generator)
        self.seed = seed
        self.generator = generator
        self._seeded = {}
        self._philox = None
        self.backend = backend
        self.step_mode = step_mode

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
        drawn from the generator (or torch's global generator) for every call."""
        from ..kernels.cupy import PhiloxStream

        if self.seed is not None:
            if self._philox is None:
                self._philox = PhiloxStream(self.seed)
            return self._philox
        generator = self.generator
        device = generator.device if generator is not None else "cpu"
        key = torch.randint(2**63 - 1, (), generator=generator, device=device)
        return PhiloxStream(int(key))

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

    def _check_streaming(self, x: torch.Tensor, pending) -> int:
        if self.T is None:
            raise ValueError(_SINGLE_STEP_NEEDS_T.format(cls=type(self).__name__))
        F.check_tensor(x, "x", min_dim=1, finite=False)
        if pending is not None and pending.shape[1:] != x.shape:
            raise ValueError(
                f"x has shape {tuple(x.shape)} but this window started with shape "
                f"{tuple(pending.shape[1:])}; call functional.reset_net(net) between batches"
            )
        return self.T

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
    :param count: ``'bernoulli'`` (default) or ``'exact'``
    :param T: window length. Required in single-step mode; in multi-step mode the sequence length
        must be a multiple of it (default: the whole sequence is one window)
    :param step_mode: ``'s'`` (streaming, default like every SpikingJelly neuron) or ``'m'``
    :param seed: seed of this neuron's own random stream (reproducible spikes)
    :param generator: a ``torch.Generator`` to draw from instead (mutually exclusive with ``seed``)
    :param store_v_seq: in multi-step mode keep ``v_seq``, the potential after each firing step
    :param backend: ``'torch'`` (reference, any device) or ``'cupy'`` (one fused CUDA kernel
        launch for all windows, :mod:`tpp_plugin.kernels.cupy`; CUDA tensors, scalar threshold;
        its own Philox random stream, so its spikes differ from the torch backend's except for
        the counts with ``count='exact'``; inputs are not checked for NaN/inf)
    :param surrogate_function: ignored (TPP is an inference neuron; accepted for factory
        compatibility)
    :param detach_reset: ignored (as above)

    * **Multi-step** ``[T·k, N, *]`` → ``[T·k, N, *]``: each window of ``T`` steps is
      accumulated, then fired; output steps line up with input steps.
    * **Single-step** ``[N, *]`` → ``[N, *]``: streaming. Calls ``1..T`` accumulate and return
      zeros; calls ``T+1..2T`` return the first window's spikes while accumulating the next. A net
      with ``L`` TPP layers needs ``(L + 1)·T`` steps (:func:`steps_needed`). For the same seed
      the streamed spikes equal the multi-step spikes bit for bit.

    State (reset by ``functional.reset_net``): ``v`` — the potential of the window being
    integrated; ``t`` — steps integrated so far; ``spike_buffer`` — the fired window being emitted.

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
    ):
        if v_reset is not None:
            raise ValueError(
                f"TPPNode only has a soft reset (v ← v − θ); v_reset must be None, got {v_reset!r}"
            )
        super().__init__(T, seed, generator, step_mode, backend)
        self.v_threshold = F.check_threshold(v_threshold, "v_threshold")
        self.v_reset = None
        self.v_init = _check_v_init(v_init)
        self.count = F.check_count(count)
        self.store_v_seq = bool(store_v_seq)
        self.register_memory("v", self.v_init)
        self.register_memory("t", 0)
        self.register_memory("spike_buffer", None)
        if self.store_v_seq:
            self.register_memory("v_seq", None)

    def extra_repr(self) -> str:
        return (
            f"v_threshold={self.v_threshold}, v_init={self.v_init}, count={self.count!r}, "
            f"T={self.T}, step_mode={self.step_mode}, backend={self.backend}"
        )

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
        T = self._check_streaming(x, self.spike_buffer)
        F.check_tensor(x, "x")
        if isinstance(self.v, torch.Tensor) and self.v.shape != x.shape:
            raise ValueError(
                f"x has shape {tuple(x.shape)} but this window started with shape "
                f"{tuple(self.v.shape)}; call functional.reset_net(net) between batches"
            )
        out = self.spike_buffer[self.t] if self.spike_buffer is not None else torch.zeros_like(x)
        v = self.v + x
        if self.t + 1 == T:
            self.spike_buffer = self._fire(v, T)
            self.v, self.t = self.v_init, 0
        else:
            self.v, self.t = v, self.t + 1
        return out

    def multi_step_forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        T = self._window_length(x_seq)
        self._check_multi_step_allowed()
        if self.backend == "cupy":  # all windows in one fused launch
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
            F.tpp_accumulate(x_seq[s : s + T], self.v_init) for s in range(0, x_seq.shape[0], T)
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
    :param T: window length; required in single-step mode (the module then buffers one window and
        emits it permuted, one window of delay, like :class:`TPPNode`)
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
    ):
        super().__init__(T, seed, generator, step_mode, backend)
        self.scope = F.check_scope(scope)
        self.register_memory("t", 0)
        self.register_memory("window", None)
        self.register_memory("spike_buffer", None)

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
        T = self._check_streaming(x, self.window)
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


_SPIKING_TYPES = (sj_neuron.IFNode, TPPNode)


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
        node_kwargs = {"step_mode": old.step_mode, **kwargs}
        if seed is not None:
            node_kwargs["seed"] = seeds[i]
        set_submodule(net, name, make_neuron(neuron, _threshold_of(old), **node_kwargs))
    _invalidate_reset_cache(net)
    return net


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
    _invalidate_reset_cache(net)
    return net


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
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or node.target not in thresholds:
            continue
        theta = thresholds[node.target]
        parent = node.target.rpartition(".")[0]
        prefix = f"{parent}.tpp_spiking_{count}" if parent else f"tpp_spiking_{count}"
        count += 1
        last = node
        for leaf, module in (
            ("scaler0", VoltageScaler(1.0 / theta)),
            ("if_node", factory.create(theta)),
            ("scaler1", VoltageScaler(theta)),
        ):
            gm.add_submodule(f"{prefix}.{leaf}", module)
            with gm.graph.inserting_after(last):
                new = gm.graph.call_module(
                    f"{prefix}.{leaf}", args=node.args if leaf == "scaler0" else (last,)
                )
            last = new
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

        def __init__(self, neuron="tpp", neuron_kwargs: dict | None = None):
            self.factory = NeuronFactory(neuron, **_qcfs_default_kwargs(neuron, neuron_kwargs))
            self._thresholds: dict = {}

        def before_trace(self, converter, ann):
            ann, self._thresholds = _qcfs_thresholds_as_relu(ann)
            return ann.eval()

        def replace(self, converter, fx_model):
            fx_model = _replace_activation_nodes(fx_model, self._thresholds, self.factory)
            fx_model = adapt_step_mode_graph(
                fx_model,
                context="QCFSRecipe step-mode backend",
                wrap_module_types=_RATE_CODING_STATELESS_MODULE_TYPES,
                safe_module_types=_RATE_CODING_SAFE_MODULE_TYPES,
                safe_call_functions=(torch.nn.functional.dropout,),
            )
            return fx_model.to(converter.device)

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
    return make_step_mode_capable(gm).to(device)


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
    for name, module in list(gm.named_modules()):
        if type(module) in _STATELESS_TYPES and not isinstance(module, base.StepModule):
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
    def __init__(self, *args, neuron=None, neuron_kwargs=None, **kwargs):
        factory = _neuron_hook_kwargs(neuron, neuron_kwargs, kwargs.get("neuron_factory"))
        if factory is not None:
            kwargs["neuron_factory"] = factory
        original(self, *args, **kwargs)

    return __init__


def _wrap_legacy_converter_init(original):
    def __init__(self, *args, neuron=None, neuron_kwargs=None, **kwargs):
        original(self, *args, **kwargs)
        self.neuron_factory = _neuron_hook_kwargs(neuron, neuron_kwargs, None)

    return __init__


def _wrap_legacy_converter_forward(original):
    def forward(self, ann):
        snn = original(self, ann)
        factory = getattr(self, "neuron_factory", None)
        if factory is None:
            return snn
        for name, _ in list(named_modules_of_type(snn, sj_neuron.IFNode, exact=True)):
            set_submodule(snn, name, factory.create())
        return make_step_mode_capable(snn)

    return forward


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
        patcher.wrap(ann2snn.RateCodingRecipe, "__init__", _wrap_recipe_init)
        patcher.add(ann2snn, "QCFSRecipe", QCFSRecipe)
