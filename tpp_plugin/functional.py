r"""The math of the two-phase probabilistic (TPP) neuron, in pure torch.

Everything a framework adapter needs lives here, free of any SNN framework:

* :func:`tpp_accumulate` — phase 1, sum one window of input into a membrane potential;
* :func:`tpp_fire` — phase 2, turn a potential into ``T`` stochastically placed spikes;
* :func:`tpp_forward` — both phases for a window ``[T, ...]``;
* :func:`tpp_count` — the spike count alone (count-domain evaluation);
* :func:`permute_time` — the temporal permutation ("misalignment") of spike trains;
* :func:`qcfs` — the quantization-clip-floor-shift activation the TPP neuron converts exactly.

The firing rule works in units of the threshold, ``w = v / θ``. At step ``t = 1..T`` a neuron
fires when ``u_t · (T − t + 1) < w`` with ``u_t ~ U[0, 1)``, i.e. with probability
``clamp(w / (T − t + 1), 0, 1) = clamp(v / (θ·(T − t + 1)), 0, 1)``, and then ``w ← w − 1``
(``v ← v − θ``). With ``count='exact'`` the potential is first rounded to a whole number of
thresholds, ``w ← clamp(floor(w + ½), 0, T)``, so exactly ``w`` spikes land on a uniformly random
``w``-subset of the ``T`` slots. All ``T`` uniforms of a window are drawn at once, at the window
boundary, so any caller that draws windows in the same order gets bit-identical spikes.

Uniforms are 16-bit (``u = r/2¹⁶``, four from each 64-bit draw of the generator): the floor of
the method's cost is one pass of memory traffic plus one random number per neuron and step, and
16 bits are a quarter of a 64-bit draw. Each step's firing probability is thereby rounded up to a
multiple of ``2⁻¹⁶`` (never more than ``2⁻¹⁶`` off; 0 and 1 stay exact, so whole potentials
still give exact counts). The fast paths (:func:`tpp_fire`, :func:`permute_time`) are checked
bit for bit against plain reference loops (:func:`tpp_fire_reference`,
:func:`permute_time_reference`).
"""

from __future__ import annotations

import hashlib
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
    "check_seed_value",
    "check_window_sum",
    "check_broadcast",
    "spawn_seeds",
    "SEED_LIMIT",
    "UNIFORM_BITS",
    "window_uniforms",
    "tpp_accumulate",
    "tpp_fire",
    "tpp_fire_reference",
    "tpp_count",
    "tpp_forward",
    "expected_count",
    "permute_time",
    "permute_time_reference",
    "permutation_bits",
    "qcfs",
    "COUNT_TABLE_BINS",
    "expected_count_table",
    "tpp_count_two_point",
    "expected_count_fast",
]

COUNT_MODES = ("bernoulli", "exact", "unbiased")
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


def check_threshold(threshold, name: str = "threshold", shape=None):
    """Return a valid threshold: a finite positive number, or a tensor of them.

    :param shape: if given, a tensor threshold must broadcast to this shape without enlarging it
    :raises TypeError: if ``threshold`` is neither a real number nor a floating tensor
    :raises ValueError: if any threshold is not finite or not positive, lives on the meta
        device, or does not broadcast to ``shape``

    Example::

        >>> check_threshold(0.5)
        0.5
        >>> check_threshold(-1.0)
        Traceback (most recent call last):
        ...
        ValueError: threshold must be finite and > 0, got -1.0
    """
    if isinstance(threshold, torch.Tensor):
        if not threshold.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got dtype {threshold.dtype}")
        _check_not_meta(threshold, name)
        if shape is not None:
            check_broadcast(threshold, shape, name)
        if not bool(torch.isfinite(threshold).all()) or bool((threshold <= 0).any()):
            raise ValueError(f"{name} must be finite and > 0 everywhere")
        return threshold
    if isinstance(threshold, bool) or not isinstance(threshold, Real):
        raise TypeError(f"{name} must be a positive number, got {type(threshold).__name__}")
    threshold = float(threshold)
    if not math.isfinite(threshold) or threshold <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {threshold}")
    return threshold


