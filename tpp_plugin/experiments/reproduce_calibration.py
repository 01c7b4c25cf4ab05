r"""Threshold calibrations side by side: ``python -m tpp_plugin reproduce --calibration ...``.

With ``--calibration RECIPE [RECIPE ...]`` a configuration compares calibration recipes on ONE
trained ReLU ANN, every recipe calibrated on the same images (the first ``--calib-images``
training images, batches of 256), for every ``T`` of ``--T``:

* a RateCoding mode (``99.9%``, ``max``, ``99.99%``, ...): SpikingJelly's
  ``RateCodingRecipe(mode)`` (0.0.0.0.14: its ``Converter``; ``--framework snntorch``: the
  plugin's converter) with its IF neuron — the network SpikingJelly builds, run in multi-step
  mode (snnTorch: the plugin's IF, starting at θ/2, sequence mode) — and with TPP for each count
  rule (``exact``, ``bernoulli``, ``unbiased``);
* ``ltb``: SpikingJelly 2.x's ``LocalThresholdBalancingRecipe`` with the half-threshold IF it
  builds, and with TPP for each count rule;
* ``tpp``: the plugin's calibration for ``T`` (:func:`tpp_plugin.calibration.calibrate_for_T`,
  through ``ann2snn.TPPCalibrationRecipe`` on 2.x, ``convert_calibrated`` on 0.0.0.0.14,
  ``adapters.snntorch.convert(mode=...)`` on snnTorch) with TPP for each count rule. It
  calibrates *for* ``T`` and the count rule: one calibration per ``T`` and count rule.

RateCoding and LTB thresholds do not depend on ``T``: one conversion per recipe, and its TPP
networks keep the converted network's thresholds (neurons swapped with
:func:`~tpp_plugin.adapters.spikingjelly.swap_neurons`; the snnTorch converter builds them per
``T`` with the same statistic). The calibration time of a recipe is the wall clock of its
conversion (per ``T`` for ``tpp``: the exact-count calibration's); the ``tpp`` calibration uses
every calibration image
(``max_samples=None``), like the other recipes.

TPP networks are evaluated in count mode (:func:`tpp_plugin.count_mode`, one ANN-sized pass):
exact counts equal the full simulation's, bernoulli and unbiased counts equal them in
distribution (docs/design.md §4). A network count mode refuses runs the full simulation instead;
each row records how it ran (``evaluation``). Per ``T`` the ``tpp`` calibration's per-layer
report (:func:`tpp_plugin.calibration.calibration_report`) has the other recipes' thresholds as
references.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from ..calibration import calibrate_for_T, calibration_report
from ..convert import check_calibration_mode
from ..count_domain import check_count_domain
from ..distributed import broadcast_module, sync_thresholds
from .report import format_calibration_report, format_calibration_times
from .variants import (
    _energy_constants,
    _variant_seed,
    evaluate_net,
    sj_diagnostic,
    sj_rate_coding,
    snntorch_diagnostic,
)

__all__ = [
    "COUNTS",
    "NAMED_RECIPES",
    "recipe_argument",
    "check_recipes",
    "recipe_slug",
    "CalibrationComparison",
    "format_calibration_times",
    "format_calibration_report",
]

#: the TPP count rules every recipe is evaluated with
COUNTS = ("exact", "bernoulli", "unbiased")

#: recipes with a name (every other recipe is a RateCoding mode)
NAMED_RECIPES = {
    "ltb": "SpikingJelly 2.x's LocalThresholdBalancingRecipe",
    "tpp": "tpp_plugin's calibration for T (calibrate_for_T)",
}


def recipe_argument(text: str) -> str:
    """An argument of ``--calibration``: ``ltb``, ``tpp`` or a RateCoding mode (``max`` or a
    percentile like ``99.9%``).

    Example::

        >>> recipe_argument('LTB'), recipe_argument('99.9%'), recipe_argument('Max')
        ('ltb', '99.9%', 'max')
        >>> recipe_argument('qcfs')  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        argparse.ArgumentTypeError: unknown calibration recipe 'qcfs': use a RateCoding mode ...
    """
    if text.lower() in NAMED_RECIPES:
        return text.lower()
    try:
        return check_calibration_mode(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"unknown calibration recipe {text!r}: use a RateCoding mode (max or a percentile "
            "like 99.9%), ltb or tpp"
        ) from None


def check_recipes(recipes, framework: str, anns) -> None:
    """Checks of ``--calibration`` against the other arguments (a usage error before any work).

    :param recipes: the parsed recipes
    :param framework: ``'spikingjelly'`` or ``'snntorch'``
    :param anns: the ``--ann`` types
    :raises ValueError: a recipe given twice; ``ltb`` with snnTorch or on SpikingJelly
        0.0.0.0.14 (no LTB recipe there); a QCFS ANN (its thresholds are its trained ``λ``)
    """
    seen = set()
    for recipe in recipes:
        if recipe in seen:
            raise ValueError(f"--calibration: {recipe!r} is given twice")
        seen.add(recipe)
    if "qcfs" in anns:
        raise ValueError(
            "--calibration compares threshold calibrations of ReLU ANNs; a QCFS ANN's thresholds "
            "are its trained λ: run --ann qcfs without --calibration"
        )
    if "ltb" not in seen:
        return
    if framework == "snntorch":
        raise ValueError(
            "--calibration ltb: LocalThresholdBalancingRecipe is SpikingJelly 2.x's; the "
            "snnTorch converter has no LTB (use --framework spikingjelly, or drop ltb)"
        )
    from spikingjelly.activation_based import ann2snn

    if not hasattr(ann2snn, "LocalThresholdBalancingRecipe"):
        raise ValueError(
            "--calibration ltb needs SpikingJelly 2.x's LocalThresholdBalancingRecipe; the "
            "installed SpikingJelly (the 0.0.0.0.14 line) has none. RateCoding modes and tpp "
            "work on it"
        )


def recipe_slug(recipe: str) -> str:
    """The recipe as it appears in file names: ``p99.9`` for ``99.9%``, else unchanged."""
    return "p" + recipe[:-1] if recipe.endswith("%") else recipe


def _row_key(recipe: str, neuron: str) -> str:
    return f"{recipe}/{neuron}"


# ------------------------------------------------------------------------------------------------
# frameworks: the recipes' networks and how they run
# ------------------------------------------------------------------------------------------------
class _SpikingJellyRecipes:
    """The recipes through SpikingJelly (2.x and 0.0.0.0.14)."""

    full_simulation = "multi-step"

    @staticmethod
    def if_label(recipe: str) -> str:
        return "its half-threshold IF (SJ)" if recipe == "ltb" else "IF (SJ, v starts at 0)"

    def __init__(self, ann, calibration, device):
        from ..adapters import spikingjelly as sj

        self.sj, self.ann, self.calibration, self.device = sj, ann, calibration, device
        self.diagnostic = sj_diagnostic()

    def rate_coding(self, mode: str):
        """``(IF network, description)``: the network SpikingJelly builds for ``mode``."""
        net, description = sj_rate_coding(self.ann, self.calibration, mode, self.device)
        return net.to(self.device).eval(), description

    def ltb(self):
        """``(IF network, description)``: SpikingJelly 2.x's LTB network (half-threshold IF)."""
        from spikingjelly.activation_based import ann2snn

        recipe = ann2snn.LocalThresholdBalancingRecipe(self.calibration)
        net = ann2snn.Converter(recipe, device=self.device).convert(copy.deepcopy(self.ann))
        return net.to(self.device).eval(), "spikingjelly LocalThresholdBalancingRecipe()"

    def thresholds(self, net) -> list:
        return self.sj.calibrated_thresholds(net)

    def tpp_networks(self, recipe: str, if_net, Ts) -> dict:
        """``{count: {T: network}}``: ``if_net`` with TPP neurons (one network for every ``T``)."""
        nets = {}
        for count in COUNTS:
            net = self.sj.swap_neurons(copy.deepcopy(if_net), "tpp", count=count, seed=0)
            nets[count] = dict.fromkeys(Ts, net)
        return nets

    def calibrate(self, T: int, count: str):
        """``(TPP network, CalibrationResult, description)`` calibrated for ``T`` and the
        neurons' ``count`` rule."""
        snn, result = self.sj.convert_calibrated(
            self.ann, self.calibration, T, neuron_kwargs={"count": count, "seed": 0},
            return_result=True, max_samples=None)
        how = ("tpp_plugin convert_calibrated(T)" if self.sj.IS_LEGACY
               else "tpp_plugin ann2snn.TPPCalibrationRecipe(T)")
        return snn.to(self.device).eval(), result, how

    def evaluate(self, net, T, x, y, batch_size, energy, seed, count):
        from spikingjelly.activation_based import functional

        if not count:
            functional.set_step_mode(net, "m")
        return evaluate_net(net, T, x, y, batch_size, self.diagnostic, energy, seed=seed,
                            count=count, reset=functional.reset_net)


