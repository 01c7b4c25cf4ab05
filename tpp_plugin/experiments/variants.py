r"""The variants of ``python -m tpp_plugin reproduce``: how each spiking network is built, run and
watched, shared by :mod:`~tpp_plugin.experiments.reproduce` (IF, permutation and TPP variants)
and :mod:`~tpp_plugin.experiments.reproduce_calibration` (calibration recipes side by side).

* :data:`VARIANTS`: the rows of the IF/permutation/TPP comparison;
* :class:`FiringDiagnostic`: per spiking layer, the share of neurons firing more or fewer spikes
  than the ANN asks for;
* :func:`evaluate_net`: predictions, diagnostic and spike statistics of one network;
* the frameworks (:data:`FRAMEWORKS`): the variants through SpikingJelly or snnTorch, and the
  helpers the calibration comparison shares (:func:`sj_rate_coding`, :func:`sj_diagnostic`,
  :func:`snntorch_diagnostic`).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

import tpp_plugin

from .. import functional as F
from ..count_domain import count_window
from ..distributed import all_reduce_sum, rank_seed, shared_calibration, sync_thresholds, world
from ..stats import E_AC_PJ, E_MAC_PJ, ForwardHooks, SpikeStats

__all__ = [
    "SCOPES",
    "VARIANTS",
    "FiringDiagnostic",
    "evaluate_net",
    "sj_rate_coding",
    "sj_diagnostic",
    "snntorch_diagnostic",
    "FRAMEWORKS",
]


SCOPES = ("neuron", "sample", "layer")

#: variant key -> (label, stochastic)
VARIANTS = {
    "if_v0": ("IF, v starts at 0 (SJ default)", False),
    "if_half": ("IF, v starts at θ/2", False),
    **{f"perm_{s}": (f"IF θ/2 + permutation ({s})", True) for s in SCOPES},
    "tpp_bernoulli": ("TPP bernoulli", True),
    "tpp_exact": ("TPP exact", True),
}


# ------------------------------------------------------------------------------------------------
# the per-layer firing diagnostic
# ------------------------------------------------------------------------------------------------
class FiringDiagnostic(ForwardHooks):
    """Count, per spiking layer, neurons firing more or fewer spikes than the ANN asks for.

    Forward hooks on the spiking neurons of a network run in multi-step (sequence) mode see the
    input currents ``x`` ``[T, N, ...]`` and the spikes ``[T, N, ...]`` of each window. A neuron is
    *over-firing* if its count exceeds ``clamp(round(Σ_t x_t / θ), 0, T)`` (round half up, the
    QCFS rule; the sum is taken in time order, as the neurons do), *under-firing* if it falls short.
    Under :func:`tpp_plugin.count_mode` a TPP neuron sees its mean current ``m`` ``[N, ...]`` and
    outputs ``s·count/T``: the same comparison with ``Σ_t x_t = T·m``.

    :param net: the spiking network
    :param neuron_types: module types to watch (one hook each, in ``named_modules`` order)
    :param threshold: ``f(module) -> θ`` (number or tensor broadcastable to a step)
    :param spike_scale: ``f(module) -> s``: the module outputs ``s·spike`` (snnTorch's graded
        spikes), default 1

    Use as a context manager (hooks are removed on exit); :meth:`summary` gives the totals.

    Example::

        >>> from tpp_plugin.adapters.spikingjelly import TPPNode
        >>> snn = nn.Sequential(TPPNode(count='exact', step_mode='m', seed=0))
        >>> x_seq = torch.full((4, 2, 3), 0.3)           # Σx = 1.2θ: one spike wanted
        >>> with FiringDiagnostic(snn, (TPPNode,), lambda m: m.v_threshold) as diag:
        ...     _ = snn(x_seq)
        >>> diag.summary()[0]['over']      # share of over-firing neurons in the first layer
        0.0
    """

    def __init__(self, net: nn.Module, neuron_types, threshold, spike_scale=None):
        self.layers = [name for name, m in net.named_modules() if isinstance(m, neuron_types)]
        modules = [m for m in net.modules() if isinstance(m, neuron_types)]
        self.threshold, self.spike_scale = threshold, spike_scale or (lambda m: 1.0)
        self.totals = [[0, 0, 0] for _ in modules]  # neurons seen, over, under
        self._handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(modules)]

    def _hook(self, i):
        def hook(module, inputs, output):
            x_seq = inputs[0]
            spikes = output[0] if isinstance(output, tuple) else output
            T = count_window(module)
            if T is not None:  # count mode: mean current in, s·count/T out
                potential, count = T * x_seq, spikes * T
            elif x_seq.dim() < 2 or spikes.dim() != x_seq.dim() or len(spikes) != len(x_seq):
                return  # single-step call: nothing to compare
            else:
                T, potential, count = x_seq.shape[0], F.tpp_accumulate(x_seq), spikes.sum(0)
            theta = self.threshold(module)
            if getattr(module, "pool", None) is not None:  # a TPP neuron max-pools its potential
                potential = module.pool(potential)
            # potential and count are this hook's own tensors: rounded in place
            wanted = potential.div_(theta).add_(0.5).floor_().clamp_(0, T)
            count = count.div_(self.spike_scale(module)).round_()
            totals = self.totals[i]
            totals[0] += count.numel()
            totals[1] += int(torch.count_nonzero(count > wanted))
            totals[2] += int(torch.count_nonzero(count < wanted))

        return hook

    def all_reduce(self, group=None) -> FiringDiagnostic:
        """Sum the totals over the ranks of a ``torch.distributed`` group (in place)."""
        if self.totals:
            self.totals = all_reduce_sum(self.totals, group, torch.int64).tolist()
        return self

    def summary(self) -> list[dict]:
        """``[{'layer', 'neurons', 'over', 'under'}]``: shares of the (image, neuron) pairs seen."""
        return [
            {"layer": name, "neurons": n, "over": over / max(n, 1), "under": under / max(n, 1)}
            for name, (n, over, under) in zip(self.layers, self.totals)
        ]


# ------------------------------------------------------------------------------------------------
# frameworks: build the variants, run them
# ------------------------------------------------------------------------------------------------
def _variant_seed(seed: int, T: int) -> int:
    """The base seed of a (seed, T) run on this rank (rank 0: the one-process seed)."""
    return rank_seed(seed * 1_000_003 + T * 1_009, world()[0])


def _spike_record(stats) -> dict:
    """The JSON part of a reduced :class:`~tpp_plugin.stats.SpikeStats`."""
    s = stats.all_reduce().summary()
    return {"spikes_per_image": s["spikes_per_image"], "sops_per_image": s["sops_per_image"],
            "energy_pj_per_image": s["energy"]["snn_pj_per_image"],
            "ann_macs_per_image": s["ann_macs_per_image"],
            "snn_macs_per_image": s["snn_macs_per_image"],
            "firing_rate": [layer["firing_rate"] for layer in s["layers"]]}


@torch.no_grad()
def evaluate_net(net, T: int, x, y, batch_size: int, diagnostic: dict, energy, *, seed=None,
                 count: bool = False, reset=None):
    """Predictions, per-layer firing diagnostic and spike record of one network on ``(x, y)``
    (this rank's shard; the diagnostic and the spike statistics are all-reduced).

    :param net: converted network; SpikingJelly ones already in multi-step mode
    :param T: time steps
    :param batch_size: images per forward
    :param diagnostic: keyword arguments of :class:`FiringDiagnostic` (``neuron_types``,
        ``threshold``, optionally ``spike_scale``)
    :param energy: ``(e_ac, e_mac)`` in pJ
    :param seed: reseed the random modules with :func:`tpp_plugin.reseed` first (``None``: keep
        their streams)
    :param count: evaluate under :func:`tpp_plugin.count_mode` (one pass per batch) instead of
        the full ``[T, N, ...]`` simulation
    :param reset: resets the network's state before each batch of the full simulation (default
        :func:`tpp_plugin.reset`)
    :return: ``(predictions, diagnostic summary, spike record)``
    """
    reset = reset or tpp_plugin.reset
    if seed is not None:  # every random module gets its own seed spawned from this one
        tpp_plugin.reseed(net, seed)
    preds = []
    with FiringDiagnostic(net, **diagnostic) as diag, SpikeStats(net, T, *energy) as stats:
        for start in range(0, len(y), batch_size):
            xb = x[start : start + batch_size]
            if count:
                with tpp_plugin.count_mode(net, T):
                    preds.append(net(xb).argmax(1))
            else:
                reset(net)
                preds.append(net(xb.unsqueeze(0).expand(T, *xb.shape)).sum(0).argmax(1))
    if not count:
        reset(net)
    return torch.cat(preds), diag.all_reduce().summary(), _spike_record(stats)


def sj_rate_coding(ann, calibration, mode: str, device) -> tuple[nn.Module, str]:
    """SpikingJelly's own conversion of a ReLU ANN with thresholds from ``mode`` (``max`` or a
    percentile): ``RateCodingRecipe`` on 2.x (under torchrun with the calibration batches shared
    among the ranks), the ``Converter`` on 0.0.0.0.14; IF neurons starting at ``v = 0``.

    :return: ``(network, description)``; the ANN is not modified
    """
    from spikingjelly.activation_based import ann2snn

    from ..adapters import spikingjelly as sj

    mode = "Max" if mode == "max" else mode
    if sj.IS_LEGACY:
        # the plain 0.0.0.0.14 result runs single-step only: neuron='if' builds the same IFNode
        # (v = 0) and makes the graph multi-step capable
        net = ann2snn.Converter(calibration, device=device, mode=mode, neuron="if")(
            copy.deepcopy(ann))
        return net, f"spikingjelly 0.0.0.0.14 Converter(mode={mode!r})"

    # SpikingJelly's recipe; under torchrun its calibration batches are shared among the ranks
    # and the statistics all-reduced (in one process: the recipe unchanged)
    recipe = shared_calibration(ann2snn.RateCodingRecipe)(calibration, mode=mode)
    net = ann2snn.Converter(recipe, device=device).convert(copy.deepcopy(ann))
    return net, f"spikingjelly RateCodingRecipe(mode={mode!r})"


class _SpikingJelly:
    """Variants through the SpikingJelly adapter (2.x and 0.0.0.0.14)."""

    name = "spikingjelly"

    def __init__(self, args, ann, ann_type, calibration, device):
        from ..adapters import spikingjelly as sj

        self.sj, self.device = sj, device
        self.diagnostic = sj_diagnostic()
        if ann_type == "qcfs":
            v0 = sj.convert_qcfs(ann, "if", {"v_init": 0.0})
            self.conversion = "tpp_plugin convert_qcfs (threshold = λ)"
        else:
            v0, self.conversion = sj_rate_coding(ann, calibration, args.mode, device)
        v0 = v0.to(device).eval()

        # every rank calibrated on the same batches: make sure they all use rank 0's thresholds
        self.threshold_gap = sync_thresholds(v0)
        self.e_ac, self.e_mac = _energy_constants(args)
        half = sj.swap_neurons(copy.deepcopy(v0), "if", v_init=0.5)
        self.nets = {"if_v0": v0, "if_half": half}
        for scope in SCOPES:
            self.nets[f"perm_{scope}"] = sj.insert_permutation(copy.deepcopy(half), scope, seed=0)
        for count in ("bernoulli", "exact"):
            self.nets[f"tpp_{count}"] = sj.swap_neurons(
                copy.deepcopy(half), "tpp", count=count, seed=0)

    def evaluate(self, key, T, seed, x, y, batch_size):
        from spikingjelly.activation_based import functional

        net = self.nets[key]
        functional.set_step_mode(net, "m")
        # every random module gets its own seed spawned from the variant's, whatever ran before
        return evaluate_net(net, T, x, y, batch_size, self.diagnostic, (self.e_ac, self.e_mac),
                            seed=_variant_seed(seed, T), reset=functional.reset_net)


def sj_diagnostic() -> dict:
    """:class:`FiringDiagnostic` arguments for SpikingJelly networks (IF and TPP neurons)."""
    from ..adapters.spikingjelly.building import SPIKING_TYPES  # IF, half-threshold IF, TPP

    return {"neuron_types": SPIKING_TYPES, "threshold": lambda m: m.v_threshold}


def snntorch_diagnostic() -> dict:
    """:class:`FiringDiagnostic` arguments for the plugin's snnTorch networks (graded spikes)."""
    from ..adapters.snntorch import IF, TPP

    return {"neuron_types": (TPP, IF), "threshold": lambda m: m.threshold,
            "spike_scale": lambda m: m.graded_spikes_factor}