def _check_not_meta(x: torch.Tensor, name: str) -> None:
    if x.device.type == "meta":
        raise ValueError(
            f"{name} is on the meta device and holds no values; materialize it first (e.g. "
            "module.to_empty(device='cpu') and load the weights, or .to('cpu'))"
        )


def check_broadcast(tensor: torch.Tensor, shape, name: str = "threshold") -> None:
    """Check that ``tensor`` broadcasts to ``shape`` without enlarging it.

    :raises ValueError: naming ``name``, both shapes and the rule, if it does not

    Example::

        >>> check_broadcast(torch.ones(3), (2, 3))
        >>> check_broadcast(torch.ones(2), (2, 3))
        Traceback (most recent call last):
        ...
        ValueError: threshold of shape (2,) does not broadcast to the input's shape (2, 3) ...
    """
    shape = tuple(shape)
    try:
        ok = tuple(torch.broadcast_shapes(tuple(tensor.shape), shape)) == shape
    except RuntimeError:
        ok = False
    if not ok:
        hint = f"{shape[-1:]} or {(*shape[:-1], 1)}" if shape else "()"
        raise ValueError(
            f"{name} of shape {tuple(tensor.shape)} does not broadcast to the input's shape "
            f"{shape} (it must broadcast without enlarging the input, e.g. shape {hint})"
        )


