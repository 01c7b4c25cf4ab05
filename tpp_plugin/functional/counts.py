"""Expected spike counts of the firing rules, and the bernoulli count in one draw (the tables of
count-domain evaluation)."""

from __future__ import annotations

import math

import torch

from .checks import (
    _check_fire_args,
    _check_generator,
    _check_not_meta,
    check_broadcast,
    check_count,
    check_threshold,
    check_window,
)
from .uniforms import _UNIFORM_SCALE, _fill_words, _words

__all__ = [
    "expected_count",
    "COUNT_TABLE_BINS",
    "expected_count_table",
    "tpp_count_two_point",
    "expected_count_fast",
]


def expected_count(v: torch.Tensor, T: int, threshold=1.0, count: str = "bernoulli"):
    """Exact expected number of spikes :func:`tpp_fire` produces from potential ``v``.

    ``count='exact'``: ``clamp(floor(v/θ + ½), 0, T)`` (deterministic, the QCFS rounding).
    ``count='bernoulli'``: computed exactly by dynamic programming over the spikes already fired.
    It equals ``clamp(v/θ, 0, T)`` when ``v/θ`` is a whole number or outside ``[0, T]``; for a
    fractional ``v/θ`` the sequential rule over-fires (e.g. ``v = 0.3θ``, ``T = 8`` gives 0.59
    spikes on average), because a spike that drives ``v`` below zero cannot be taken back.
    (With :data:`UNIFORM_BITS`-bit uniforms each step's probability is rounded up to a multiple
    of ``2**-16``; the difference is below ``T·2**-16`` spikes.)
    """
    check_count(count)
    T = check_window(T)
    threshold = check_threshold(threshold)
    if isinstance(v, torch.Tensor):
        _check_not_meta(v, "v")
    w = torch.as_tensor(v, dtype=torch.float64)
    if w.numel() and not bool(torch.isfinite(w).all()):
        raise ValueError("v contains NaN or infinite values: the expected count is undefined")
    if isinstance(threshold, torch.Tensor):
        check_broadcast(threshold, w.shape)
        threshold = threshold.to(torch.float64)
    w = w / threshold
    if count == "exact":
        return torch.floor(w + 0.5).clamp(0, T)
    if count == "unbiased":  # floor(w) + Bernoulli(frac w), up to the uniforms' 2**-16 grid
        return w.clamp(0, T)
    fired_so_far = torch.arange(T + 1, dtype=torch.float64).view(-1, *([1] * w.dim()))
    prob = torch.zeros((T + 1, *w.shape), dtype=torch.float64)
    prob[0] = 1.0
    for t in range(T):
        fire = prob * ((w - fired_so_far) / (T - t)).clamp(0, 1)
        prob = prob - fire
        prob[1:] += fire[:-1]
    return (prob * fired_so_far).sum(0)


# ----------------------------------------------------------------------------------------------
# the bernoulli count in one draw (count-domain evaluation)
# ----------------------------------------------------------------------------------------------
#: bins per threshold of :func:`expected_count_table` (a power of two: ``w·M`` is exact)
COUNT_TABLE_BINS = 1024


def _count_above_floor_exact(T: int, k: int, f: torch.Tensor) -> torch.Tensor:
    """``P(count = k + 1)`` for ``w = k + f`` (``0 ≤ f < 1``, ``0 ≤ k < T``), in closed form.

    Along a window with ``n`` spikes the rule's factors are ``(w − j)/R`` (spike ``j+1`` with
    ``R`` steps left) and ``(T − w − i)/R`` (the ``(i+1)``-th silent step). A count of ``k`` is
    reached by every pattern whose last silent step comes after ``s ≤ k`` spikes; from there on
    the remaining ``k − s`` spikes are certain (clamped). Summing over the
    ``C(s + T − k − 1, s)`` such patterns:
    ``P(count = k) = (T − w)^(T−k)/T! · Σ_{s=0..k} C(s+T−k−1, s)·w^(s)·(k − s)!`` (``x^(n)`` the
    falling factorial), evaluated with ``lgamma`` in float64.
    """
    w = k + f
    s = torch.arange(k + 1, dtype=torch.float64).view(-1, 1)
    lg = torch.lgamma
    terms = (lg(s + (T - k)) - lg(s + 1) - math.lgamma(T - k) + lg(w + 1) - lg(w - s + 1)
             + lg(k - s + 1))
    log_p_k = lg(T - w + 1) - lg(k - w + 1) - math.lgamma(T + 1) + torch.logsumexp(terms, 0)
    return (1.0 - log_p_k.exp()).clamp_(0.0, 1.0)