class _SnnTorchRecipes:
    """The recipes through the plugin's snnTorch converter (sequence mode)."""

    full_simulation = "sequence"

    @staticmethod
    def if_label(recipe: str) -> str:
        return "IF (plugin's, v starts at θ/2)"

    def __init__(self, ann, calibration, device):
        from ..adapters import snntorch as st

        self.st, self.ann, self.calibration, self.device = st, ann, calibration, device
        self.diagnostic = snntorch_diagnostic()

    def rate_coding(self, mode: str, T: int = 1):
        net = self.st.convert(self.ann, self.calibration, num_steps=T, mode=mode, neuron="if")
        return net, f"tpp_plugin snnTorch convert(mode={mode!r})"

    def thresholds(self, net) -> list:
        """The output step of each neuron, in call order: its threshold for a RateCoding mode."""
        return [torch.as_tensor(m.graded_spikes_factor).detach().clone()
                for m in net.modules() if isinstance(m, (self.st.IF, self.st.TPP))]

    def tpp_networks(self, recipe: str, if_net, Ts) -> dict:
        """``{count: {T: network}}``: the converter's TPP networks for ``recipe``'s mode (a TPP
        network is built for its window)."""
        return {count: {T: self._tpp(recipe, count, T) for T in Ts} for count in COUNTS}

    def calibrate(self, T: int, count: str):
        """``(TPP network, CalibrationResult, description)`` calibrated for ``T`` and ``count``:
        ``convert(mode='tpp')`` in two steps, so the result is kept for the report."""
        result = calibrate_for_T(self.ann, self.calibration, T, fuse=False, max_samples=None,
                                 count=count)
        return self._tpp(result, count, T), result, "tpp_plugin snnTorch convert(mode='tpp')"

    def _tpp(self, mode, count: str, T: int):
        return self.st.convert(self.ann, self.calibration, num_steps=T, mode=mode, neuron="tpp",
                               count=count, seed=0)

    def evaluate(self, net, T, x, y, batch_size, energy, seed, count):
        return evaluate_net(net, T, x, y, batch_size, self.diagnostic, energy, seed=seed,
                            count=count, reset=self.st.reset)


