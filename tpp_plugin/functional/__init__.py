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

# One module per topic; none of them imports this __init__, and they import each other only
# downwards: checks <- seeds, uniforms <- firing <- permutation; checks, uniforms <- counts;
# checks <- quantize.
#
# * checks: the validators;
# * seeds: spawn_seeds;
# * uniforms: the 16-bit draws (window_uniforms and the private draws every function uses);
# * firing: tpp_accumulate, tpp_fire, tpp_count, tpp_forward and tpp_fire_reference;
# * counts: expected_count, the count tables and the one-draw bernoulli count;
# * permutation: permute_time and permute_time_reference;
# * quantize: qcfs.
#
# Besides the public names, this namespace keeps every private name the single module had, so
# that ``functional._name`` (used by the adapters, count_domain and the tests) still works.
from .checks import (  # noqa: F401 (private names: see above)
    COUNT_MODES,
    PERMUTATION_SCOPES,
    SEED_LIMIT,
    _check_fire_args,
    _check_generator,
    _check_not_meta,
    check_broadcast,
    check_count,
    check_positive,
    check_scope,
    check_seed,
    check_seed_value,
    check_sequence,
    check_tensor,
    check_threshold,
    check_window,
    check_window_sum,
)
from .counts import (  # noqa: F401 (private names: see above)
    _COUNT_TABLES,
    _DEVICE_TABLES,
    COUNT_TABLE_BINS,
    _count_above_floor_exact,
    _table_on,
    _two_point_count,
    expected_count,
    expected_count_fast,
    expected_count_table,
    tpp_count_two_point,
)
from .firing import (  # noqa: F401 (private names: see above)
    _bits_inside,
    _potential_in_thresholds,
    tpp_accumulate,
    tpp_count,
    tpp_fire,
    tpp_fire_reference,
    tpp_forward,
)
from .permutation import (  # noqa: F401 (private names: see above)
    _index_dtype,
    _is_spike_train,
    _permute_neurons,
    _swap_indices,
    permutation_bits,
    permute_time,
    permute_time_reference,
)
from .quantize import qcfs
from .seeds import spawn_seeds
from .uniforms import (  # noqa: F401 (private names: see above)
    _UNIFORM_SCALE,
    UNIFORM_BITS,
    _draw_bits,
    _fill_words,
    _random_dtype,
    _rounding_uniforms,
    _step_draws,
    _words,
    window_uniforms,
)

__all__ = [
    "COUNT_MODES",
    "PERMUTATION_SCOPES",
    "check_count",
    "check_scope",
    "check_window",
    "check_threshold",
    "check_tensor",
    "check_sequence",
    "check_positive",
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