class _SnnTorch:
    """Variants through the plugin's snnTorch converter (sequence mode). snnTorch has no
    converter of its own, so there is no 'framework default' IF: the plugin's IF starts at θ/2."""

    name = "snntorch"

    def __init__(self, args, ann, ann_type, calibration, device):
        from ..adapters import snntorch as st

        self.st, self.ann = st, ann
        self.calibration = calibration if ann_type == "relu" else None
        self.mode = args.mode
        self.diagnostic = snntorch_diagnostic()
        self.nets = {k: None for k in VARIANTS if k != "if_v0"}
        self.threshold_gap = 0.0
        self.e_ac, self.e_mac = _energy_constants(args)
        self.conversion = (f"tpp_plugin snnTorch convert(mode={args.mode!r})"
                           if ann_type == "relu" else "tpp_plugin snnTorch convert (threshold = λ)")

    @torch.no_grad()
    def evaluate(self, key, T, seed, x, y, batch_size):
        kwargs = {"neuron": "if"}
        if key.startswith("perm_"):
            kwargs["permutation"] = key[len("perm_"):]
        elif key.startswith("tpp_"):
            kwargs = {"neuron": "tpp", "count": key[len("tpp_"):]}
        if key != "if_half":
            kwargs["seed"] = _variant_seed(seed, T)

        net = self.st.convert(self.ann, self.calibration, num_steps=T, mode=self.mode, **kwargs)
        self.threshold_gap = max(self.threshold_gap, sync_thresholds(net))
        return evaluate_net(net, T, x, y, batch_size, self.diagnostic, (self.e_ac, self.e_mac),
                            reset=self.st.reset)


FRAMEWORKS = {"spikingjelly": _SpikingJelly, "snntorch": _SnnTorch}


def _energy_constants(args) -> tuple[float, float]:
    return getattr(args, "e_ac", None) or E_AC_PJ, getattr(args, "e_mac", None) or E_MAC_PJ