# ------------------------------------------------------------------------------------------------
# the comparison: a 'framework' of reproduce.run_config
# ------------------------------------------------------------------------------------------------
class CalibrationComparison:
    """The recipes of ``args.calibration`` on one ReLU ANN, as
    :func:`tpp_plugin.experiments.reproduce.run_config` runs a framework's variants:
    ``variants`` (row key → ``(label, stochastic)``), ``nets`` and :meth:`evaluate`;
    :meth:`record` is the JSON part of the calibrations.

    Every conversion happens here, timed: one per RateCoding mode and for LTB, one per ``T`` for
    ``tpp``.

    :param args: the parsed command line (``calibration``, ``T``, ``framework``,
        ``batch_size``, energy constants)
    :param ann: the trained ReLU ANN, in eval mode
    :param calibration: the calibration batches ``[(x, y), ...]`` every recipe uses
    :param device: the device of the ANN
    :param echo: print function (progress: each calibration and its time)
    """

    name = "calibration"

    def __init__(self, args, ann, calibration, device, echo=print):
        self.Ts = list(args.T)
        self.energy = _energy_constants(args)
        self.count_batch_size = args.batch_size
        self.images = sum(len(y) for _, y in calibration)
        kind = _SnnTorchRecipes if args.framework == "snntorch" else _SpikingJellyRecipes
        self.backend = kind(ann, calibration, device)
        self.variants, self.nets, self.evaluation = {}, {}, {}
        self.recipes, self.threshold_gap = {}, 0.0
        references, results = {}, {}

        def shared(net):  # under torchrun: every rank uses rank 0's network
            self.threshold_gap = max(self.threshold_gap, sync_thresholds(net))
            return broadcast_module(net)

        for recipe in args.calibration:
            if recipe == "tpp":  # one calibration per T and count rule (it calibrates for both)
                by_count, how = {count: [] for count in COUNTS}, None
                for T in self.Ts:
                    for count in COUNTS:
                        start = time.perf_counter()
                        net, result, how = self.backend.calibrate(T, count)
                        by_count[count].append(time.perf_counter() - start)
                        echo(f"calibration tpp for T={T}, count={count}: "
                             f"{by_count[count][-1]:.2f} s")
                        if count == "exact":
                            results[T] = result
                        self._add(recipe, f"tpp_{count}", {T: shared(net)})
                self.recipes[recipe] = {"conversion": how, "seconds": by_count["exact"],
                                        "seconds_by_count": by_count, "per_T": True}
                continue
            start = time.perf_counter()
            if_net, how = self.backend.ltb() if recipe == "ltb" else \
                self.backend.rate_coding(recipe)
            seconds = time.perf_counter() - start
            echo(f"calibration {recipe}: {seconds:.2f} s")
            self.recipes[recipe] = {"conversion": how, "seconds": seconds, "per_T": False}
            self._add(recipe, "if", dict.fromkeys(self.Ts, shared(if_net)))
            references[recipe] = self.backend.thresholds(if_net)
            for count, by_T in self.backend.tpp_networks(recipe, if_net, self.Ts).items():
                self._add(recipe, f"tpp_{count}", {T: shared(net) for T, net in by_T.items()})
        self.conversion = "calibration recipes: " + ", ".join(
            f"{r} ({self.recipes[r]['conversion']})" for r in args.calibration)
        if results:
            self.recipes["tpp"]["reports"] = [self._report(results[T], references)
                                              for T in self.Ts]

    def _add(self, recipe: str, neuron: str, nets: dict) -> None:
        key = _row_key(recipe, neuron)
        if key not in self.nets:
            self.nets[key] = {}
        self.nets[key].update(nets)
        if key in self.variants:
            return
        evaluation = self.backend.full_simulation
        if neuron != "if":
            try:
                check_count_domain(next(iter(nets.values())))
                evaluation = "count mode"
            except ValueError:
                pass  # count mode refuses this network: the full simulation it is
        self.evaluation[key] = evaluation
        count = None if neuron == "if" else neuron[len("tpp_"):]
        stochastic = count is not None and (count != "exact" or evaluation != "count mode")
        self.variants[key] = (f"{_recipe_label(recipe)} + " + (
            self.backend.if_label(recipe) if count is None else f"TPP {count}"), stochastic)

    def _report(self, result, references: dict) -> dict:
        refs = {label: values for label, values in references.items()
                if len(values) == len(result.thresholds)}
        return calibration_report(result, refs)

    def evaluate(self, key, T, seed, x, y, batch_size):
        count = self.evaluation[key] == "count mode"
        return self.backend.evaluate(self.nets[key][T], T, x, y,
                                     self.count_batch_size if count else batch_size, self.energy,
                                     _variant_seed(seed, T), count)

    def row_details(self, key: str) -> dict:
        """JSON fields of one row: its recipe, neuron, count rule and how it ran."""
        recipe, neuron = key.split("/")
        return {"recipe": recipe, "neuron": "if" if neuron == "if" else "tpp",
                "count": None if neuron == "if" else neuron[len("tpp_"):],
                "evaluation": self.evaluation[key]}

    def record(self) -> dict:
        """``{'images', 'recipes': {recipe: {'conversion', 'seconds', 'per_T', ['reports']}}}``:
        ``seconds`` a number, or one per ``T`` for ``tpp`` (``per_T``; the exact-count
        calibration's, ``seconds_by_count`` has every count rule's), whose ``reports`` hold the
        per-layer report of each ``T`` (exact-count calibration)."""
        return {"images": self.images, "recipes": self.recipes}


def _recipe_label(recipe: str) -> str:
    if recipe == "ltb":
        return "LTB"
    if recipe == "tpp":
        return "TPP calibration for T"
    return f"RateCoding {recipe}"
