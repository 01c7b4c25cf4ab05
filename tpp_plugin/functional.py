r"""The math of the two-phase probabilistic (TPP) neuron, in pure torch.

Everything a framework adapter needs lives here, free of any SNN framework:

* :func:`tpp_accumulate` — phase 1, sum one window of input into a membrane potential;
* :func:`tpp_fire` — phase 2, turn a potential into ``T`` stochastically placed spikes;
* :func:`tpp_forward` — both phases for a window ``[T, ...]``;
* :func:`permute_time` — the temporal permutation ("misalignment") of spike trains;
* :func:`qcfs` — the quantization-clip-floor-shift activation the TPP neuron converts exactly.

The firing rule works in units of the threshold, ``w = v / θ``. At step ``t = 1..T`` a neuron
fires when ``u_t · (T − t + 1) < w`` with ``u_t ~ U[0, 1)``, i.e. with probability
``clamp(w / (T − t + 1), 0, 1) = clamp(v / (θ·(T − t + 1)), 0, 1)``, and then ``w ← w − 1``
(``v ← v − θ``). With ``count='exact'`` the potential is first rounded to a whole number of
thresholds, ``w ← clamp(floor(w + ½), 0, T)``, so exactly ``w`` spikes land on a uniformly random
``w``-subset of the ``T`` slots. All ``T`` uniforms of a window are drawn at once, at the window
boundary, so any caller that draws windows in the same order gets bit-identical spikes.
"""

from __future__ import annotations

import math
from numbers import Integral, Real

import torch

__all__ = [
    "COUNT_MODES",
    "PERMUTATION_SCOPES",
    "check_count",
    "check_scope",
    "check_window",
    "check_threshold",
    "check_tensor",
    "check_seed",
    "window_uniforms",
    "tpp_accumulate",
    "tpp_fire",
    "tpp_forward",
    "expected_count",
    "permute_time",
    "qcfs",
]

COUNT_MODES = ("bernoulli", "exact")
PERMUTATION_SCOPES = ("neuron", "sample", "layer")


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------
def check_count(count: str) -> str:
    """Return ``count`` if it is one of :data:`COUNT_MODES`, else raise ``ValueError``."""
    if count not in COUNT_MODES:
        raise ValueError(f"count must be one of {COUNT_MODES}, got {count!r}")
    return count


def check_scope(scope: str) -> str:
    """Return ``scope`` if it is one of :data:`PERMUTATION_SCOPES`, else raise ``ValueError``."""
    if scope not in PERMUTATION_SCOPES:
        raise ValueError(f"scope must be one of {PERMUTATION_SCOPES}, got {scope!r}")
    return scope


def check_window(T, name: str = "T") -> int:
    """Return the window length ``T`` as an ``int`` ≥ 1, else raise ``TypeError``/``ValueError``."""
    if isinstance(T, bool) or not isinstance(T, Integral):
        raise TypeError(f"{name} must be an integer number of time steps, got {T!r}")
    if T < 1:
        raise ValueError(f"{name} must be >= 1, got {T}")
    return int(T)


def check_threshold(threshold, name: str = "threshold"):
    """Return a valid threshold: a finite positive number, or a tensor of them.

    :raises TypeError: if ``threshold`` is neither a real number nor a floating tensor
    :raises ValueError: if any threshold is not finite or not positive
    """
    if isinstance(threshold, torch.Tensor):
        if not threshold.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got dtype {threshold.dtype}")
        if not bool(torch.isfinite(threshold).all()) or bool((threshold <= 0).any()):
            raise ValueError(f"{name} must be finite and > 0 everywhere")
        return threshold
    if isinstance(threshold, bool) or not isinstance(threshold, Real):
        raise TypeError(f"{name} must be a positive number, got {type(threshold).__name__}")
    threshold = float(threshold)
    if not math.isfinite(threshold) or threshold <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {threshold}")
    return threshold


