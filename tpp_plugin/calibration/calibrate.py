"""The calibration for ``T``: :func:`calibrate_for_T` and its phases — the traced model, the
calibration inputs, the layer-by-layer pass (:class:`_LayerByLayer`: per ReLU call the bias
correction, the threshold search and the diagnostics; per conv/linear layer the refit), the
optional global refinement, the output's bias correction and the fine-tuning."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import time
from collections.abc import Iterable

import torch
from torch import fx, nn

from .. import functional as F
from ..convert import batch_inputs, set_submodule
from ..distributed import sharing_group
from .checks import CheckedBatches, ann_fingerprint, check_ann, check_batches_argument
from .finetune import finetune
from .graph import activation_nodes, bias_target, foldable_producer, fuse_conv_bn, trace
from .options import CalibrationOptions, options_from
from .passes import kl, lockstep, run_batched
from .quantiser import install_probes, normalise_channel_dim
from .refit import fit_weights
from .report import layer_stats
from .result import CalibrationResult
from .search import (
    binned_search,
    channels_first,
    exact_search,
    output_gradients,
    subsample_samples,
)
from .stream import ChunkStore, streamed_inputs, streamed_lockstep

__all__ = ["calibrate_for_T"]


@torch.no_grad()
def calibrate_for_T(ann: nn.Module, batches: Iterable, T: int,
                    options: CalibrationOptions | None = None,
                    **overrides) -> CalibrationResult:
    r"""Choose the threshold of every ReLU call of ``ann`` for ``T`` time steps of exact-count
    TPP neurons (post-training quantisation of the activations, layer by layer).

    Layers are calibrated in graph order, each with all earlier layers already quantised (and
    bias-corrected), so a layer sees the inputs the converted network will give it:

    * ``bias_correction='mean'`` (default): the layer's pre-activation is shifted per channel so
      that its mean over the calibration data equals the ANN's, as post-training quantisation
      does (folded into the bias of the conv/linear/BN layer producing it, also through a
      residual ``add``; where no such layer feeds the ReLU alone, no shift). ``'search'``
      instead searches a rounding offset of ``u·θ/T`` (``|u| ≤ ½``) per channel jointly with
      the threshold; ``False`` shifts nothing;
    * thresholds: ``grid`` candidate fractions ``k/grid`` of each channel's
      (``granularity='channel'``) or the layer's (``'layer'``) calibration maximum are
      evaluated at once, on binned statistics of the activations; the one with the smallest
      squared error between the quantised activation and the ANN's wins — unweighted
      (``objective='activation'``, default) or weighted by the squared gradient of the ANN's
      loss with respect to each activation (``'fisher'``);
    * ``reconstruct=True`` (default): before that, each conv/linear layer whose input is
      already quantised gets new weights and bias — the least-squares map from its quantised
      input to the ANN's output of the layer, with the ridge penalty
      ``ridge · mean(diag(AᵀA)) · ‖W − W_ANN‖²`` (``A`` the layer's input patches; a layer
      feeding a residual ``add`` is fitted to the ANN's sum minus the quantised shortcut),
      fitted on at most ``max_rows`` output positions (whole samples; where the output feeds a
      ReLU, the error where the ANN's ReLU input and the fit are both ``≤ 0`` is ignored,
      ``relu_steps`` re-solves). Grouped or string-padded
      convolutions, and layers with more than ``max_features`` inputs per output (e.g. a
      classifier on a large flattened feature map: its system would cost ``O(D³)``), keep
      their weights;
    * ``finetune_epochs=N`` (opt-in): after the pass, the whole quantised network — layers,
      thresholds and output steps — is trained against the ANN's outputs on every calibration
      sample (not only ``max_samples``) for ``N`` epochs, keeping the epoch with the smallest
      divergence on a held-out share ``finetune_holdout`` (:func:`tpp_plugin.finetune.finetune`;
      costs ``N`` forward and backward passes over the samples);
    * ``refine='global'``: after the pass, one sweep over the layers scales each layer's
      thresholds by the factor from ``refine_grid`` that gives the smallest KL divergence of the
      fully quantised network's output from the ANN's on the calibration data; ``'local'``
      does it inside the pass, with the later layers still float. Off by default (it costs
      ``len(refine_grid)`` passes per layer and measured no gain).

    Deterministic for fixed batches and ``seed``.

    :param ann: a ReLU network (``nn.ReLU`` modules; traceable with ``torch.fx``). Not modified
    :param batches: an iterable of input batches ``[N, *]`` or ``(inputs, labels)`` tuples (e.g.
        a ``DataLoader``), every batch of one shape. With ``stream=True`` (default) the
        calibration holds them, and both networks' values of each layer, in chunks of at most
        ``batch_size`` samples — in memory up to ``cache_bytes``, in a temporary file beyond —
        so its memory is bounded by the batch, not the number of samples; a loader holding
        more than ``max_samples`` samples is read twice (to count them, then to take the
        chosen ones), and fine-tuning reads it again every epoch
    :param T: the number of time steps (levels) to calibrate for, ``>= 1``
    :param options: a :class:`~tpp_plugin.calibration.CalibrationOptions` holding the options
        below (default: their defaults); keyword arguments given as well override its fields
    :param granularity: ``'channel'`` (one threshold per channel along ``channel_dim``) or
        ``'layer'`` (one per ReLU call)
    :param objective: ``'activation'`` (default) or ``'fisher'``
    :param bias_correction: ``'mean'`` (default), ``'search'`` or ``False`` (above)
    :param refine: ``False`` (default), ``'global'`` (or ``True``) or ``'local'`` (above)
    :param channel_dim: the channel dimension of the activations (``1`` for ``[N, C, ...]``)
    :param fuse: fold each batch norm into the convolution before it first (as SpikingJelly's
        converters do); the bias shifts then belong to the convolutions
    :param grid: the number of candidate thresholds per channel
    :param refine_grid: the scale factors tried with ``refine=True``
    :param max_samples: use at most this many calibration samples (chosen with ``seed``);
        ``None`` for all
    :param max_values: score the candidates of a channel on about this many of its
        activations (those of a random subset of the samples, chosen with ``seed``); ``None``
        for all
    :param search: ``'binned'`` (default; ``bins`` bins per channel) or ``'exact'`` (every
        activation, no offset search)
    :param reference: what the quantised activation is compared with: ``'ann'`` (the ANN's
        activation, default: the layer compensates earlier layers' errors) or ``'input'`` (the
        ReLU of the layer's own, already perturbed, input)
    :param coherence: extra weight of each channel's summed (mean) error in the objective
    :param count: the TPP counting rule to calibrate for: ``'exact'`` (default; the quantiser),
        ``'bernoulli'`` or ``'unbiased'`` (each neuron fires ``floor(w)`` or ``ceil(w)`` times,
        with the mean :func:`~tpp_plugin.functional.expected_count` of the rule: the expected
        squared error is minimised, and the earlier layers pass their mean output on)
    :param output_scale: also choose each channel's output step (the scale ``s`` of the scaler
        after the neuron, so a neuron firing ``n`` times passes on ``s·n/T``) in closed form for
        the chosen levels, instead of ``s = θ`` (exact counts, histogram search)
    :param output_correction: with bias correction, also shift the bias of the last layer so
        the mean output (per class) matches the ANN's
    :param bins: histogram bins per channel for ``search='binned'``; default 512, fewer
        (down to 64) where a channel has under 8 values per bin
    :param offset_steps: offsets tried by ``bias_correction='search'``
    :param batch_size: samples per forward pass
    :param seed: seed of the sample choices
    :param reconstruct: refit the weights of each conv/linear layer fed by quantised activations
        (above)
    :param ridge: the ridge penalty of ``reconstruct``, relative to the mean diagonal of the
        layer input's Gram matrix (``> 0``)
    :param max_rows: the most output positions per layer the refit uses
    :param max_features: refit only layers with at most this many inputs per output
        (``in_features``, or ``in_channels·kernel size``); ``None`` for all
    :param relu_steps: for a refitted layer that feeds a ReLU call, re-solve the fit this many
        times ignoring the error where the ANN's ReLU input and the fit are both ``≤ 0`` (the
        ReLU zeroes both). Default ``0``: plain least squares (``8`` measured +0.6 points on
        vgg at T ≤ 4 and up to +0.8 on mlp8, at 2.4× the calibration time on mlp8)
    :param finetune_epochs: epochs of gradient fine-tuning after the calibration (``0``, the
        default: none) on every sample of ``loader`` (:mod:`tpp_plugin.finetune`; a loader is
        read batch by batch every epoch, a list of tensors is fine-tuned on as one). Pass the
        training loader: on Fashion-MNIST, 4 epochs on the whole training set gained 4.2–9.8
        points at T=1, 1.2–6.0 at T=2 and 0.1–2.6 at T=4 on four models, where 2 048 images
        gained at most +0.7 on the convolutional ones; it takes minutes per model on a CPU
        (docs/calibration.md, step 4)
    :param finetune_lr: Adam's learning rate (cosine-annealed to 0)
    :param finetune_drop: the probability that an activation keeps its unrounded value in a
        training step (QDrop), in ``[0, 1)``; default ``0``: off
    :param finetune_holdout: the share of the calibration samples held out to choose the epoch,
        in ``[0, 1)`` (``0``: keep the last)
    :param stream: ``True`` (default): the streamed pass (:mod:`~tpp_plugin.calibration.stream`,
        memory bounded by the batch; the same result up to the summation order of the means);
        ``False``: every sample and both networks' values of a layer in memory at once (faster
        where they fit). ``objective='fisher'`` and ``refine`` always take the in-memory pass
    :param cache_bytes: the streamed pass keeps at most this many bytes of chunks in memory
        (default 256 MiB), the rest in a temporary file that is deleted at the end; ``None``:
        no cap. One batch's value of one layer must fit
    :param distributed: ``True`` (default): under ``torchrun`` (a default process group of
        ``torch.distributed``) the ranks share the work — the streamed pass runs each chunk of
        ``batch_size`` samples on one rank (chunk ``k`` on rank ``k mod W``) with the statistics
        all-reduced, and fine-tuning trains with ``DistributedDataParallel``
        (:func:`~tpp_plugin.calibration.finetune.finetune`); every rank must pass the same
        ``batches`` and gets the same result, that of one process up to float summation order
        (docs/distributed.md). The in-memory pass (``stream=False``, ``objective='fisher'``,
        ``refine``) runs whole on every rank. ``False``: every process calibrates on its own.
        Without a process group one process does everything either way; a ``torchrun``
        launch of several processes without one is an error
    :return: a :class:`CalibrationResult`
    :raises ValueError: for ``T < 1``, an empty loader, batches of different shapes, a
        ``cache_bytes`` too small for one batch, a model without ``nn.ReLU``, a
        ``channel_dim`` out of range, non-finite activations, an unknown option, or (across
        processes) batches that differ between the ranks
    :raises RuntimeError: under ``torchrun`` with several processes, ``distributed=True`` and no
        process group

    Example::

        >>> from tpp_plugin.calibration import calibration_report, format_report
        >>> ann = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.ReLU(),
        ...                     nn.Flatten(), nn.Linear(6 * 4 * 4, 3)).eval()
        >>> result = calibrate_for_T(ann, [torch.rand(16, 1, 8, 8)], T=4)
        >>> [tuple(t.shape) for t in result.thresholds]      # per channel
        [(4,), (6,)]
        >>> table = format_report(calibration_report(result))   # print(table) shows it
    """
    start = time.perf_counter()
    T = F.check_window(T)
    options = options_from(options, overrides)
    check_ann(ann, trains=options.finetune_epochs > 0)
    check_batches_argument(batches)
    group = sharing_group(options.distributed)
    gm, names = _traced_model(ann, options.fuse)
    fingerprint = ann_fingerprint(gm)  # recorded: fine-tuning checks the result is this ANN's
    device, dtype = _device_and_dtype(gm)
    batches = CheckedBatches(batches, gm, dtype)
    if _streams(options):
        result, x_all = _calibrate_streamed(gm, names, batches, T, options, device, dtype, start,
                                            group)
    else:
        result, x_all = _calibrate_in_memory(gm, names, batches, T, options, device, dtype,
                                             start)
    result.settings["ann"] = fingerprint
    if options.finetune_epochs:
        result = finetune(ann, result, x_all, options.finetune_epochs, options.finetune_lr,
                          options.finetune_drop, options.finetune_holdout, seed=options.seed,
                          distributed=options.distributed)
        result.seconds = time.perf_counter() - start
    return result


def _signature() -> inspect.Signature:
    """:func:`calibrate_for_T`'s signature as ``help`` and the converters see it: its own
    parameters, then every field of :class:`CalibrationOptions` as a keyword argument."""
    own = list(inspect.signature(calibrate_for_T).parameters.values())[:4]
    fields = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                                annotation=f.type)
              for f in dataclasses.fields(CalibrationOptions)]
    return inspect.Signature(own + fields, return_annotation="CalibrationResult")


calibrate_for_T.__signature__ = _signature()


# ------------------------------------------------------------------------------------------------
# the phases
# ------------------------------------------------------------------------------------------------
def _streams(options: CalibrationOptions) -> bool:
    """Whether the calibration takes the streamed path (:mod:`.stream`): ``stream=True`` and
    neither ``objective='fisher'`` nor ``refine``, which hold every sample in memory."""
    return bool(options.stream) and options.objective != "fisher" and not options.refine


def _calibrate_in_memory(gm, names, batches, T, options, device, dtype, start) -> tuple:
    """The calibration with every sample (and both networks' values of each node) in memory:
    one :func:`~.passes.lockstep` pass over all of them.

    :return: ``(result, x_all)``: the result and, for fine-tuning, every input
    """
    x_all = _calibration_inputs(batches, device, dtype)
    x = _subsample(x_all, options.max_samples, options.seed)
    if not options.finetune_epochs:
        x_all = None  # only fine-tuning uses every sample: do not hold them all meanwhile
    calibration = _LayerByLayer(gm, x, T, options, device, dtype)
    ann_out, q_out = calibration.run()
    if options.refine in (True, "global"):
        q_out = calibration.refine_globally(ann_out)
    output_target, output_shift = _output_correction(gm, ann_out, q_out, options)
    return calibration.result(names, output_target, output_shift, start), x_all


def _calibrate_streamed(gm, names, batches, T, options, device, dtype, start,
                        group=None) -> tuple:
    """The calibration in memory bounded by the batch (:mod:`.stream`): the values between the
    nodes in chunks of at most ``batch_size`` samples, held in memory up to ``cache_bytes``
    and in a temporary file beyond; the result is :func:`_calibrate_in_memory`'s up to the
    summation order of the means. With a process group ``group``, the chunks alternate between
    its ranks (:class:`~.stream.ChunkLayout`).

    :return: ``(result, x_all)``: the result and, for fine-tuning, every input
    """
    store = ChunkStore(options.cache_bytes)
    try:
        inputs, layout = streamed_inputs(batches, device, dtype, options.max_samples,
                                         options.seed, options.batch_size, store, group)
        calibration = _LayerByLayer(gm, None, T, options, device, dtype)
        calibration.run_streamed(inputs, layout)
        inputs.free()
    finally:
        store.close()
    diff = calibration.output_difference()
    output_target, output_shift = None, None
    if diff is not None:
        output_target, output_shift = _output_correction(gm, None, None, options, diff)
    result = calibration.result(names, output_target, output_shift, start)
    result.settings["cache"] = {"cache_bytes": options.cache_bytes, "peak_bytes": store.peak,
                                "spilled_bytes": store.spilled}
    # fine-tuning reads a loader batch by batch (memory flat in its size); a list of tensors
    # is already in memory, and is fine-tuned on as one tensor, as by the in-memory path
    x_all = None
    if options.finetune_epochs:
        raw = batches.batches if isinstance(batches, CheckedBatches) else batches
        x_all = (_calibration_inputs(batches, device, dtype)
                 if isinstance(raw, (list, tuple)) else raw)  # a loader is fine-tuned as read
    return result, x_all


def _traced_model(ann: nn.Module, fuse: bool) -> tuple:
    """A traced copy of ``ann`` in eval mode (conv-BN pairs fused if ``fuse``) and the names of
    its ReLU calls; a ``ValueError`` if it has none."""
    gm = trace(copy.deepcopy(ann)).eval()
    if fuse:
        gm = fuse_conv_bn(gm)
    nodes = activation_nodes(gm)
    if not nodes:
        raise ValueError("the model has no nn.ReLU activation to calibrate (only nn.ReLU modules "
                         "are converted to spiking neurons)")
    return gm, [n.name for n in nodes]


def _device_and_dtype(gm: nn.Module) -> tuple:
    """The device and floating-point dtype of the model's parameters (CPU, float32 without)."""
    param = next(gm.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    return device, dtype


def _calibration_inputs(batches: Iterable, device, dtype) -> torch.Tensor:
    """Every input of ``batches``, concatenated on ``device`` in ``dtype``; a ``ValueError``
    for no batch, no sample or a non-finite input."""
    xs = [batch_inputs(b) for b in batches]
    if not xs:
        raise ValueError("the calibration loader yielded no batch: pass at least one batch of "
                         "inputs (e.g. a DataLoader over some training images)")
    x = torch.cat([t.to(device=device, dtype=dtype) for t in xs])
    if x.shape[0] == 0:
        raise ValueError("the calibration batches hold no samples")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("the calibration inputs contain NaN or infinite values")
    return x


def _subsample(x: torch.Tensor, max_samples: int | None, seed: int) -> torch.Tensor:
    """At most ``max_samples`` samples of ``x``, chosen with ``seed``, in their order."""
    if max_samples is not None and x.shape[0] > max_samples:
        gen = torch.Generator().manual_seed(seed)
        idx = torch.randperm(x.shape[0], generator=gen)[:max_samples].sort().values
        x = x[idx.to(x.device)]
    return x


class _LayerByLayer:
    """The layer-by-layer pass of one calibration: a :class:`~.quantiser.Probe` in place of each
    ReLU call of ``gm``, then :meth:`run` chooses every call's threshold (and bias shift,
    output step) in graph order, refitting the conv/linear layers on the way, while
    :func:`~.passes.lockstep` runs the ANN and the network being quantised side by side."""

    def __init__(self, gm: fx.GraphModule, x: torch.Tensor | None, T: int,
                 options: CalibrationOptions, device, dtype):
        """``x``: the calibration samples, or ``None`` for :meth:`run_streamed` (which
        supports neither ``objective='fisher'`` nor ``refine``)."""
        self.gm, self.x, self.T, self.options = gm, x, T, options
        self.n_samples = 0 if x is None else int(x.shape[0])
        self.output_sums: list = [0.0, 0, None]  # Σ (ANN − quantised) per class, count, dim
        self.device, self.dtype = device, dtype
        self.targets = [bias_target(gm, n) if options.bias_correction else None
                        for n in activation_nodes(gm)]
        self.probes = install_probes(gm, T, options.channel_dim)
        for p in self.probes:
            p.count, p.fast = options.count, True
        self.weights = (output_gradients(gm, self.probes, x, options.batch_size)
                        if options.objective == "fisher" else None)
        self.log_p_ref = (torch.log_softmax(self._quantised_output(), 1)
                          if options.refine == "local" else None)
        self.fractions = torch.arange(1, options.grid + 1, dtype=torch.float32,
                                      device=device) / options.grid
        self.thresholds, self.shifts, self.layers, self.scales = [], [], [], []
        self.fitted_modules = {}

    def _quantised_output(self) -> torch.Tensor:
        """The output of the network being quantised on all calibration samples."""
        return run_batched(self.gm, self.x, self.options.batch_size)

    def run(self) -> tuple:
        """The pass: every threshold chosen, the refitted layers put in place.

        :return: ``(ann_output, quantised_output)``
        """
        refit = self.refit if self.options.reconstruct else None
        ann_out, q_out = lockstep(self.gm, self.x, self.visit, refit)
        for target, fitted in self.fitted_modules.items():
            set_submodule(self.gm, target, fitted)
        return ann_out, q_out

    def run_streamed(self, inputs, layout) -> None:
        """The pass over the chunks of a :class:`~.stream.Stream` of inputs, in memory bounded
        by the batch (:func:`~.stream.streamed_lockstep`): every threshold chosen, the refitted
        layers put in place, the output's mean difference from the ANN's kept for
        :meth:`output_difference`."""
        self.n_samples, self.layout = layout.total, layout
        streamed_lockstep(self.gm, inputs, layout, self, self.options.reconstruct)
        for target, fitted in self.fitted_modules.items():
            set_submodule(self.gm, target, fitted)

    def output(self, ann_out, q_out) -> None:
        """Accumulate one batch's output on both sides (the streamed pass)."""
        acc = self.output_sums
        if not isinstance(ann_out, torch.Tensor) or ann_out.dim() < 2:
            acc[2] = -1
            return
        diff = (ann_out - q_out).movedim(1, 0).reshape(ann_out.shape[1], -1)
        acc[0] = acc[0] + diff.sum(1, dtype=torch.float64)
        acc[1] += diff.shape[1]
        acc[2] = ann_out.dtype

    def output_difference(self):
        """The mean per class of the ANN's output minus the quantised network's over the
        streamed pass, or ``None`` if the output is not ``[N, classes, *]``."""
        total, count, dtype = self.output_sums
        if not count or dtype == -1:
            return None
        return (self.layout.reduce(total) / self.layout.reduce(count)).to(dtype)

    def visit(self, i: int, a: torch.Tensor, a_ann: torch.Tensor) -> None:
        """Calibrate ReLU call ``i`` from its input ``a`` (earlier layers quantised) and the
        ANN's ``a_ann``; leaves its threshold and shift on its probe."""
        o, probe = self.options, self.probes[i]
        dim = normalise_channel_dim(o.channel_dim, a, f"ReLU call {probe.name!r}")
        means = _channel_means(probe.name, a, a_ann, dim)
        w = self.weights[i] if self.weights is not None else None
        self.decide(i, dim, means, *subsample_samples([a, a_ann, w], dim, o.max_values,
                                                      o.seed + i))

    def decide(self, i: int, dim: int, means: list, a, a_ann, w) -> None:
        """Calibrate ReLU call ``i`` from the per-channel ``means`` of its input in the
        quantised network and in the ANN, and the samples the search reads: the input ``a``,
        the ANN's ``a_ann`` and the Fisher weights ``w`` (or ``None``) of those samples."""
        o, probe = self.options, self.probes[i]
        shift = None
        if self.targets[i] is not None and o.bias_correction == "mean":
            shift = means[1] - means[0]
        a_c, ann_c, w = (None if t is None else channels_first(t, dim) for t in (a, a_ann, w))
        if shift is not None:
            a_c = a_c + shift.unsqueeze(1)
        target = (ann_c if o.reference == "ann" else a_c).clamp(min=0)
        a_s, theta, shift, scale = self._search(i, a_c, target, w, shift)
        theta = theta.clamp(min=torch.finfo(torch.float32).tiny)
        probe.shift = None if shift is None else shift.to(self.dtype)
        if o.refine == "local":
            theta = self._refine_locally(probe, theta)
        probe.theta = theta.to(self.dtype)
        probe.scale = None if scale is None else scale.to(self.dtype)
        self._record(probe.name, a_s, target, theta, shift, scale)

    def _search(self, i, a_c, target, w, shift) -> tuple:
        """The threshold search of ReLU call ``i`` on its (shifted) pre-activations ``a_c``
        (``[C, M]``); with ``bias_correction='search'`` also its rounding offset.

        :return: ``(a_s, theta, shift, scale)``: the pre-activations with the searched shift
            added, the threshold, the bias shift and the output step (or ``None``)
        """
        o, T = self.options, self.T
        searched_offset = self.targets[i] is not None and o.bias_correction == "search"
        if o.search != "binned":
            theta = exact_search(a_c.float(), target.float(), None if w is None else w.float(),
                                 T, self.fractions, o.granularity).to(a_c.dtype)
            return a_c, theta, shift, None
        offsets = (torch.linspace(-0.5, 0.5, o.offset_steps, dtype=a_c.dtype) if searched_offset
                   else torch.zeros(1, dtype=a_c.dtype))
        theta, u, scale = binned_search(
            a_c, target, w, T, self.fractions.to(a_c.dtype), offsets.to(self.device),
            o.granularity, o.bins, o.coherence, o.count, o.output_scale)
        if searched_offset:
            shift = u * theta / T
            return a_c + shift.unsqueeze(1), theta, shift, scale
        return a_c, theta, shift, scale

    def _refine_locally(self, probe, theta: torch.Tensor) -> torch.Tensor:
        """``refine='local'``: ``theta`` scaled by the factor of ``refine_grid`` that gives the
        smallest KL divergence of the output (later layers still float) from the ANN's."""
        best, best_kl = 1.0, math.inf
        for factor in self.options.refine_grid:
            probe.theta = (theta * factor).to(self.dtype)
            divergence = kl(self.log_p_ref, self._quantised_output())
            if divergence < best_kl - 1e-12:
                best, best_kl = factor, divergence
        return theta * best

    def _record(self, name, a_s, target, theta, shift, scale) -> None:
        """Keep what was chosen for one ReLU call, and its diagnostics."""
        dtype = self.dtype
        self.scales.append(None if scale is None else scale.to(dtype).cpu())
        self.thresholds.append(theta.to(dtype).cpu())
        self.shifts.append(None if shift is None else shift.to(dtype).cpu())
        # about 2¹⁶ values per layer (and 64 per channel) are plenty for a report
        stats_cols = slice(0, None, max(1, min(a_s.shape[1] // 64, a_s.numel() >> 16)))
        self.layers.append(layer_stats(name, a_s[:, stats_cols], target[:, stats_cols],
                                       theta, self.T, scale))

    def refit(self, target, module, x_q, z_ann, partner=None, relu=False):
        """The layer the quantised side runs instead of ``module`` (:func:`~.refit.fit_weights`,
        see :func:`~.passes.lockstep`); kept to be put in place after the pass."""
        o = self.options
        fitted = fit_weights(module, x_q, z_ann, o.ridge, o.max_rows, o.seed, o.max_features,
                             partner, o.relu_steps if relu else 0)
        if fitted is not module:
            self.fitted_modules[target] = fitted
        return fitted

    def refine_globally(self, ann_out: torch.Tensor) -> torch.Tensor:
        """``refine='global'``: one sweep, every layer quantised, scaling each layer's thresholds
        by the factor of ``refine_grid`` with the smallest KL divergence from the ANN's output.

        :return: the quantised network's output after the sweep
        """
        log_p_ann = torch.log_softmax(ann_out, 1)
        for i, probe in enumerate(self.probes):
            base = probe.theta
            best, best_kl = 1.0, kl(log_p_ann, self._quantised_output())
            for factor in self.options.refine_grid:
                if factor == 1.0:
                    continue
                probe.theta = base * factor
                divergence = kl(log_p_ann, self._quantised_output())
                if divergence < best_kl - 1e-12:
                    best, best_kl = factor, divergence
            probe.theta = base * best
            self.thresholds[i] = probe.theta.cpu()
        return self._quantised_output()

    def result(self, names, output_target, output_shift, start: float) -> CalibrationResult:
        """The :class:`CalibrationResult` of the pass (``start``: when the calibration began);
        the probes are cleared."""
        for p in self.probes:
            p.theta = p.shift = None
        scales = self.scales
        return CalibrationResult(
            weights={t: (m.weight.detach().cpu().clone(), m.bias.detach().cpu().clone())
                     for t, m in self.fitted_modules.items()} or None,
            output_shift=output_shift, output_target=output_target,
            output_scales=scales if any(sc is not None for sc in scales) else None,
            T=self.T, names=names, thresholds=self.thresholds, bias_shifts=self.shifts,
            bias_targets=self.targets, channel_dim=self.options.channel_dim, layers=self.layers,
            seconds=time.perf_counter() - start,
            settings=self.options.recorded_settings(self.n_samples),
        )


def _channel_means(name: str, a: torch.Tensor, a_ann: torch.Tensor, dim: int) -> list:
    """The per-channel means of ReLU call ``name``'s input in the quantised network and in the
    ANN; a ``ValueError`` if either has non-finite values."""
    others = [d for d in range(a.dim()) if d != dim]
    means = []
    for where, value in (("", a), (" in the ANN", a_ann)):
        means.append(value.mean(others))  # non-finite if any value is (or on overflow)
        if (not bool(torch.isfinite(means[-1]).all())
                and not bool(torch.isfinite(value).all())):
            raise ValueError(
                f"ReLU call {name!r} has non-finite (NaN or infinite) activations"
                f"{where} on the calibration data; check the model's weights and the "
                "calibration inputs")
    return means


def _output_correction(gm: fx.GraphModule, ann_out, q_out, options: CalibrationOptions,
                       mean_difference=None) -> tuple:
    """With bias correction and ``output_correction``: the layer producing the output whose
    bias can carry a shift, and the shift (per class) that makes the quantised network's mean
    output the ANN's; else ``(None, None)``. ``mean_difference``: that shift already
    accumulated (the streamed pass; ``ann_out`` and ``q_out`` are then not read)."""
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    shaped = mean_difference is not None or (isinstance(ann_out, torch.Tensor)
                                             and ann_out.dim() >= 2)
    if not (options.bias_correction and options.output_correction and shaped
            and isinstance(out_node.args[0], fx.Node)):
        return None, None
    output_target = foldable_producer(gm, out_node.args[0])
    if output_target is None:
        return None, None
    if mean_difference is not None:
        return output_target, mean_difference.cpu()
    diff = (ann_out - q_out).movedim(1, 0).reshape(ann_out.shape[1], -1)
    return output_target, diff.mean(1).cpu()