_COUNT_TABLES: dict = {}


def expected_count_table(T: int, bins: int = COUNT_TABLE_BINS) -> torch.Tensor:
    r""":func:`expected_count` (bernoulli) tabulated on ``w = v/θ ∈ {0, 1/M, …, T}``, ``M = bins``.

    Returned as interval pairs: row ``i`` holds ``(E(i/M) − k, E((i+1)/M) − k)`` with
    ``k = ⌊i/M⌋``, i.e. the probability of the ``(k+1)``-th spike at both ends of the interval
    ``[i/M, (i+1)/M]``; ``E(w)`` is continuous and rises from ``k`` to ``k + 1`` on ``[k, k+1]``.
    Exact values (a closed form of the sequential rule, see :func:`_count_above_floor_exact`),
    float64, ``T·M × 2``; cached per ``(T, bins)``.

    Accuracy of linear interpolation in this table with the default ``M = 1024``: below
    ``3e-6`` spikes for every ``T ≤ 64`` (``tests/test_functional.py`` checks it against
    the dynamic programme of :func:`expected_count` on random potentials); the 16-bit uniforms
    of :func:`tpp_count_two_point` resolve probabilities to ``2**-16 ≈ 1.5e-5``.

    :param T: window length
    :param bins: ``M``, a power of two
    :return: ``[T·M, 2]`` float64 tensor
    """
    T = check_window(T)
    if bins < 1 or bins & (bins - 1):
        raise ValueError(f"bins must be a power of two, got {bins}")
    key = (T, bins)
    if key not in _COUNT_TABLES:
        f = torch.arange(bins + 1, dtype=torch.float64) / bins
        rows = []
        for k in range(T):
            p = torch.empty(bins + 1, dtype=torch.float64)
            p[:-1] = _count_above_floor_exact(T, k, f[:-1])
            p[-1] = 1.0  # w = k + 1: the (k+1)-th spike is certain
            rows.append(torch.stack([p[:-1], p[1:]], 1))
        _COUNT_TABLES[key] = torch.cat(rows)
    return _COUNT_TABLES[key]


_DEVICE_TABLES: dict = {}


def _table_on(T: int, dtype: torch.dtype, device) -> tuple:
    """The tables of :func:`tpp_count_two_point` on ``device``, both ``[T·M + 1]``: ``E(i/M)``
    and the slope ``E((i+1)/M) − E(i/M)`` of bin ``i``; the last row is ``w = T`` (``T``, slope
    0)."""
    key = (T, dtype, str(device))
    tables = _DEVICE_TABLES.get(key)
    if tables is None:
        bins = COUNT_TABLE_BINS
        pairs = expected_count_table(T, bins)
        k = torch.div(torch.arange(T * bins), bins, rounding_mode="floor").to(torch.float64)
        start = torch.cat([pairs[:, 0] + k, torch.tensor([float(T)], dtype=torch.float64)])
        slope = torch.cat([pairs[:, 1] - pairs[:, 0], torch.zeros(1, dtype=torch.float64)])
        tables = tuple(t.to(device=device, dtype=dtype) for t in (start, slope))
        _DEVICE_TABLES[key] = tables
    return tables


