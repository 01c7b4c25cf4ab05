"""The TPP neuron: accumulate (phase 1), fire (phase 2), the spike count alone, and the plain
reference loop the fast firing path equals bit for bit."""

from __future__ import annotations

import torch

from .checks import (
    _check_fire_args,
    _check_generator,
    check_sequence,
    check_window_sum,
)
from .uniforms import (
    _UNIFORM_SCALE,
    _draw_bits,
    _fill_words,
    _random_dtype,
    _rounding_uniforms,
    _step_draws,
)

__all__ = [
    "tpp_accumulate",
    "tpp_fire",
    "tpp_fire_reference",
    "tpp_count",
    "tpp_forward",
]


def tpp_accumulate(x_seq: torch.Tensor, v_init=0.0) -> torch.Tensor:
    r"""Phase 1: ``v = v_init + Σ_t x_t`` over the leading (time) dimension.

    The sum is taken step by step in time order, so a caller that adds ``x_t`` to its state one
    step at a time gets the same floating-point result bit for bit.

    :param x_seq: input currents, shape ``[T, *shape]``
    :param v_init: initial potential, a number or a tensor broadcastable to ``shape``
    :return: membrane potential, shape ``[*shape]``
    """
    check_sequence(x_seq, "x_seq", min_dim=1)
    v = x_seq[0] + v_init
    for t in range(1, x_seq.shape[0]):
        v.add_(x_seq[t])
    check_window_sum(v, x_seq.dtype)
    return v


def _potential_in_thresholds(v, T, threshold, count, rdtype, rounding=None) -> torch.Tensor:
    """``w = v/θ`` in the uniforms' dtype, rounded to a whole count for ``'exact'`` (to nearest)
    and ``'unbiased'`` (``floor(w + u)`` with the uniforms ``rounding``, mean ``w``).

    The division itself runs in ``rdtype`` (``float32`` at least): a 16-bit ``v/θ`` would round
    to 11 (float16) or 8 (bfloat16) bits, moving counts near a rounding boundary.
    """
    w = (v.to(rdtype) / threshold).to(rdtype)
    if count == "exact":
        w = torch.floor(w + 0.5).clamp_(0, T)
    elif count == "unbiased":
        w = torch.floor(w.clamp(-1, T) + rounding.reshape(w.shape).to(rdtype)).clamp_(0, T)
    return w


def tpp_fire_reference(
    v: torch.Tensor, T: int, threshold, count: str, uniforms: torch.Tensor, rounding=None
) -> torch.Tensor:
    r"""The firing rule written out plainly: the reference :func:`tpp_fire` must equal bit for bit.

    ``w = v/θ`` (``clamp(floor(w + ½), 0, T)`` for ``'exact'``); for ``t = 0..T−1``:
    ``s_t = [uniforms[t]·(T − t) < w]``, ``w ← w − s_t``.

    :param v: potential ``[*shape]``
    :param uniforms: ``[T, *shape]``, e.g. from :func:`window_uniforms`
    :param rounding: ``[*shape]`` uniforms of ``count='unbiased'``: ``w ← clamp(floor(w + u),
        0, T)``
    :return: spikes ``[T, *shape]`` in ``v``'s dtype
    """
    T, threshold, count = _check_fire_args(v, T, threshold, count)
    w = (v.to(uniforms.dtype) / threshold).to(uniforms.dtype)
    if count == "exact":
        w = torch.floor(w + 0.5).clamp(0, T)
    elif count == "unbiased":
        w = torch.floor(w.clamp(-1, T) + rounding).clamp(0, T)
    spikes = []
    for t in range(T):
        fired = uniforms[t] * (T - t) < w
        spikes.append(fired.to(v.dtype))
        w = w - fired.to(w.dtype)
    return torch.stack(spikes)


