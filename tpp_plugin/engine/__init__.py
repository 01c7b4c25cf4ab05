r"""The window engine: one implementation of a TPP window in time, free of any framework.

* :mod:`~tpp_plugin.engine.window` — the state record and step functions of window-synchronous
  and delayed single-step streaming, and the branch delay;
* :mod:`~tpp_plugin.engine.graph` — the graph passes (delays along paths, branch alignment,
  max-pool pairing);
* :mod:`~tpp_plugin.engine.stream` — the random-stream rule.

SpikingJelly's ``TPPNode``/``TemporalPermutation`` and snnTorch's ``snn.TPP``/
``TemporalPermutation`` are thin wrappers over these and :mod:`tpp_plugin.functional`.
"""

from .graph import align_delays, delay_depths, longest_delay, pair_max_pools
from .stream import PhiloxStream, RandomStream, Seeded
from .window import (
    STREAMING_MODES,
    WindowState,
    changed_input_error,
    check_streaming_mode,
    delay_step,
    delayed_step,
    synchronous_step,
)

__all__ = [
    "STREAMING_MODES",
    "WindowState",
    "check_streaming_mode",
    "changed_input_error",
    "synchronous_step",
    "delayed_step",
    "delay_step",
    "delay_depths",
    "longest_delay",
    "align_delays",
    "pair_max_pools",
    "RandomStream",
    "PhiloxStream",
    "Seeded",
]