def expected_count_fast(w: torch.Tensor, T: int, dtype: torch.dtype = torch.float64
                        ) -> torch.Tensor:
    """:func:`expected_count` (bernoulli) of potentials ``w = v/θ`` by linear interpolation in
    :func:`expected_count_table` (error below ``3e-6`` spikes for ``T ≤ 64``): the cheap form
    for many neurons at once. Shaped and typed like ``w``.

    :param dtype: the precision of the interpolation (``torch.float32`` halves the memory
        traffic, adding a relative error of about ``1e-7``)

    Example::

        >>> w = torch.tensor([0.3, 2.3], dtype=torch.float64)
        >>> torch.allclose(expected_count_fast(w, 8), expected_count(w, 8), atol=1e-5)
        True
    """
    T = check_window(T)
    start, slope = _table_on(T, dtype, w.device)
    pos = w.to(dtype).clamp(0, T).mul_(COUNT_TABLE_BINS).reshape(-1)
    i = pos.floor()  # at most T·bins: the last row is w = T
    frac, i = pos.sub_(i), i.int()  # index_select: several times faster than start[i]
    count = start.index_select(0, i).add_(slope.index_select(0, i).mul_(frac))
    return count.view(w.shape).to(w.dtype)


def tpp_count_two_point(
    v: torch.Tensor,
    T: int,
    threshold=1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""A bernoulli TPP neuron's spike count from **one** random number per neuron.

    Under the sequential rule a neuron with ``w = v/θ`` fires ``⌊w⌋`` or ``⌈w⌉`` times (clamped to
    ``[0, T]``): a two-point count with mean :func:`expected_count` ``(v, T)``. This samples it
    as ``k + [u < E(w) − k]``, ``k = ⌊w⌋``, with one 16-bit uniform ``u`` per neuron and ``E``
    interpolated linearly in :func:`expected_count_table` (error below ``1e-6`` spikes for
    ``T ≤ 64``; each probability is resolved to ``2**-16``).

    The counts have the distribution of :func:`tpp_count` / ``tpp_fire(...).sum(0)`` (the full
    simulation) — **in distribution, not draw for draw**: the random numbers differ, so for the
    same generator state the counts of individual neurons differ. For draw-equal counts use
    :func:`tpp_count`, which costs ``T`` draws per neuron.

    :param v: membrane potential after the accumulation phase, any shape
    :param T: window length
    :param threshold: firing threshold θ (number or tensor broadcastable to ``v``)
    :param generator: optional ``torch.Generator`` on ``v``'s device (``⌈numel/4⌉`` words
        drawn, in order)
    :return: spike counts in ``v``'s dtype, shape of ``v``

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> c = tpp_count_two_point(torch.full((100_000,), 2.3), 8, generator=g)
        >>> sorted(c.unique().tolist()), round(c.mean().item(), 2)   # E = 2.38 at T = 8
        ([2.0, 3.0], 2.38)
    """
    T, threshold, _ = _check_fire_args(v, T, threshold, "bernoulli")
    _check_generator(generator, v.device)
    return _two_point_count(v, T, threshold, generator)


#: neurons per pass of :func:`_two_point_count` on the CPU (a multiple of 4: whole generator
#: words). Its four temporaries (3.5 MiB in float32) are reused from pass to pass and stay in
#: the cache; full-size ones were fresh memory at every call, a page fault per 4 KiB, which
#: cost more than the arithmetic (2¹⁶ to 2¹⁸ timed best on the demo CNN's layers, 1–2 threads).
_CPU_CHUNK = 1 << 18


def _two_point_count(x: torch.Tensor, T: int, threshold, generator, gain=1.0, offset=0.0):
    """:func:`tpp_count_two_point` of ``v = gain·x + offset``, unchecked (count mode passes the
    mean current ``x``, ``gain = T`` and ``offset = v_init``: no ``v`` buffer).

    Per neuron: ``w·M`` (``M`` = :data:`COUNT_TABLE_BINS`), its bin ``i`` and the position ``f``
    inside it, ``E = start[i] + slope[i]·f`` (:func:`_table_on`), then ``⌊E + r·2⁻¹⁶⌋ =
    k + [r ≥ 2¹⁶·(1 − p)]`` with a random 16-bit ``r``. On the CPU the neurons are taken
    :data:`_CPU_CHUNK` at a time; the generator hands out its words one after another, so the
    draws, and the counts, are those of one pass over all neurons.
    """
    # E + r·2⁻¹⁶ (r < 2¹⁶) must stay exact: float64 for float64 potentials and long windows
    rdtype = torch.float64 if x.dtype == torch.float64 or T >= 128 else torch.float32
    bins = COUNT_TABLE_BINS
    start, slope = _table_on(T, rdtype, x.device)
    n = x.numel()
    shift = bool(offset.any()) if isinstance(offset, torch.Tensor) else offset != 0
    flat = x.reshape(n)
    step = _CPU_CHUNK if x.device.type == "cpu" else max(n, 1)
    m = min(step, n)
    pos = None  # w·M of all neurons, formed at once for per-neuron θ or v_init and for a cast
    if x.dtype != rdtype or any(isinstance(a, torch.Tensor) and a.dim() > 0
                                for a in (threshold, offset)):
        pos = _scaled_potential(x, T, threshold, gain, offset, shift, rdtype)
    buffer = torch.empty(0 if pos is not None else m, dtype=rdtype, device=x.device)
    out = torch.empty(n, dtype=rdtype, device=x.device)
    index = torch.empty(m, dtype=torch.int32, device=x.device)
    other = torch.empty(m, dtype=rdtype, device=x.device)  # slope[i], then r
    words = torch.empty(_words(m), dtype=torch.int64, device=x.device)
    for lo in range(0, n, step):
        hi = min(lo + step, n)
        i, s, count = index[:hi - lo], other[:hi - lo], out[lo:hi]
        if pos is not None:
            p = pos[lo:hi]
        elif shift or isinstance(threshold, torch.Tensor):  # as _scaled_potential
            p = torch.mul(flat[lo:hi], gain, out=buffer[:hi - lo])
            if shift:
                p.add_(offset)
            if isinstance(threshold, torch.Tensor):
                p.div_(threshold).mul_(bins)
            else:
                p.mul_(bins / threshold)
        else:
            p = torch.mul(flat[lo:hi], gain * bins / threshold, out=buffer[:hi - lo])
        p.clamp_(0, T * bins)
        i.copy_(p)  # truncation == floor for p >= 0
        p.frac_()  # the position inside the bin, in [0, 1]
        torch.index_select(start, 0, i, out=count)
        count.addcmul_(torch.index_select(slope, 0, i, out=s), p)  # E, interpolated
        bits = _fill_words(words[:_words(hi - lo)], generator).view(torch.uint16)[:hi - lo]
        count.add_(s.copy_(bits), alpha=_UNIFORM_SCALE).floor_()
    return out.view(x.shape).to(x.dtype)


def _scaled_potential(x, T, threshold, gain, offset, shift, rdtype) -> torch.Tensor:
    """``w·M = (gain·x + offset)/θ·M`` of all neurons, flat, in ``rdtype`` (a new tensor)."""
    bins = COUNT_TABLE_BINS
    if not (isinstance(threshold, torch.Tensor) or shift):
        return torch.mul(x.reshape(-1), gain * bins / threshold).to(rdtype)  # one op
    pos = torch.mul(x, gain)
    if shift:
        pos.add_(offset)
    pos = torch.div(pos, threshold) if isinstance(threshold, torch.Tensor) else pos
    if pos.shape != x.shape:
        raise ValueError(
            f"threshold of shape {tuple(threshold.shape)} must broadcast to v's shape "
            f"{tuple(x.shape)} without enlarging it"
        )
    scale = bins if isinstance(threshold, torch.Tensor) else bins / threshold
    return pos.to(rdtype).reshape(-1).mul_(scale)