def check_tensor(x, name: str, min_dim: int = 0, finite: bool = True) -> torch.Tensor:
    """Check that ``x`` is a floating tensor with at least ``min_dim`` dimensions (and finite).

    :raises TypeError: if ``x`` is not a floating-point tensor
    :raises ValueError: if ``x`` has too few dimensions or non-finite entries
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    _check_not_meta(x, name)
    if x.dim() < min_dim:
        raise ValueError(
            f"{name} must have at least {min_dim} dimension(s), got shape {tuple(x.shape)}"
        )
    # a NaN or ±inf entry makes the sum non-finite: one read-only pass, no [x.shape] temporary;
    # only a sum that overflows needs the element-wise check
    if finite and x.numel() and not bool(torch.isfinite(x.sum())):
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} contains NaN or infinite values")
    return x


def check_seed(seed, generator) -> None:
    """Check a module's randomness arguments: an ``int`` seed or a ``torch.Generator``, not both.

    :raises ValueError: if both are given
    :raises TypeError: if ``seed`` is not an int or ``generator`` not a ``torch.Generator``
    """
    if seed is not None and generator is not None:
        raise ValueError("pass either seed or generator, not both")
    if seed is not None:
        check_seed_value(seed)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")


#: seeds are integers in ``[0, SEED_LIMIT)`` (what ``torch.Generator.manual_seed`` accepts)
SEED_LIMIT = 2**64


def check_seed_value(seed, name: str = "seed") -> int:
    """Return ``seed`` as an ``int`` in ``[0, 2**64)``, else raise.

    :raises TypeError: if ``seed`` is not an integer (``bool``, ``float``, ``str``, ``None``)
    :raises ValueError: if it is negative or ``>= 2**64``

    Example::

        >>> check_seed_value(7)
        7
        >>> check_seed_value(1.5)
        Traceback (most recent call last):
        ...
        TypeError: seed must be an int in [0, 2**64), got float 1.5
    """
    if isinstance(seed, bool) or not isinstance(seed, Integral):
        raise TypeError(f"{name} must be an int in [0, 2**64), got {type(seed).__name__} {seed!r}")
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"{name} must be an int in [0, 2**64), got {seed}")
    return int(seed)


def spawn_seeds(seed, n: int) -> list:
    """``n`` seeds for independent random streams, derived from one user ``seed``.

    Like ``numpy.random.SeedSequence(seed).spawn(n)``: child ``i`` is a 63-bit hash (BLAKE2b) of
    ``(seed, i)``, so the children of different seeds do not overlap (``seed=0`` and ``seed=1``
    share no stream, unlike ``seed + i``), and adding layers does not change the seeds of the
    first ones. The converters give their ``i``-th random layer the ``i``-th child
    (see ``docs/design.md``, "Seeds").

    :param seed: the user's seed (see :func:`check_seed_value`)
    :param n: number of child seeds
    :return: a list of ``n`` ints in ``[0, 2**63)``

    Example::

        >>> a, b = spawn_seeds(0, 3), spawn_seeds(1, 3)
        >>> len(a), set(a) & set(b)
        (3, set())
        >>> spawn_seeds(0, 2) == a[:2]
        True
    """
    seed = check_seed_value(seed)
    if isinstance(n, bool) or not isinstance(n, Integral) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    out = []
    for i in range(int(n)):
        digest = hashlib.blake2b(
            seed.to_bytes(8, "little") + int(i).to_bytes(8, "little"),
            digest_size=8, person=b"tpp_plugin.seed",
        ).digest()
        out.append(int.from_bytes(digest, "little") >> 1)
    return out


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
# randomness: 16-bit uniforms, four per 64-bit draw
# ----------------------------------------------------------------------------------------------
#: bits per uniform: u = r / 2**16 with r a random 16-bit integer
UNIFORM_BITS = 16
_UNIFORM_SCALE = 2.0**-UNIFORM_BITS


def _words(numel: int) -> int:
    return (numel + 3) // 4  # 64-bit words holding ``numel`` 16-bit draws


def _fill_words(words: torch.Tensor, generator) -> torch.Tensor:
    # full 64-bit range: all four 16-bit lanes of each word are uniform
    return words.random_(-(2**63), None, generator=generator)


def _draw_bits(numel: int, device, generator=None) -> torch.Tensor:
    """``numel`` random 16-bit integers (``torch.uint16``, flat) from ``⌈numel/4⌉`` 64-bit draws.

    This fixes how every random number of this module is drawn: the generator advances by the
    same amount whatever consumes the bits, so equal draws give equal spikes.
    """
    words = torch.empty(_words(numel), dtype=torch.int64, device=device)
    return _fill_words(words, generator).view(torch.uint16)[:numel]


def _step_draws(T: int, n: int, device, generator):
    """Yield the ``T`` rows ``[n]`` of :func:`_draw_bits` ``(T·n)`` one step at a time.

    On the CPU the generator hands out 64-bit words one after another, so drawing the words of
    each step separately gives the same numbers (when a step is a whole number of words) without
    a ``[T, n]`` buffer; other devices draw the window at once.
    """
    if torch.device(device).type == "cpu" and n % 4 == 0:
        words = torch.empty(n // 4, dtype=torch.int64)
        for _ in range(T):
            yield _fill_words(words, generator).view(torch.uint16)
    else:
        yield from _draw_bits(T * n, device, generator).view(T, n)


def window_uniforms(shape, T: int, device, dtype=torch.float32, generator=None) -> torch.Tensor:
    """Draw the uniforms of one firing window, ``[T, *shape]`` in ``[0, 1)``.

    Each uniform is ``r / 2**16`` for a random 16-bit integer ``r`` (:data:`UNIFORM_BITS`; four
    per 64-bit draw, so a window costs ``⌈T·numel/4⌉`` draws of the generator). This is the one
    place randomness is drawn for :func:`tpp_fire`: a module that streams a window step by step
    calls :func:`tpp_fire` (or this function) once at the window boundary and so reproduces it
    bit for bit.

    :param shape: shape of one step, ``[*shape]``
    :param T: window length
    :param device: device of the uniforms
    :param dtype: dtype of the potential; the uniforms are ``float64`` for ``float64`` and
        ``float32`` otherwise
    :param generator: optional ``torch.Generator`` on ``device``
    :return: uniforms, shape ``[T, *shape]``

    Example::

        >>> u = window_uniforms((3,), 4, 'cpu', generator=torch.Generator().manual_seed(0))
        >>> u.shape, bool((u * 2**16 == (u * 2**16).floor()).all())
        (torch.Size([4, 3]), True)
    """
    T = check_window(T)
    shape = tuple(shape)
    bits = _draw_bits(T * math.prod(shape), device, generator)
    return bits.to(_random_dtype(dtype)).mul_(_UNIFORM_SCALE).view(T, *shape)


# ----------------------------------------------------------------------------------------------
# the TPP neuron
# ----------------------------------------------------------------------------------------------
def tpp_accumulate(x_seq: torch.Tensor, v_init=0.0) -> torch.Tensor:
    r"""Phase 1: ``v = v_init + Σ_t x_t`` over the leading (time) dimension.

    The sum is taken step by step in time order, so a caller that adds ``x_t`` to its state one
    step at a time gets the same floating-point result bit for bit.

    :param x_seq: input currents, shape ``[T, *shape]``
    :param v_init: initial potential, a number or a tensor broadcastable to ``shape``
    :return: membrane potential, shape ``[*shape]``
    """
    check_tensor(x_seq, "x_seq", min_dim=1)
    if x_seq.shape[0] == 0:
        raise ValueError(
            f"x_seq has an empty time dimension (shape {tuple(x_seq.shape)}): a window needs "
            "at least one step"
        )
    v = x_seq[0] + v_init
    for t in range(1, x_seq.shape[0]):
        v.add_(x_seq[t])
    check_window_sum(v, x_seq.dtype)
    return v


def check_window_sum(v: torch.Tensor, dtype=None, name: str = "x_seq") -> torch.Tensor:
    """Raise a clear error if a window sum of finite inputs overflowed its dtype.

    :param v: the window sum (membrane potential)
    :param dtype: dtype of the inputs (for the message; defaults to ``v``'s)
    :param name: the input that was summed
    :raises ValueError: naming ``name``, the dtype and its largest finite value

    Example::

        >>> check_window_sum(torch.tensor([65504.0]).half() * 2, torch.float16)
        Traceback (most recent call last):
        ...
        ValueError: the window sum of x_seq overflows torch.float16 ...
    """
    if v.numel() and not bool(torch.isfinite(v.sum())) and not bool(torch.isfinite(v).all()):
        dtype = v.dtype if dtype is None else dtype
        raise ValueError(
            f"the window sum of {name} overflows {dtype} (largest finite value "
            f"{torch.finfo(dtype).max:g}); feed {name} in a wider dtype (e.g. float32) or "
            "scale it down together with the threshold"
        )
    return v


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


def _check_fire_args(v, T, threshold, count):
    check_tensor(v, "v", finite=False)
    if v.numel() and not bool(torch.isfinite(v.sum())) and not bool(torch.isfinite(v).all()):
        raise ValueError(
            f"v (the membrane potential) contains NaN or infinite values; if the inputs were "
            f"finite, their window sum overflowed {v.dtype} (largest finite value "
            f"{torch.finfo(v.dtype).max:g}): feed a wider dtype or scale the input down together "
            "with the threshold"
        )
    T = check_window(T)
    return T, check_threshold(threshold, shape=v.shape), check_count(count)


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


def _rounding_uniforms(n: int, device, generator, rdtype) -> torch.Tensor:
    """The ``n`` uniforms of ``count='unbiased'``'s rounding, drawn before the window's ``T``
    step uniforms (so :func:`tpp_count` and :func:`tpp_fire` draw in the same order)."""
    return _draw_bits(n, device, generator).to(rdtype).mul_(_UNIFORM_SCALE)


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


# ----------------------------------------------------------------------------------------------
# temporal permutation
# ----------------------------------------------------------------------------------------------
def _swap_indices(bits: torch.Tensor, i: int, out_f: torch.Tensor, out_j: torch.Tensor):
    """Fisher–Yates step ``i``: ``j = floor(r·(i+1) / 2¹⁶)``, uniform on ``0..i`` up to a relative
    error below ``(i+1)/2¹⁶`` (``r·(i+1)`` is exact in the float dtype chosen by the caller)."""
    torch.mul(bits, torch.tensor((i + 1) * _UNIFORM_SCALE, dtype=out_f.dtype), out=out_f)
    return out_j.copy_(out_f)  # truncation == floor for j >= 0


def _index_dtype(T: int) -> torch.dtype:
    return torch.float32 if T <= 256 else torch.float64  # r·T < 2²⁴: exact in float32


def permute_time_reference(x_seq: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    r"""Neuron-scope permutation written out plainly (one neuron at a time), for tests.

    Fisher–Yates from the back: for ``i = T−1, …, 1`` draw ``j = floor(r_i·(i+1)/2¹⁶)`` and swap
    slots ``i`` and ``j``.

    :param x_seq: ``[T, *shape]``
    :param bits: the 16-bit draws, ``[T−1, numel]`` (row ``k`` serves ``i = T−1−k``)
    :return: the permuted sequence
    """
    T = x_seq.shape[0]
    flat = x_seq.reshape(T, -1).clone()
    for col in range(flat.shape[1]):
        for k, i in enumerate(range(T - 1, 0, -1)):
            j = int(bits[k, col].item()) * (i + 1) >> UNIFORM_BITS
            flat[i, col], flat[j, col] = flat[j, col].clone(), flat[i, col].clone()
    return flat.view(x_seq.shape)


def permutation_bits(T: int, numel: int, device, generator=None) -> torch.Tensor:
    """The draws of a neuron-scope :func:`permute_time`, ``[T−1, numel]`` 16-bit integers, in the
    order it draws them (one ``⌈numel/4⌉``-word draw per swap step), for
    :func:`permute_time_reference`."""
    rows = [_draw_bits(numel, device, generator) for _ in range(T - 1)]
    return torch.stack(rows) if rows else torch.empty((0, numel), dtype=torch.uint16)


def _permute_neurons(x_seq: torch.Tensor, generator) -> torch.Tensor:
    """Independent Fisher–Yates shuffle of every neuron's train, in O(T) passes and no sort."""
    T = x_seq.shape[0]
    out = x_seq.clone(memory_format=torch.contiguous_format)
    flat = out.view(T, -1)
    n = flat.shape[1]
    if T == 1 or n == 0:
        return out
    words = torch.empty(_words(n), dtype=torch.int64, device=x_seq.device)
    j_f = torch.empty(n, dtype=_index_dtype(T), device=x_seq.device)
    j = torch.empty((1, n), dtype=torch.int64, device=x_seq.device)
    row_i = torch.empty((1, n), dtype=x_seq.dtype, device=x_seq.device)
    at_j = torch.empty((1, n), dtype=x_seq.dtype, device=x_seq.device)
    for i in range(T - 1, 0, -1):  # one window's draws per step: row k of the reference's bits
        bits = _fill_words(words, generator).view(torch.uint16)[:n]
        _swap_indices(bits, i, j_f, j.view(n))
        row_i.copy_(flat[i])
        torch.gather(flat, 0, j, out=at_j)
        flat.scatter_(0, j, row_i)
        flat[i].copy_(at_j[0])
    return out


def _is_spike_train(x_seq: torch.Tensor) -> bool:
    """``True`` if every value is 0 or 1 (what spiking neurons emit)."""
    return x_seq.is_floating_point() and not bool(((x_seq != 0) & (x_seq != 1)).any())


def permute_time(
    x_seq: torch.Tensor, scope: str = "neuron", generator: torch.Generator | None = None
) -> torch.Tensor:
    r"""Randomly rearrange spike trains along time (dim 0); every neuron keeps its count.

    ``scope='neuron'`` shuffles each neuron's train independently, in ``O(T)`` passes and no
    sort. A 0/1 spike train is redrawn as its count of spikes on a uniformly random subset of the
    ``T`` slots (:func:`tpp_fire` with ``count='exact'`` on the counts: the same distribution as a
    uniform shuffle); other values get a Fisher–Yates shuffle (``T − 1`` swaps, each from a
    16-bit draw; see :func:`permute_time_reference`). The other scopes draw one permutation per
    sample or layer.

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
    if scope == "neuron":
        if _is_spike_train(x_seq):
            # a uniformly shuffled 0/1 train is its k spikes on a uniform k-subset of the T slots:
            # exactly what an exact-count TPP neuron fires from k, in three ops per step
            return tpp_fire(x_seq.sum(0), T, 1.0, "exact", generator)
        return _permute_neurons(x_seq, generator)
    if scope == "layer":
        perm = torch.randperm(T, generator=generator, device=x_seq.device)
        return x_seq[perm]
    keys = torch.rand(x_seq.shape[:2], generator=generator, device=x_seq.device)
    order = keys.argsort(dim=0)
    order = order.view(*order.shape, *([1] * (x_seq.dim() - 2))).expand_as(x_seq)
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
    if isinstance(lam, torch.Tensor):
        if not lam.is_floating_point():
            raise TypeError(f"lam must be a number or a floating tensor, got dtype {lam.dtype}")
        _check_not_meta(lam, "lam")
        if not bool(torch.isfinite(lam).all()) or bool((lam <= 0).any()):
            raise ValueError("lam (the clipping level λ) must be finite and > 0 everywhere")
    else:
        check_threshold(lam, "lam")
    # clip before the floor (as QCFS does) so the straight-through gradient reaches all of (0, λ)
    z = (x / lam).clamp(0, 1) * L + shift
    z = z + (torch.floor(z) - z).detach()
    return z * lam / L


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
    """The tables of :func:`tpp_count_two_point` on ``device``, both ``[T·M + 1]``:
    ``E(i/M)·2¹⁶`` and the slope ``(E((i+1)/M) − E(i/M))·2¹⁶`` of bin ``i``; the last row is
    ``w = T`` (``T·2¹⁶``, slope 0)."""
    key = (T, dtype, str(device))
    tables = _DEVICE_TABLES.get(key)
    if tables is None:
        bins = COUNT_TABLE_BINS
        pairs = expected_count_table(T, bins)
        k = torch.div(torch.arange(T * bins), bins, rounding_mode="floor").to(torch.float64)
        start = torch.cat([pairs[:, 0] + k, torch.tensor([float(T)], dtype=torch.float64)])
        slope = torch.cat([pairs[:, 1] - pairs[:, 0], torch.zeros(1, dtype=torch.float64)])
        tables = tuple((t * 2.0**16).to(device=device, dtype=dtype) for t in (start, slope))
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
    return count.div_(2.0**16).view(w.shape).to(w.dtype)


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
    :param generator: optional ``torch.Generator`` on ``v``'s device (one ``⌈numel/4⌉``-word
        draw)
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


def _two_point_count(x: torch.Tensor, T: int, threshold, generator, gain=1.0, offset=0.0):
    """:func:`tpp_count_two_point` of ``v = gain·x + offset``, unchecked (count mode passes the
    mean current ``x``, ``gain = T`` and ``offset = v_init``: no ``v`` buffer)."""
    # E·2¹⁶ + r (r < 2¹⁶) must stay exact: float64 for float64 potentials and long windows
    rdtype = torch.float64 if x.dtype == torch.float64 or T >= 128 else torch.float32
    bins = COUNT_TABLE_BINS
    start, slope = _table_on(T, rdtype, x.device)
    n = x.numel()
    shift = bool(offset.any()) if isinstance(offset, torch.Tensor) else offset != 0
    if isinstance(threshold, torch.Tensor) or shift:
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
        pos = pos.to(rdtype).reshape(n).mul_(scale)
    else:
        pos = torch.mul(x.reshape(n), gain * bins / threshold).to(rdtype)  # w·M, one op
    pos.clamp_(0, T * bins)
    index = pos.to(torch.int32)  # truncation == floor for pos >= 0
    pos.frac_()  # the position inside the bin, in [0, 1]
    # E·2¹⁶ interpolated, plus a random 16-bit r: ⌊(E·2¹⁶ + r)/2¹⁶⌋ = k + [r ≥ 2¹⁶·(1 − p)]
    count = torch.addcmul(start.index_select(0, index), slope.index_select(0, index), pos)
    count.add_(_draw_bits(n, x.device, generator).to(rdtype))
    count.mul_(_UNIFORM_SCALE).floor_()
    return count.view(x.shape).to(x.dtype)