def check_tensor(x, name: str, min_dim: int = 0, finite: bool = True) -> torch.Tensor:
    """Check that ``x`` is a floating tensor with at least ``min_dim`` dimensions (and finite).

    :raises TypeError: if ``x`` is not a floating-point tensor
    :raises ValueError: if ``x`` has too few dimensions or non-finite entries
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < min_dim:
        raise ValueError(
            f"{name} must have at least {min_dim} dimension(s), got shape {tuple(x.shape)}"
        )
    if finite and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def check_seed(seed, generator) -> None:
    """Check a module's randomness arguments: an ``int`` seed or a ``torch.Generator``, not both.

    :raises ValueError: if both are given
    :raises TypeError: if ``seed`` is not an int or ``generator`` not a ``torch.Generator``
    """
    if seed is not None and generator is not None:
        raise ValueError("pass either seed or generator, not both")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, Integral)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")


def _check_generator(generator, device: torch.device, name: str = "generator"):
    if generator is None:
        return None
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"{name} must be a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != device.type:
        raise ValueError(
            f"{name} lives on {generator.device.type!r} but the tensor is on {device.type!r}; "
            f"create the generator with torch.Generator(device={device.type!r})"
        )
    return generator


def _random_dtype(dtype: torch.dtype) -> torch.dtype:
    # half-precision uniforms have only 11 bits: draw in float32 to keep probabilities honest
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------
# the TPP neuron
# ----------------------------------------------------------------------------------------------
def window_uniforms(shape, T: int, device, dtype=torch.float32, generator=None) -> torch.Tensor:
    """Draw the uniforms of one firing window, ``[T, *shape]`` in ``[0, 1)``.

    This is the single place randomness is drawn for :func:`tpp_fire`; modules that stream a
    window step by step call it once at the window boundary so that they reproduce
    :func:`tpp_fire` bit for bit.
    """
    return torch.rand(
        (T, *shape), device=device, dtype=_random_dtype(dtype), generator=generator
    )


def tpp_accumulate(x_seq: torch.Tensor, v_init=0.0) -> torch.Tensor:
    r"""Phase 1: ``v = v_init + Σ_t x_t`` over the leading (time) dimension.

    The sum is taken step by step in time order, so a caller that adds ``x_t`` to its state one
    step at a time gets the same floating-point result bit for bit.

    :param x_seq: input currents, shape ``[T, *shape]``
    :param v_init: initial potential, a number or a tensor broadcastable to ``shape``
    :return: membrane potential, shape ``[*shape]``
    """
    check_tensor(x_seq, "x_seq", min_dim=1)
    v = x_seq[0] + v_init
    for t in range(1, x_seq.shape[0]):
        v.add_(x_seq[t])
    return v


def expected_count(v: torch.Tensor, T: int, threshold=1.0, count: str = "bernoulli"):
    """Exact expected number of spikes :func:`tpp_fire` produces from potential ``v``.

    ``count='exact'``: ``clamp(floor(v/θ + ½), 0, T)`` (deterministic, the QCFS rounding).
    ``count='bernoulli'``: computed exactly by dynamic programming over the spikes already fired.
    It equals ``clamp(v/θ, 0, T)`` when ``v/θ`` is a whole number or outside ``[0, T]``; for a
    fractional ``v/θ`` the sequential rule over-fires (e.g. ``v = 0.3θ``, ``T = 8`` gives 0.59
    spikes on average), because a spike that drives ``v`` below zero cannot be taken back.
    """
    check_count(count)
    T = check_window(T)
    w = torch.as_tensor(v, dtype=torch.float64) / threshold
    if count == "exact":
        return torch.floor(w + 0.5).clamp(0, T)
    fired_so_far = torch.arange(T + 1, dtype=torch.float64).view(-1, *([1] * w.dim()))
    prob = torch.zeros((T + 1, *w.shape), dtype=torch.float64)
    prob[0] = 1.0
    for t in range(T):
        fire = prob * ((w - fired_so_far) / (T - t)).clamp(0, 1)
        prob = prob - fire
        prob[1:] += fire[:-1]
    return (prob * fired_so_far).sum(0)


def tpp_fire(
    v: torch.Tensor,
    T: int,
    threshold=1.0,
    count: str = "bernoulli",
    generator: torch.Generator | None = None,
    *,
    uniforms: torch.Tensor | None = None,
    return_v_seq: bool = False,
):
    r"""Phase 2: fire ``T`` steps from membrane potential ``v``.

    At step ``t`` (1-based) each neuron fires with probability
    ``p_t = clamp(v / (θ·(T − t + 1)), 0, 1)`` and then ``v ← v − θ·s_t``. With
    ``count='exact'`` the potential is first rounded to ``θ·clamp(floor(v/θ + ½), 0, T)``: the
    count is then deterministic and only the spike positions are random.

    :param v: membrane potential after the accumulation phase, any shape ``[*shape]``
    :param T: number of firing steps (the window length), ``>= 1``
    :param threshold: firing threshold θ, a positive number or a tensor broadcastable to ``v``
    :param count: ``'bernoulli'`` (the paper's rule, default) or ``'exact'``
    :param generator: optional ``torch.Generator`` on ``v``'s device
    :param uniforms: pre-drawn uniforms ``[T, *shape]`` from :func:`window_uniforms` (instead of
        drawing them here)
    :param return_v_seq: also return the potential after each step's reset
    :return: spikes (0/1, dtype of ``v``), shape ``[T, *shape]``; with ``return_v_seq`` a tuple
        ``(spikes, v_seq)``

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> s = tpp_fire(torch.tensor([0.0, 2.0, 4.0]), T=4, count='exact', generator=g)
        >>> s.sum(0)
        tensor([0., 2., 4.])
    """
    check_tensor(v, "v")
    T = check_window(T)
    threshold = check_threshold(threshold)
    check_count(count)
    if uniforms is None:
        _check_generator(generator, v.device)
        uniforms = window_uniforms(v.shape, T, v.device, v.dtype, generator)
    elif tuple(uniforms.shape) != (T, *v.shape):
        raise ValueError(
            f"uniforms must have shape {(T, *v.shape)}, got {tuple(uniforms.shape)}"
        )

    w = (v / threshold).to(uniforms.dtype)
    if w.shape != v.shape:
        raise ValueError(
            f"threshold of shape {tuple(threshold.shape)} must broadcast to v's shape "
            f"{tuple(v.shape)} without enlarging it"
        )
    if count == "exact":
        w = torch.floor(w + 0.5).clamp_(0, T)
    spikes = torch.empty((T, *w.shape), dtype=v.dtype, device=v.device)
    v_seq = torch.empty_like(spikes) if return_v_seq else None
    for t in range(T):
        fired = uniforms[t] * (T - t) < w
        spikes[t] = fired
        w = w - fired.to(w.dtype)
        if return_v_seq:
            v_seq[t] = w * threshold
    return (spikes, v_seq) if return_v_seq else spikes


def tpp_forward(
    x_seq: torch.Tensor,
    threshold=1.0,
    v_init=0.0,
    count: str = "bernoulli",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""Run one TPP window: accumulate ``x_seq`` (phase 1), then fire ``T`` steps (phase 2).

    :param x_seq: input currents, shape ``[T, *shape]``; the whole sequence is one window
    :param threshold: firing threshold θ (positive number or broadcastable tensor)
    :param v_init: initial potential (``0`` is the paper's rule; ``θ/2`` over-fires)
    :param count: ``'bernoulli'`` or ``'exact'``
    :param generator: optional ``torch.Generator``
    :return: spikes (0/1), shape ``[T, *shape]``

    Example::

        >>> x = torch.full((4, 3), 0.5)          # 4 steps, 3 neurons, Σx = 2θ each
        >>> tpp_forward(x, count='exact').sum(0)
        tensor([2., 2., 2.])
    """
    v = tpp_accumulate(x_seq, v_init)
    return tpp_fire(v, x_seq.shape[0], threshold, count, generator)


# ----------------------------------------------------------------------------------------------
# temporal permutation
# ----------------------------------------------------------------------------------------------
def permute_time(
    x_seq: torch.Tensor, scope: str = "neuron", generator: torch.Generator | None = None
) -> torch.Tensor:
    r"""Randomly rearrange spike trains along time (dim 0); every neuron keeps its count.

    :param x_seq: spike trains (or any values), shape ``[T, N, ...]`` (``[T, ...]`` for
        ``scope='neuron'``/``'layer'``)
    :param scope: ``'neuron'`` — an independent permutation for every neuron (default);
        ``'sample'`` — one permutation per sample (dim 1); ``'layer'`` — one permutation for the
        whole tensor
    :param generator: optional ``torch.Generator``
    :return: permuted tensor, same shape and dtype as ``x_seq``

    Example::

        >>> s = torch.tensor([[1.], [1.], [0.], [0.]])
        >>> permute_time(s).sum(0)
        tensor([2.])
    """
    check_scope(scope)
    if not isinstance(x_seq, torch.Tensor):
        raise TypeError(f"x_seq must be a torch.Tensor, got {type(x_seq).__name__}")
    min_dim = 2 if scope == "sample" else 1
    if x_seq.dim() < min_dim:
        raise ValueError(
            f"x_seq must have at least {min_dim} dimension(s) ([T, N, ...]) for scope={scope!r}, "
            f"got shape {tuple(x_seq.shape)}"
        )
    _check_generator(generator, x_seq.device)
    T = x_seq.shape[0]
    if scope == "layer":
        perm = torch.randperm(T, generator=generator, device=x_seq.device)
        return x_seq[perm]
    key_shape = x_seq.shape if scope == "neuron" else x_seq.shape[:2]
    keys = torch.rand(key_shape, generator=generator, device=x_seq.device)
    order = keys.argsort(dim=0)
    if scope == "sample":
        order = order.view(*key_shape, *([1] * (x_seq.dim() - 2))).expand_as(x_seq)
    return x_seq.gather(0, order)


# ----------------------------------------------------------------------------------------------
# QCFS
# ----------------------------------------------------------------------------------------------
def qcfs(x: torch.Tensor, lam, L: int, shift: float = 0.5) -> torch.Tensor:
    r"""Quantization-clip-floor-shift activation (Bu et al., ICLR 2022).

    ``qcfs(x) = λ/L · floor(clamp(x/λ, 0, 1)·L + shift)`` (``= λ/L · clamp(floor(x·L/λ + ½), 0, L)``
    for ``shift = ½``), with a straight-through gradient for
    the floor (so ``λ`` and the input are trainable). With ``L = T`` and ``shift = ½`` it is
    exactly what an exact-count TPP neuron with threshold ``λ`` computes over ``T`` steps.

    :param x: pre-activation, any shape
    :param lam: clipping level λ (> 0), a number or a tensor (e.g. a trainable parameter)
    :param L: number of quantization levels, ``>= 1``
    :param shift: the shift φ (``0.5`` is the QCFS paper's choice)
    :return: quantized activation, same shape as ``x``
    """
    check_tensor(x, "x", finite=False)
    L = check_window(L, "L")
    # clip before the floor (as QCFS does) so the straight-through gradient reaches all of (0, λ)
    z = (x / lam).clamp(0, 1) * L + shift
    z = z + (torch.floor(z) - z).detach()
    return z * lam / L