def _bits_inside(spikes: torch.Tensor, numel: int):
    """A uint16 view of the *tail* of ``spikes``' memory that can hold ``numel`` draws, or None.

    Row ``t`` of the output is written only after the draws of step ``t`` were read and never
    reaches the draws of a later step (they sit ``(E−2)·T·n`` bytes further on, ``E`` the element
    size), so the window's random numbers need no buffer of their own.
    """
    if numel % 4 or spikes.element_size() < 2 or not spikes.is_contiguous():
        return None
    raw = spikes.view(-1).view(torch.uint8)
    offset = raw.numel() - 2 * numel
    if raw.data_ptr() % 8:
        return None
    return raw[offset:].view(torch.int64)


def tpp_fire(
    v: torch.Tensor,
    T: int,
    threshold=1.0,
    count: str = "bernoulli",
    generator: torch.Generator | None = None,
    *,
    uniforms: torch.Tensor | None = None,
    rounding: torch.Tensor | None = None,
    return_v_seq: bool = False,
):
    r"""Phase 2: fire ``T`` steps from membrane potential ``v``.

    At step ``t`` (1-based) each neuron fires with probability
    ``p_t = clamp(v / (θ·(T − t + 1)), 0, 1)`` and then ``v ← v − θ·s_t``. With
    ``count='exact'`` the potential is first rounded to ``θ·clamp(floor(v/θ + ½), 0, T)``: the
    count is then deterministic and only the spike positions are random.

    The window's random numbers are drawn once, at the start, exactly as
    :func:`window_uniforms` draws them (16-bit uniforms, stored in the output's own memory until
    used), and one small loop over ``T`` does the rest: the result equals
    :func:`tpp_fire_reference` on those uniforms bit for bit.

    :param v: membrane potential after the accumulation phase, any shape ``[*shape]``
    :param T: number of firing steps (the window length), ``>= 1``
    :param threshold: firing threshold θ, a positive number or a tensor broadcastable to ``v``
    :param count: ``'bernoulli'`` (the paper's rule, default), ``'exact'`` or ``'unbiased'``
        (``floor(w)`` spikes plus one with probability ``frac(w)``: mean exactly ``clamp(w, 0,
        T)``; one extra uniform per neuron, drawn before the step uniforms)
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
    T, threshold, count = _check_fire_args(v, T, threshold, count)
    n = v.numel()
    if uniforms is None:
        _check_generator(generator, v.device)
        rdtype = _random_dtype(v.dtype)
    else:
        if tuple(uniforms.shape) != (T, *v.shape):
            raise ValueError(
                f"uniforms must have shape {(T, *v.shape)}, got {tuple(uniforms.shape)}"
            )
        rdtype = uniforms.dtype
    if count == "unbiased" and rounding is None:
        if uniforms is not None:
            raise ValueError("count='unbiased' with uniforms= needs rounding= ([*shape] uniforms)")
        rounding = _rounding_uniforms(n, v.device, generator, rdtype)  # drawn first
    # everything is checked and w computed before the window's step uniforms are drawn
    w = _potential_in_thresholds(v, T, threshold, count, rdtype, rounding).view(n)
    spikes = torch.empty((T, *v.shape), dtype=v.dtype, device=v.device)
    if uniforms is None:
        words = _bits_inside(spikes, T * n)
        if words is None:
            bits = _draw_bits(T * n, v.device, generator).view(T, n)
        else:
            bits = _fill_words(words, generator).view(torch.uint16).view(T, n)
        # r·((T−t)·2⁻¹⁶) rounds once, like the reference's (r·2⁻¹⁶)·(T−t): r·2⁻¹⁶ is exact
        scales = [torch.tensor((T - t) * _UNIFORM_SCALE, dtype=rdtype) for t in range(T)]
    else:
        bits = uniforms.reshape(T, n)
        scales = list(range(T, 0, -1))
    out = spikes.view(T, n)
    v_seq = torch.empty_like(spikes) if return_v_seq else None
    scaled = torch.empty(n, dtype=rdtype, device=v.device)
    for t in range(T):
        torch.mul(bits[t], scales[t], out=scaled)
        torch.lt(scaled, w, out=out[t])
        w.sub_(out[t])
        if return_v_seq:
            v_seq[t] = w.view(v.shape) * threshold
    return (spikes, v_seq) if return_v_seq else spikes


def tpp_count(
    v: torch.Tensor,
    T: int,
    threshold=1.0,
    count: str = "bernoulli",
    generator: torch.Generator | None = None,
    *,
    draw_steps: bool = True,
) -> torch.Tensor:
    r"""The number of spikes :func:`tpp_fire` would fire from ``v``, without the spike train.

    ``count='bernoulli'`` draws the same random numbers as :func:`tpp_fire` (so for the same
    generator state the count equals ``tpp_fire(...).sum(0)`` bit for bit) but keeps only a running
    count. ``count='exact'`` returns ``clamp(floor(v/θ + ½), 0, T)`` and draws nothing: its
    count is not random. ``count='unbiased'`` returns ``clamp(floor(v/θ + u), 0, T)`` from one
    uniform ``u`` per neuron (the same as :func:`tpp_fire`'s), and with ``draw_steps`` (default)
    also draws the window's step uniforms, so the generator stays in step with the full
    simulation. This is the neuron of count-domain evaluation
    (:func:`tpp_plugin.count_mode`).

    :param v: membrane potential, any shape ``[*shape]``
    :param T: window length
    :param threshold: firing threshold θ (number or tensor broadcastable to ``v``)
    :param count: ``'bernoulli'``, ``'exact'`` or ``'unbiased'``
    :param generator: optional ``torch.Generator`` on ``v``'s device
    :return: spike counts in ``v``'s dtype, shape ``[*shape]``

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> tpp_count(torch.tensor([0.0, 2.0, 9.0]), 4, generator=g)
        tensor([0., 2., 4.])
    """
    T, threshold, count = _check_fire_args(v, T, threshold, count)
    rdtype = _random_dtype(v.dtype)
    n = v.numel()
    rounding = None
    if count == "unbiased":
        _check_generator(generator, v.device)
        rounding = _rounding_uniforms(n, v.device, generator, rdtype)
    w = _potential_in_thresholds(v, T, threshold, count, rdtype, rounding)
    if count == "unbiased" and draw_steps:  # the positions' draws: keep the stream in step
        for _ in _step_draws(T, n, v.device, generator):
            pass
    if count != "bernoulli":
        return w.to(v.dtype)
    _check_generator(generator, v.device)
    steps = _step_draws(T, n, v.device, generator)
    # w >= T fires at every step (u·(T−t) < T−t <= w − t): clamping changes no spike but keeps
    # w0 − w_T exact (w − 1 == w once |w| >= 2**24 in float32, 2**53 in float64)
    w = w.view(n).clamp_(max=T)
    w0 = w.clone()
    scaled = torch.empty(n, dtype=rdtype, device=v.device)
    for t in range(T):
        torch.mul(next(steps), torch.tensor((T - t) * _UNIFORM_SCALE, dtype=rdtype), out=scaled)
        w.sub_(torch.lt(scaled, w, out=scaled))
    # every step subtracted exactly 0 or 1 up to a rounding far below ½: the count is w0 − w_T
    return w0.sub_(w).round_().view(v.shape).to(v.dtype)


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
    :param count: ``'bernoulli'``, ``'exact'`` or ``'unbiased'``
    :param generator: optional ``torch.Generator``
    :return: spikes (0/1), shape ``[T, *shape]``

    Example::

        >>> x = torch.full((4, 3), 0.5)          # 4 steps, 3 neurons, Σx = 2θ each
        >>> tpp_forward(x, count='exact').sum(0)
        tensor([2., 2., 2.])
    """
    v = tpp_accumulate(x_seq, v_init)
    return tpp_fire(v, x_seq.shape[0], threshold, count, generator)
