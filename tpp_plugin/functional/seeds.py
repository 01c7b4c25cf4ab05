"""Seeds of independent random streams, derived from one user seed."""

from __future__ import annotations

import hashlib
from numbers import Integral

from .checks import check_seed_value

__all__ = [
    "spawn_seeds",
]


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
