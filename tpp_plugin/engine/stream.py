r"""The random stream of a TPP module: one rule for both frameworks and both backends.

A module draws from a *seed* (its own streams), a user's ``torch.Generator``, or torch's global
generator. With a seed, every device the module runs on gets its own ``torch.Generator`` started
from the seed the first time the module draws there, and keeps it: moving a module to another
device and back (or changing its dtype) continues the stream where it was. The ``'cupy'``
backend's Philox stream (:class:`PhiloxStream`) is derived from the same seed.
"""

from __future__ import annotations

import torch

from .. import functional as F

__all__ = ["RandomStream", "PhiloxStream", "Seeded"]


class PhiloxStream:
    """The counter-based stream of the CUDA kernels: a 64-bit key (the seed) and a window counter.

    Each window takes the next counter value, so the same seed gives the same spikes whether
    windows are launched one by one (streaming) or together (multi-step).
    """

    def __init__(self, seed: int):
        self.seed = int(seed) & (2**64 - 1)
        self.offset = 0

    def take(self, windows: int) -> tuple[int, int, int]:
        """Reserve ``windows`` windows; return ``(key0, key1, first window number)``."""
        first = self.offset
        self.offset = (self.offset + windows) % 2**32
        return self.seed & 0xFFFFFFFF, self.seed >> 32, first


class RandomStream:
    """Where a stochastic module's random numbers come from.

    :param seed: an int in ``[0, 2**64)``: the module's own streams (one per device, each started
        from ``seed``); or ``None``
    :param generator: a ``torch.Generator`` to draw from instead (mutually exclusive with ``seed``);
        both ``None``: torch's global generator

    Example::

        >>> stream = RandomStream(seed=3)
        >>> a = torch.rand(2, generator=stream.generator_for(torch.device('cpu')))
        >>> stream.reseed(3)
        >>> torch.equal(a, torch.rand(2, generator=stream.generator_for(torch.device('cpu'))))
        True
    """

    def __init__(self, seed: int | None = None, generator: torch.Generator | None = None):
        F.check_seed(seed, generator)
        self.seed = None if seed is None else int(seed)
        self.generator = generator
        self._by_device: dict = {}
        self._philox: PhiloxStream | None = None

    def reseed(self, seed: int) -> None:
        """Restart from ``seed`` on every device (a ``generator`` given before is dropped)."""
        self.seed = F.check_seed_value(seed)
        self.generator, self._by_device, self._philox = None, {}, None

    def generator_for(self, device) -> torch.Generator | None:
        """The ``torch.Generator`` to draw from for data on ``device`` (``None``: torch's global
        one)."""
        if self.generator is not None or self.seed is None:
            return self.generator
        key = str(torch.device(device))
        if key not in self._by_device:
            self._by_device[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._by_device[key]

    def philox(self) -> PhiloxStream:
        """The ``'cupy'`` kernels' stream: with a seed, this module's own (consecutive calls take
        consecutive windows); without, a fresh key for every call, drawn from the generator (or
        torch's global generator)."""
        if self.seed is not None:
            if self._philox is None:
                self._philox = PhiloxStream(self.seed)
            return self._philox
        device = self.generator.device if self.generator is not None else "cpu"
        key = torch.randint(2**63 - 1, (), generator=self.generator, device=device)
        return PhiloxStream(int(key))

    def __repr__(self) -> str:
        source = (f"seed={self.seed}" if self.seed is not None else
                  "generator" if self.generator is not None else "global generator")
        return f"RandomStream({source})"


class Seeded:
    """Mixin of every stochastic plugin module (both frameworks): its ``random_stream``, the
    ``seed`` it was built with, and :meth:`manual_seed` (what :func:`tpp_plugin.reseed` calls)."""

    random_stream: RandomStream

    @property
    def seed(self) -> int | None:
        """The seed of this module's own streams (``None``: a generator, or torch's global)."""
        return self.random_stream.seed

    def manual_seed(self, seed: int) -> None:
        """Restart this module's random stream from ``seed`` (on every device); a ``generator``
        given at construction is dropped. The one public way to reseed a plugin module, the same
        in SpikingJelly and snnTorch.

        :param seed: an int in ``[0, 2**64)``
        :raises TypeError: if ``seed`` is not an int (the state is then unchanged)
        :raises ValueError: if it is out of range (likewise)
        """
        self.random_stream.reseed(seed)
