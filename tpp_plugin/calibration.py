r"""T-aware threshold calibration for ANN→SNN conversion with TPP neurons.

A network of exact-count TPP neurons (``count='exact'``) with thresholds θ computes exactly the
ANN with every ReLU output ``a`` replaced by

.. math::

    q_θ(a) = \frac{θ}{T}\,\mathrm{clamp}\left(\left\lfloor \frac{aT}{θ} + \tfrac12 \right\rfloor,
    0, T\right)

(``T`` levels of ``θ/T`` on ``[0, θ]``). Choosing θ for a target ``T`` is therefore post-training
quantisation of the activations, and one ANN pass with :math:`q_θ` in place of each ReLU
evaluates a candidate (:func:`quantised_ann`). Bernoulli TPP fires ``floor`` or ``ceil`` of
``a·T/θ`` — the same quantiser with noise — so thresholds calibrated for exact counts serve it too.

:func:`calibrate_for_T` chooses the thresholds layer by layer in graph order, with every earlier
layer already quantised, so a layer's thresholds (and bias shift) compensate for what the earlier
layers lost:

1. *weight reconstruction* (``reconstruct=True``): each conv/linear layer fed by quantised
   activations gets the weights and bias that map its quantised input to the ANN's output of
   that layer in least squares (ridge-regularised towards the ANN's weights): the layer absorbs
   what the quantisation before it lost, as far as a linear map can (a layer whose output is
   one term of a residual sum is fitted to the ANN's sum minus the other, already quantised,
   term, so it absorbs the shortcut's error too);
   *bias correction*: the pre-activation of the layer is shifted, per channel, so that its mean
   over the calibration data equals the ANN's (the shift is folded into the bias of the affine
   layer that produces it);
2. per channel (or per layer) a grid of candidate thresholds — fractions of the channel's
   calibration maximum — is evaluated at once on binned statistics, and the one with the
   smallest squared error against the ANN's activation is kept (``objective='fisher'`` weighs
   each activation's error by the squared gradient of the ANN's loss with respect to it);
3. optionally (``refine='global'``) each layer's thresholds are then scaled together by the
   factor, from a small grid, that minimises the KL divergence of the quantised network's output
   from the ANN's.

The ANN and the network being quantised run side by side, node by node, over all calibration
samples at once: one pass of each in all. ``count='bernoulli'`` calibrates for bernoulli TPP
(the expected squared error of its two-point count).

The result is framework-neutral: one threshold tensor per ReLU *call* (scalar or per channel),
per call a bias shift for the preceding conv/linear/batch-norm layer, and the refitted weights of
the conv/linear layers. The SpikingJelly
adapter turns it into a network (``ann2snn.TPPCalibrationRecipe``); :func:`calibration_report`
summarises it.
"""

from __future__ import annotations

import copy
import math
import operator
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from . import functional as F
from .convert import batch_inputs
from .convert import set_submodule as _set_submodule

__all__ = [
    "OBJECTIVES",
    "GRANULARITIES",
    "CalibrationResult",
    "activation_nodes",
    "quantise",
    "quantised_ann",
    "apply_bias_shifts",
    "fuse_conv_bn",
    "calibrate_for_T",
    "calibration_report",
    "format_report",
]

#: error measures :func:`calibrate_for_T` can minimise per channel
OBJECTIVES = ("activation", "fisher")
#: threshold granularities
GRANULARITIES = ("channel", "layer")

_AFFINE_WITH_BIAS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_ADDS = (operator.add, torch.add, "add")


# ------------------------------------------------------------------------------------------------
# the quantiser that exact-count TPP computes
# ------------------------------------------------------------------------------------------------
def _channel_view(values: torch.Tensor, x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """``values`` (a scalar or ``[C]``) shaped to broadcast along ``channel_dim`` of ``x``."""
    values = values.to(dtype=x.dtype, device=x.device)
    if values.dim() == 0:
        return values
    shape = [1] * x.dim()
    shape[channel_dim] = values.numel()
    return values.reshape(shape)


def _normalise_channel_dim(channel_dim: int, x: torch.Tensor, where: str) -> int:
    dim = channel_dim + x.dim() if channel_dim < 0 else channel_dim
    if not 0 <= dim < x.dim():
        raise ValueError(
            f"channel_dim={channel_dim} is out of range for the activations of {where}, which "
            f"have shape {tuple(x.shape)} (channel_dim must be in [{-x.dim()}, {x.dim() - 1}])"
        )
    return dim


def quantise(a: torch.Tensor, theta, T: int, channel_dim: int = 1, scale=None) -> torch.Tensor:
    r"""What an exact-count TPP neuron with threshold ``theta`` passes on for the potential ``a``
    (one ANN pass): ``s/T · clamp(floor(a·T/θ + ½), 0, T)``, the output scale ``s`` being
    ``θ`` unless given (the scaler after the neuron).

    :param a: pre-activation, shape ``[N, C, *]`` (or anything with ``channel_dim``)
    :param theta: a positive number, a 0-d tensor or a ``[C]`` tensor (per channel along
        ``channel_dim``)
    :param T: the number of time steps (levels)
    :param channel_dim: the channel dimension of ``a`` for a per-channel ``theta``
    :param scale: the output scale ``s`` (like ``theta``); default ``theta``
    :return: a tensor shaped like ``a``

    Example::

        >>> quantise(torch.tensor([[-1.0, 0.2, 0.3, 0.9, 5.0]]), 1.0, T=4)
        tensor([[0.0000, 0.2500, 0.2500, 1.0000, 1.0000]])
    """
    T = F.check_window(T)

    def view(t):
        t = torch.as_tensor(t)
        if t.dim() > 0:
            return _channel_view(t, a, _normalise_channel_dim(channel_dim, a, "quantise"))
        return t.to(dtype=a.dtype, device=a.device)

    theta = view(theta)
    scale = theta if scale is None else view(scale)
    return (a * T).div_(theta).add_(0.5).floor_().clamp_(0, T).mul_(scale).div_(T)




def _random_count_mean(w: torch.Tensor, T: int, count: str,
                       dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The mean spike count of a random-count TPP neuron at ``w = v/θ``: the bernoulli rule's
    :func:`~tpp_plugin.functional.expected_count` (tabulated, interpolated in ``dtype``), or
    ``clamp(w, 0, T)`` for ``'unbiased'`` (up to its uniforms' 2⁻¹⁶ grid)."""
    if count == "unbiased":
        return w.clamp(0, T)
    return F.expected_count_fast(w, T, dtype=dtype)


def _mean_quantise(a, theta, T, channel_dim, count, scale=None):
    """The mean of what a TPP neuron passes on: :func:`quantise` for ``'exact'``, the mean
    count of the random rules times ``s/T`` otherwise."""
    if count == "exact":
        return quantise(a, theta, T, channel_dim, scale)
    dim = _normalise_channel_dim(channel_dim, a, "quantise")
    theta = torch.as_tensor(theta)
    theta = _channel_view(theta, a, dim) if theta.dim() else theta.to(a)
    scale = theta if scale is None else torch.as_tensor(scale)
    scale = _channel_view(scale, a, dim) if scale.dim() else scale.to(a)
    return scale * _random_count_mean(a * T / theta, T, count) / T


class _Probe(nn.Module):
    """Stands in for one ReLU call during calibration: adds the bias shift, then applies ReLU
    (no threshold yet) or the T-level quantiser; can keep its output for gradients."""

    def __init__(self, index: int, name: str, T: int, channel_dim: int):
        super().__init__()
        self.index, self.name, self.T, self.channel_dim = index, name, T, channel_dim
        self.theta: torch.Tensor | None = None
        self.scale: torch.Tensor | None = None
        self.shift: torch.Tensor | None = None
        self.keep_output = False
        self.output: torch.Tensor | None = None
        self.count = "exact"
        self.fast = False  # calibration only: fewer passes, not bit-equal to ``quantise``
        self.overwrite = False  # calibration only: the input may be overwritten

    def _fast_quantise(self, x: torch.Tensor) -> torch.Tensor:
        """``_mean_quantise(x + shift, θ, T, scale)`` with few passes over ``x`` (the
        calibration's quantised side), up to rounding in the last bit."""
        view = lambda t: _channel_view(t, x, self.channel_dim)  # noqa: E731
        factor = view(self.T / self.theta)
        offset = 0.5 if self.count == "exact" else 0.0  # w + ½, floored, rounds
        if self.shift is not None:
            offset = view(self.shift * (self.T / self.theta) + offset)
        step = view((self.theta if self.scale is None else self.scale) / self.T)
        offset = torch.as_tensor(offset, dtype=x.dtype, device=x.device)
        w = x.mul_(factor).add_(offset) if self.overwrite else torch.addcmul(offset, x, factor)
        if self.count == "exact":
            level = w.floor_().clamp_(0, self.T)
        else:
            level = _random_count_mean(w, self.T, self.count, dtype=w.dtype)
        return level.mul_(step)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast and self.theta is not None:
            out = self._fast_quantise(x)
            if self.keep_output:
                self.output = out
            return out
        if self.shift is not None:
            x = x + _channel_view(self.shift, x, self.channel_dim)
        if self.theta is None:
            out = torch.relu(x)
        else:
            out = _mean_quantise(x, self.theta, self.T, self.channel_dim, self.count,
                                 self.scale)
        if self.keep_output:
            self.output = out
        return out


# ------------------------------------------------------------------------------------------------
# graph helpers
# ------------------------------------------------------------------------------------------------
def _trace(model: nn.Module) -> fx.GraphModule:
    if isinstance(model, fx.GraphModule):
        return model
    try:
        return fx.symbolic_trace(model)
    except Exception as err:  # torch.fx raises many types
        raise TypeError(
            f"the model cannot be traced with torch.fx ({type(err).__name__}: {err}); "
            "calibration needs a traceable model, as SpikingJelly's converter does"
        ) from err


def activation_nodes(gm: fx.GraphModule) -> list:
    """The ReLU *calls* of a traced model, in graph order: ``call_module`` nodes whose module is
    an ``nn.ReLU`` (a module called twice gives two nodes), as SpikingJelly's converters match.

    :param gm: an ``fx.GraphModule``
    :return: a list of ``fx.Node``
    """
    modules = dict(gm.named_modules())
    return [n for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(modules.get(n.target), nn.ReLU)]


def _bias_target(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The module whose bias can carry a shift of the ReLU call ``node``'s input: the conv,
    linear or (affine) batch norm producing it, also through an ``add`` (a residual sum), used
    by nothing else. ``None`` if there is none."""
    return _foldable_producer(gm, node.args[0] if node.args else None)


def _foldable_producer(gm: fx.GraphModule, src) -> str | None:
    """The module behind graph value ``src`` whose bias can shift it (see :func:`_bias_target`)."""
    modules = dict(gm.named_modules())
    for _ in range(8):
        if not isinstance(src, fx.Node) or len(src.users) != 1:
            return None
        if src.op == "call_module":
            module = modules.get(src.target)
            if isinstance(module, _AFFINE_WITH_BIAS) or (
                    isinstance(module, _BATCH_NORMS) and module.affine):
                return src.target
            return None
        if src.op in ("call_function", "call_method") and src.target in _ADDS:
            candidates = [a for a in src.args if isinstance(a, fx.Node)]
            src = next((a for a in candidates if a.op == "call_module"
                        and _bias_target_module(modules.get(a.target)) and len(a.users) == 1),
                       None)
            continue
        return None
    return None


def _bias_target_module(module) -> bool:
    return isinstance(module, _AFFINE_WITH_BIAS) or (
        isinstance(module, _BATCH_NORMS) and module.affine)


def fuse_conv_bn(gm: fx.GraphModule) -> fx.GraphModule:
    """Fold every batch norm that directly follows a convolution (used only by it) into the
    convolution, as SpikingJelly's converters do with ``fuse_flag=True`` (in place; eval mode).

    :param gm: a traced model (``fx.GraphModule``)
    :return: ``gm``
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    pairs = ((nn.Conv1d, nn.BatchNorm1d), (nn.Conv2d, nn.BatchNorm2d), (nn.Conv3d, nn.BatchNorm3d))
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not node.args:
            continue
        src = node.args[0]
        if not isinstance(src, fx.Node) or src.op != "call_module" or len(src.users) != 1:
            continue
        conv, bn = modules.get(src.target), modules.get(node.target)
        if not any(isinstance(conv, c) and isinstance(bn, b) for c, b in pairs):
            continue
        _set_submodule(gm, src.target, fuse_conv_bn_eval(conv.eval(), bn.eval()))
        modules = dict(gm.named_modules())
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def _bias_shift_targets(result: CalibrationResult) -> list:
    """``(module name, shift)`` for every bias shift of ``result`` (the ReLU calls' and the
    output's), in the order :func:`apply_bias_shifts` adds them."""
    pairs = [*zip(result.bias_targets, result.bias_shifts),
             (result.output_target, result.output_shift)]
    return [(name, shift) for name, shift in pairs if name is not None and shift is not None]


def apply_bias_shifts(model: nn.Module, result: CalibrationResult) -> nn.Module:
    """Put the refitted weights of a calibration into the layers they belong to, then add its
    bias shifts (in place).

    A conv or linear layer without a bias gets one. ``model`` must have the module names of the
    model that was calibrated (e.g. that model itself, or the graph a converter traced from it).

    :param model: the calibrated model (or a copy with the same module names)
    :param result: what :func:`calibrate_for_T` returned
    :return: ``model``
    """
    for name, (weight, bias) in (result.weights or {}).items():
        module = model.get_submodule(name)
        module.weight.data = weight.to(module.weight).clone()
        if module.bias is None:
            module.bias = nn.Parameter(bias.to(module.weight).clone())
        else:
            module.bias.data = bias.to(module.bias).clone()
    for name, shift in _bias_shift_targets(result):
        module = model.get_submodule(name)
        if isinstance(module, _BATCH_NORMS):
            module.bias.data += shift.to(module.bias)
            continue
        if module.bias is None:
            module.bias = nn.Parameter(torch.zeros(
                module.out_features if isinstance(module, nn.Linear) else module.out_channels,
                dtype=module.weight.dtype, device=module.weight.device))
        module.bias.data += shift.to(module.bias)
    return model


# ------------------------------------------------------------------------------------------------
# result and the quantised ANN
# ------------------------------------------------------------------------------------------------
@dataclass
class CalibrationResult:
    """Thresholds (and bias shifts) chosen by :func:`calibrate_for_T` for one ``T``.

    :ivar T: the number of time steps calibrated for
    :ivar names: the ReLU calls, in graph order (``fx`` node names)
    :ivar thresholds: one tensor per call: 0-d (per layer) or ``[C]`` (per channel)
    :ivar bias_shifts: per call a ``[C]`` shift of the pre-activation, or ``None``
    :ivar bias_targets: per call the module whose bias carries the shift, or ``None``
    :ivar layers: per call a dict of diagnostics (rounding error, clipped and zeroed shares,
        the ANN's ``'99.9%'`` activation percentile) for :func:`calibration_report`
    :ivar seconds: wall-clock time of the calibration
    :ivar output_shift: ``[classes]`` shift of the output (bias correction of the last layer), or
        ``None``
    :ivar output_target: the module whose bias carries ``output_shift``, or ``None``
    :ivar output_scales: per call the output scale ``s`` of the neuron (the scaler after it;
        like ``thresholds``), or ``None`` when it equals the threshold
    :ivar weights: ``{module name: (weight, bias)}`` of the conv/linear layers whose weights
        were refitted (``reconstruct=True``), or ``None``
    """

    T: int
    names: list
    thresholds: list
    bias_shifts: list
    bias_targets: list
    channel_dim: int = 1
    layers: list = field(default_factory=list)
    seconds: float = 0.0
    settings: dict = field(default_factory=dict)
    output_shift: torch.Tensor | None = None
    output_target: str | None = None
    output_scales: list | None = None
    weights: dict | None = None


def _install_probes(gm: fx.GraphModule, T: int, channel_dim: int) -> list:
    """Replace each ReLU call of ``gm`` (in place) by its own :class:`_Probe`."""
    probes = []
    for i, node in enumerate(activation_nodes(gm)):
        probe = _Probe(i, node.name, T, channel_dim)
        target = f"_tpp_calibration_probe_{i}"
        gm.add_submodule(target, probe)
        node.target = target
        probes.append(probe)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return probes


def quantised_ann(ann: nn.Module, thresholds, T: int, bias_shifts=None,
                  channel_dim: int = 1, fuse: bool | None = None) -> fx.GraphModule:
    r"""The ANN that a network of exact-count TPP neurons with these thresholds computes: each
    ReLU call's output rounded to ``T`` levels of its threshold (:func:`quantise`).

    :param ann: a ReLU network (traceable with ``torch.fx``; not modified)
    :param thresholds: a :class:`CalibrationResult` (its thresholds and bias shifts are used), or
        one threshold per ReLU call in graph order: a number, 0-d or ``[C]`` tensor
    :param T: the number of time steps
    :param bias_shifts: per ReLU call a ``[C]`` shift of its input (or ``None``); taken from the
        result when ``thresholds`` is a :class:`CalibrationResult`
    :param channel_dim: the channel dimension of per-channel thresholds
    :param fuse: fold conv-BN pairs first (:func:`fuse_conv_bn`), as the calibration did;
        default: as recorded in the :class:`CalibrationResult`, else ``False``
    :return: a copy of ``ann`` (an ``fx.GraphModule``) in eval mode

    Shape: as ``ann``.

    Example::

        >>> ann = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
        >>> x = torch.rand(32, 4)
        >>> result = calibrate_for_T(ann, [x], T=4)
        >>> qann = quantised_ann(ann, result, T=4)
        >>> qann(x).shape   # its predictions are the exact-count TPP network's
        torch.Size([32, 3])
    """
    T = F.check_window(T)
    model = _trace(copy.deepcopy(ann)).eval()
    if fuse is None:
        fuse = isinstance(thresholds, CalibrationResult) and thresholds.settings.get("fuse", False)
    if fuse:
        model = fuse_conv_bn(model)
    scales = None
    if isinstance(thresholds, CalibrationResult):
        result = thresholds
        thresholds, bias_shifts = result.thresholds, None
        channel_dim = result.channel_dim
        scales = result.output_scales
        apply_bias_shifts(model, result)
    probes = _install_probes(model, T, channel_dim)
    thresholds = list(thresholds)
    if len(thresholds) != len(probes):
        raise ValueError(
            f"got {len(thresholds)} thresholds for a model with {len(probes)} ReLU calls"
        )
    shifts = list(bias_shifts) if bias_shifts is not None else [None] * len(probes)
    scales = list(scales) if scales is not None else [None] * len(probes)
    for probe, theta, shift, scale in zip(probes, thresholds, shifts, scales):
        probe.theta = F.check_threshold(torch.as_tensor(theta, dtype=torch.float64).clone(),
                                        f"threshold of {probe.name!r}")
        probe.scale = None if scale is None else torch.as_tensor(scale, dtype=torch.float64)
        probe.shift = None if shift is None else torch.as_tensor(shift)
    return model


# ------------------------------------------------------------------------------------------------
# calibration
# ------------------------------------------------------------------------------------------------
def _calibration_inputs(batches: Iterable, device, dtype) -> torch.Tensor:
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
    if max_samples is not None and x.shape[0] > max_samples:
        gen = torch.Generator().manual_seed(seed)
        idx = torch.randperm(x.shape[0], generator=gen)[:max_samples].sort().values
        x = x[idx.to(x.device)]
    return x


def _run(gm, x, batch_size):
    outs = []
    for i in range(0, x.shape[0], batch_size):
        outs.append(gm(x[i:i + batch_size]))
    return torch.cat(outs)


def _lockstep(gm: fx.GraphModule, x: torch.Tensor, visit, refit=None) -> tuple:
    """Run the ANN and the network being quantised side by side on all of ``x``, node by node.

    At each ReLU call (a :class:`_Probe`) ``visit(index, a, a_ann)`` gets the call's input in
    the quantised network (all earlier calls quantised) and in the ANN, and sets the probe's
    threshold and shift, which the quantised side then applies. At each conv/linear layer whose
    input differs between the two sides, ``refit(name, module, x_q, z_ann, partner, relu)`` (if
    given) returns the module the quantised side runs instead (its own weights); ``z_ann`` is
    the ANN's output of the layer, ``partner``, where that output is one term of a residual
    sum whose other term is already computed, that term on both sides (else ``None``), and
    ``relu`` whether the output (or the sum) feeds a ReLU call alone. One pass of each network
    in all — no call is recomputed. Values are freed once their last user has run.

    :return: ``(ann_output, quantised_output)``
    """
    modules = dict(gm.named_modules())
    model_storage = {t.untyped_storage().data_ptr()
                     for t in (*gm.parameters(), *gm.buffers())}
    sides = (fx.Interpreter(gm), fx.Interpreter(gm))
    for side in sides:
        side.env = {}
    users_left = {n: len(n.users) for n in gm.graph.nodes}
    first = True
    outputs = (None, None)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if first:
                value = x
            elif node.args:
                value = node.args[0]
            else:
                raise ValueError(
                    f"calibration feeds the model one input; its argument {node.target!r} "
                    "has no default value")
            first = False
            for side in sides:
                side.env[node] = value
            continue
        if node.op == "output":
            outputs = tuple(side.fetch_args_kwargs_from_env(node)[0][0] for side in sides)
            break
        module = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(module, _Probe):
            src = node.args[0]
            a_ann, a = sides[0].env[src], sides[1].env[src]
            visit(module.index, a, a_ann)
            # a value no one else holds is overwritten (saves a full-size copy per side)
            own = (a is not a_ann and users_left[src] == 1
                   and not any(_shares_storage(t, [side.env for side in sides], model_storage)
                               for t in (a, a_ann)))
            sides[0].env[node] = a_ann.relu_() if own else torch.relu(a_ann)
            module.overwrite = own
            try:
                sides[1].env[node] = module(a)
            finally:
                module.overwrite = False
        elif (refit is not None and isinstance(module, _REFITTABLE) and not node.kwargs
              and len(node.args) == 1
              and sides[0].env[node.args[0]] is not sides[1].env[node.args[0]]):
            x_ann, x_q = sides[0].env[node.args[0]], sides[1].env[node.args[0]]
            sides[0].env[node] = z_ann = module(x_ann)
            other = _residual_partner(node)
            # a residual sum must match the ANN's: the target is the sum minus the other term
            partner = ((sides[0].env[other], sides[1].env[other])
                       if other is not None and other in sides[1].env else None)
            relu = _feeds_probe(node, modules) or (
                partner is not None and _feeds_probe(next(iter(node.users)), modules))
            sides[1].env[node] = refit(node.target, module, x_q, z_ann, partner, relu)(x_q)
        elif all(sides[0].env[a] is sides[1].env[a] for a in node.all_input_nodes):
            # the same inputs on both sides (before the first ReLU call): run it once
            sides[0].env[node] = sides[1].env[node] = sides[0].run_node(node)
        else:
            for side in sides:
                side.env[node] = side.run_node(node)
        for arg in node.all_input_nodes:
            users_left[arg] -= 1
            if users_left[arg] == 0:
                for side in sides:
                    side.env.pop(arg, None)
    return outputs


_REFITTABLE = (nn.Linear, nn.Conv2d)


def _shares_storage(value, envs, model_storage) -> bool:
    """Whether ``value`` is not a plain tensor, or its memory is the model's or that of
    another value still held in ``envs`` (a view of it, say)."""
    if not isinstance(value, torch.Tensor) or value.requires_grad:
        return True
    ptr = value.untyped_storage().data_ptr()
    if ptr in model_storage:
        return True
    return any(isinstance(v, torch.Tensor) and v is not value
               and v.untyped_storage().data_ptr() == ptr
               for env in envs for v in env.values())


def _feeds_probe(node: fx.Node, modules: dict) -> bool:
    """Whether ``node``'s only user is a ReLU call (a :class:`_Probe`)."""
    if len(node.users) != 1:
        return False
    user = next(iter(node.users))
    return user.op == "call_module" and isinstance(modules.get(user.target), _Probe)


def _residual_partner(node: fx.Node):
    """The other addend when ``node``'s only user is a two-term ``add`` (a residual sum such as
    ``conv2(...) + identity``), else ``None``. A refitted layer there is fitted to the ANN's sum
    minus the quantised network's other addend, so it also absorbs the shortcut's error."""
    if len(node.users) != 1:
        return None
    user = next(iter(node.users))
    if (user.op not in ("call_function", "call_method") or user.target not in _ADDS
            or user.kwargs or len(user.args) != 2):
        return None
    other = [a for a in user.args if a is not node]
    return other[0] if len(other) == 1 and isinstance(other[0], fx.Node) else None


def _patches(module, x):
    """The inputs of the linear map ``module`` applies, one column per output position:
    ``[in_features, positions]`` (a view for a linear layer, one copy for a convolution)."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, module.in_features).T
    cols = nn.functional.unfold(x, module.kernel_size, module.dilation, module.padding,
                                module.stride)  # [N, D, L]
    return cols.transpose(0, 1).reshape(cols.shape[1], -1)


def _fit_weights(module, x_q, z_ann, ridge, max_rows, seed, max_features=None, partner=None,
                 relu_steps=0):
    """A copy of the conv/linear ``module`` whose weights and bias map the quantised network's
    input ``x_q`` to the ANN's output ``z_ann`` in least squares, with a ridge penalty
    ``ridge · mean(diag(AᵀA)) · ‖θ − θ_ANN‖²`` towards the ANN's weights. With ``partner``, the
    other term of a residual sum in the ANN and in the quantised network, the target is
    ``z_ann + partner[0] − partner[1]``. At most ``max_rows`` rows (output positions) are
    fitted: whole samples, chosen with ``seed``. A grouped or string-padded convolution, or a
    layer with more than ``max_features`` inputs per output, is returned as it is.

    ``relu_steps > 0``: the output feeds a ReLU, so where the ANN's ReLU input is ``≤ 0`` only
    the fit's positive part is an error: that many times, the fit is solved again with the
    target there replaced by ``min(fit, 0)`` (the ReLU input's; the Gram matrix and its factor
    are reused, each step costs two products of the size of the right-hand side)."""
    if isinstance(module, nn.Conv2d) and (module.groups != 1 or isinstance(module.padding, str)
                                          or module.padding_mode != "zeros"):
        return module
    if max_features is not None and module.weight[0].numel() > max_features:
        return module  # the (D + 1)² system would cost O(D³)
    channel_dim = -1 if isinstance(module, nn.Linear) else 1
    per_sample = z_ann[0].numel() // z_ann.shape[channel_dim]
    n = x_q.shape[0]
    if n * per_sample > max_rows:
        keep = max(1, max_rows // per_sample)
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:keep]
        idx = idx.sort().values.to(x_q.device)
        x_q, z_ann = x_q[idx], z_ann[idx]
        partner = None if partner is None else tuple(t[idx] for t in partner)
    rows = lambda t: t.movedim(channel_dim, -1).reshape(-1, t.shape[channel_dim])  # noqa: E731
    floor = 0.0  # where the target is at most this, the ReLU input is ≤ 0
    if partner is not None:
        z_ann = z_ann + partner[0] - partner[1]
        floor = -rows(partner[1])
    cols = _patches(module, x_q)  # [D, R]
    out = rows(z_ann)
    w = module.weight.detach().reshape(module.weight.shape[0], -1)
    b = module.bias.detach() if module.bias is not None else w.new_zeros(w.shape[0])
    prior = torch.cat([w, b.unsqueeze(1)], 1).T.double()  # [D + 1, out]
    # the normal equations of the rows [patch, 1] without building them
    D = cols.shape[0]
    gram = cols.new_empty(D + 1, D + 1, dtype=torch.float64)
    gram[:D, :D] = cols @ cols.T
    gram[:D, D] = gram[D, :D] = cols.sum(1)
    gram[D, D] = cols.shape[1]
    lam = ridge * float(gram.diagonal().mean())
    gram.diagonal().add_(lam)
    factor, info = torch.linalg.cholesky_ex(gram)
    target = out
    for step in range(relu_steps + 1):
        rhs = torch.cat([cols @ target, target.sum(0, keepdim=True)]).double() + lam * prior
        theta = (torch.cholesky_solve(rhs, factor) if int(info) == 0
                 else torch.linalg.solve(gram, rhs)).to(w.dtype)
        if step < relu_steps:
            fit = torch.addmm(theta[-1], cols.T, theta[:-1])
            target = torch.where(out <= floor, torch.minimum(fit, torch.as_tensor(floor).to(fit)),
                                 out)
    fitted = copy.deepcopy(module)
    fitted.weight.data = theta[:-1].T.reshape_as(module.weight).contiguous()
    fitted.bias = nn.Parameter(theta[-1].clone())
    return fitted


def _output_gradients(gm, probes, x, batch_size) -> list:
    """Per ReLU call, the squared gradient of the float ANN's loss (cross-entropy against its own
    prediction) with respect to the call's output, summed over the batch: the Fisher weight of
    each activation."""
    weights = [None] * len(probes)
    for p in probes:
        p.keep_output = True
    try:
        with torch.enable_grad():
            for i in range(0, x.shape[0], batch_size):
                out = gm(x[i:i + batch_size].detach().requires_grad_(True))
                if out.dim() < 2:
                    raise ValueError(
                        "objective='fisher' needs a classifier output of shape [N, classes]; "
                        "use objective='activation'")
                target = out.detach().argmax(1)
                loss = nn.functional.cross_entropy(out, target, reduction="sum")
                grads = torch.autograd.grad(loss, [p.output for p in probes],
                                            allow_unused=True)
                for j, g in enumerate(grads):
                    g = torch.zeros_like(probes[j].output) if g is None else g.detach() ** 2
                    weights[j] = g if weights[j] is None else torch.cat([weights[j], g])
    finally:
        for p in probes:
            p.keep_output, p.output = False, None
    return weights


def _channels_first(t: torch.Tensor, dim: int) -> torch.Tensor:
    """``[C, M]``, contiguous (the histograms' scatters are several times faster on it)."""
    return t.movedim(dim, 0).reshape(t.shape[dim], -1).contiguous()


def _bin_statistics(a, target, weight, granularity, bins):
    """Histograms of each channel's non-negative pre-activations (``a``, ``[C, M]``) on
    ``[0, top]``: per bin the (weighted) count, sum and sum of squares of ``target``
    (``[C, bins + 1]`` each; column 0 holds the negatives, column ``b + 1`` bin ``b``)."""
    C = a.shape[0]
    top = a.amax(1).clamp(min=0) if granularity == "channel" else a.amax().clamp(min=0).expand(C)
    top = torch.where(top > 0, top, torch.ones_like(top))
    # bin of each value, shifted by one: the negatives (floor < 0) all land in bin 0
    idx = torch.addcmul(torch.ones((), dtype=a.dtype, device=a.device), a,
                        (bins / top).unsqueeze(1)).floor_().clamp_(0, bins).long()
    wt = target if weight is None else weight * target
    stats = []
    for values in (weight, wt, wt * target):
        acc = torch.zeros(C, bins + 1, dtype=a.dtype, device=a.device)
        if values is None:  # unweighted counts
            values = torch.ones((), dtype=a.dtype, device=a.device).expand_as(a)
        stats.append(acc.scatter_add_(1, idx, values))
    return top, stats


def _exact_count_errors(n, s, ss_sum, neg_sum, top, T, fractions, offsets, coherence,
                        free_scale, m):
    """Errors ``[K, U, C]`` (and output steps, or ``None``) of every candidate fraction ``k`` and
    offset ``u`` for the exact count, from prefix sums over the bins: a bin's level is
    non-decreasing in its index, so each candidate is ``T`` bin boundaries and costs
    ``O(C · T)``, not ``O(C · bins)``.

    Level ``≥ j`` holds from the first bin whose centre ``c`` has ``c·T/θ + u + ½ ≥ j``; with
    ``θ = f·top`` and ``c = (b + ½)·top/B`` that bin is ``ceil((j − ½ − u)·B·f/T − ½)``, the
    same for every channel. ``Σ_l l·S_l`` and ``Σ_l l²·N_l`` are sums over ``j`` of the tails
    above those boundaries (``l² = Σ_{j ≤ l} (2j − 1)``).
    """
    C, B = n.shape
    zero = n.new_zeros(C, 1)
    tail_n = torch.cat([zero, n.cumsum(1)], 1)
    tail_n = tail_n[:, -1:] - tail_n  # [C, B + 1]: Σ of bins ≥ e
    tail_s = torch.cat([zero, s.cumsum(1)], 1)
    tail_s = tail_s[:, -1:] - tail_s
    j = torch.arange(1, T + 1, dtype=torch.float64)
    f = fractions.double().view(-1, 1, 1)
    u = offsets.double().view(1, -1, 1)
    first = torch.ceil((j - 0.5 - u) * (B / T) * f - 0.5).clamp_(0, B).long()  # [K, U, T]
    K, U = first.shape[:2]
    idx = first.reshape(-1).to(n.device)
    tn = tail_n[:, idx].view(C, K, U, T)
    ts = tail_s[:, idx].view(C, K, U, T)
    level_n = tn.sum(-1)  # Σ_l l·N_l
    num = ts.sum(-1)  # Σ_l l·S_l
    den = (tn * (2 * j.to(tn) - 1)).sum(-1)  # Σ_l l²·N_l
    fixed = (f.view(1, -1, 1).to(n) * top.view(C, 1, 1) / T)  # θ/T: [C, K, 1]
    ss = ss_sum.view(C, 1, 1)
    steps = None
    if free_scale:
        ok = (den > 0) & (num > 0)
        step = torch.where(ok, num / den.clamp(min=1e-30), fixed.expand_as(num))
        err = torch.where(ok, ss - num * step, fixed * fixed * den - 2 * fixed * num + ss)
        steps = step.permute(1, 2, 0)
    else:
        step = fixed
        err = step * step * den - 2 * step * num + ss
    if coherence:
        total = step * level_n - tail_s[:, :1].view(C, 1, 1) + neg_sum.view(C, 1, 1)
        err = err + coherence * total * total / m
    return err.permute(1, 2, 0), steps


def _binned_search(a, target, weight, T, fractions, offsets, granularity, bins, coherence=0.0,
                   count="exact", free_scale=False):
    """Joint search of the threshold (per channel, or per layer) and of a per-channel rounding
    offset ``u`` (a bias shift of ``u·θ/T``) on binned statistics.

    ``a`` (pre-activations), ``target`` (the ANN's activations) and ``weight`` are ``[C, M]``.
    The non-negative pre-activations of each channel are put in ``bins`` bins on ``[0, max]``;
    per bin the (weighted) count, sum and sum of squares of the target give the squared error
    of any quantiser that is constant on the bin, so every candidate costs ``O(C · bins)``
    (``O(C · T)`` for the exact count, :func:`_exact_count_errors`) instead of ``O(C · M)``.
    Negative pre-activations give 0 for every candidate (``|u| ≤ ½``) and do not affect the
    choice. Returns ``(theta, u, scale)``: ``[C]`` (or 0-d), ``[C]`` and ``[C]`` or ``None``.
    """
    C = a.shape[0]
    if bins is None:  # 512, but a few values per bin at least
        bins = min(512, max(64, a.shape[1] // 8))
    top, stats = _bin_statistics(a, target, weight, granularity, bins)
    n, s, ss = (t[:, 1:] for t in stats)
    m = a.shape[1]
    # the (weighted) error sum of the negatives (output 0 for every candidate): -Σ w·target
    neg_sum = -stats[1][:, 0]  # [C]
    ss_sum = ss.sum(-1)  # [C]
    steps = None
    if count == "exact":
        errors, steps = _exact_count_errors(
            n.double(), s.double(), ss_sum.double(), neg_sum.double(), top.double(), T,
            fractions, offsets, coherence, free_scale, m)
    else:  # two-point count: floor(w) or floor(w) + 1, with the rule's mean
        centres = (torch.arange(bins, dtype=a.dtype, device=a.device) + 0.5) / bins
        centres = centres.unsqueeze(0) * top.unsqueeze(1)  # [C, B]
        u = offsets.to(a.dtype).view(-1, 1, 1)  # [U, 1, 1]
        w_top = centres.unsqueeze(0) * (T / top).unsqueeze(1)  # [1, C, B]: w of each bin at θ=top
        errors = []
        for k in range(fractions.numel()):
            theta = (fractions[k] * top).view(1, C, 1)
            w_bin = w_top / fractions[k] + u
            low = torch.floor(w_bin).clamp_(0, T)
            p_up = (_random_count_mean(w_bin, T, count) - low).clamp_(0, 1)
            q_lo, q_hi = low * theta / T, (low + 1) * theta / T
            err = ((1 - p_up) * (n * q_lo * q_lo - 2 * q_lo * s + ss)
                   + p_up * (n * q_hi * q_hi - 2 * q_hi * s + ss)).sum(-1)
            if coherence:
                q = q_lo + p_up * theta / T  # the mean
                total = (n * q - s).sum(-1) + neg_sum  # Σ e per channel
                err = err + coherence * total * total / m
            errors.append(err)
        errors = torch.stack(errors)  # [K, U, C]
    best_u_err, best_u = errors.min(1)  # [K, C]
    if granularity == "channel":
        best_k = best_u_err.argmin(0)  # [C]
        theta = fractions[best_k].to(a.dtype) * top
        u_idx = best_u.gather(0, best_k.view(1, -1)).squeeze(0)
    else:
        best_k = best_u_err.sum(1).argmin().expand(C)
        theta = fractions[best_k[0]].to(a.dtype) * top[0]
        u_idx = best_u[best_k[0]]
    scale = None
    if steps is not None:
        chosen = steps[best_k, u_idx, torch.arange(C, device=a.device)]
        scale = (chosen * T).to(a.dtype)
    return theta, offsets[u_idx], scale


def _search(a, target, weight, T, fractions, granularity):
    """The best threshold per channel (``[C]``) or per layer (0-d) from ``fractions`` of the
    calibration maximum, for pre-activations ``a`` and ANN activations ``target``
    (both ``[C, M]``), with squared-error weights ``weight`` (``[C, M]`` or ``None``)."""
    pos = a.clamp(min=0)
    if granularity == "channel":
        top = pos.amax(1)
    else:
        top = pos.amax().expand(a.shape[0])
    top = torch.where(top > 0, top, torch.ones_like(top))
    K = fractions.numel()
    chunk = max(1, min(K, (1 << 23) // max(1, a.numel())))
    a_T = (a * T).unsqueeze(0)
    errors = []
    for k0 in range(0, K, chunk):
        theta = (fractions[k0:k0 + chunk].view(-1, 1) * top.view(1, -1)).unsqueeze(-1)  # [k,C,1]
        u = a_T / theta
        u.add_(0.5).floor_().clamp_(0, T).mul_(theta / T).sub_(target.unsqueeze(0)).square_()
        if weight is not None:
            u.mul_(weight.unsqueeze(0))
        errors.append(u.sum(-1))  # [k, C]
    errors = torch.cat(errors)  # [K, C]
    if granularity == "channel":
        best = errors.argmin(0)
        return fractions[best] * top
    best = errors.sum(1).argmin()
    return fractions[best] * top[0]


def _subsample_samples(tensors, channel_dim: int, max_values, seed: int):
    """The same random samples (along dim 0) of each tensor, enough for about ``max_values``
    values per channel (all if fewer; dim 0 being the channel dimension, all)."""
    t0 = tensors[0]
    per_sample = t0[0].numel() // t0.shape[channel_dim] if channel_dim else 0
    if max_values is None or not per_sample or t0.shape[0] * per_sample <= max_values:
        return tensors
    keep = -(-max_values // per_sample)
    idx = torch.randperm(t0.shape[0], generator=torch.Generator().manual_seed(seed))[:keep]
    idx = idx.sort().values.to(t0.device)
    return [None if t is None else t[idx] for t in tensors]


def _kl_divergence(log_p_ref: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(p_ref ‖ softmax(logits)) over dim 1, averaged over samples (differentiable)."""
    log_q = torch.log_softmax(logits, dim=1)
    return (log_p_ref.exp() * (log_p_ref - log_q)).sum(1).mean()


def _kl(log_p_ref: torch.Tensor, logits: torch.Tensor) -> float:
    return float(_kl_divergence(log_p_ref, logits))


@torch.no_grad()
def calibrate_for_T(
    ann: nn.Module,
    batches: Iterable,
    T: int,
    granularity: str = "channel",
    objective: str = "activation",
    bias_correction="mean",
    refine=False,
    channel_dim: int = 1,
    fuse: bool = True,
    grid: int = 64,
    refine_grid=(0.8, 0.85, 0.9, 0.95, 1.0, 1.05, 1.1, 1.2),
    max_samples: int | None = 1024,
    max_values: int | None = 16384,
    search: str = "binned",
    reference: str = "ann",
    coherence: float = 0.0,
    output_correction: bool = True,
    count: str = "exact",
    output_scale: bool = True,
    bins: int | None = None,
    offset_steps: int = 9,
    batch_size: int = 256,
    seed: int = 0,
    reconstruct: bool = True,
    ridge: float = 0.1,
    max_rows: int = 16384,
    max_features: int | None = 2048,
    relu_steps: int = 0,
    finetune_epochs: int = 0,
    finetune_lr: float = 1e-3,
    finetune_drop: float = 0.0,
    finetune_holdout: float = 0.2,
) -> CalibrationResult:
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
        a ``DataLoader``). Every batch is read and kept, on the model's device, until
        ``max_samples`` of them are drawn (all of them through fine-tuning): for a data set
        that does not fit there, pass a loader over part of it (``torch.utils.data.Subset``)
    :param T: the number of time steps (levels) to calibrate for, ``>= 1``
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
        default: none) on every sample of ``loader`` (:mod:`tpp_plugin.finetune`). Pass the
        training loader: on Fashion-MNIST, 4 epochs on the whole training set gained 4.2–9.8
        points at T=1, 1.2–6.0 at T=2 and 0.1–2.6 at T=4 on four models, where 2 048 images
        gained at most +0.7 on the convolutional ones; it takes minutes per model on a CPU
        (docs/calibration.md, step 4)
    :param finetune_lr: Adam's learning rate (cosine-annealed to 0)
    :param finetune_drop: the probability that an activation keeps its unrounded value in a
        training step (QDrop), in ``[0, 1)``; default ``0``: off
    :param finetune_holdout: the share of the calibration samples held out to choose the epoch,
        in ``[0, 1)`` (``0``: keep the last)
    :return: a :class:`CalibrationResult`
    :raises ValueError: for ``T < 1``, an empty loader, a model without ``nn.ReLU``, a
        ``channel_dim`` out of range, non-finite activations or an unknown option

    Example::

        >>> ann = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.ReLU(),
        ...                     nn.Flatten(), nn.Linear(6 * 4 * 4, 3)).eval()
        >>> result = calibrate_for_T(ann, [torch.rand(16, 1, 8, 8)], T=4)
        >>> [tuple(t.shape) for t in result.thresholds]      # per channel
        [(4,), (6,)]
        >>> table = format_report(calibration_report(result))   # print(table) shows it
    """
    start = time.perf_counter()
    T = F.check_window(T)
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
        raise ValueError(f"grid must be a positive integer, got {grid!r}")
    if bins is not None and (isinstance(bins, bool) or not isinstance(bins, int) or bins < 1):
        raise ValueError(f"bins must be a positive integer or None, got {bins!r}")
    if not isinstance(channel_dim, int) or isinstance(channel_dim, bool):
        raise TypeError(f"channel_dim must be an int, got {channel_dim!r}")
    gm = _trace(copy.deepcopy(ann)).eval()
    if fuse:
        gm = fuse_conv_bn(gm)
    nodes = activation_nodes(gm)
    if not nodes:
        raise ValueError("the model has no nn.ReLU activation to calibrate (only nn.ReLU modules "
                         "are converted to spiking neurons)")
    names = [n.name for n in nodes]
    if bias_correction is True:
        bias_correction = "search"
    if bias_correction not in (False, None, "search", "mean"):
        raise ValueError("bias_correction must be 'search', 'mean' or False, got "
                         f"{bias_correction!r}")
    if not (isinstance(ridge, (int, float)) and not isinstance(ridge, bool)
            and math.isfinite(ridge) and ridge > 0):
        raise ValueError(f"ridge must be a positive number, got {ridge!r}")
    if max_features is not None and (isinstance(max_features, bool)
                                     or not isinstance(max_features, int) or max_features < 1):
        raise ValueError(f"max_features must be a positive integer or None, got "
                         f"{max_features!r}")
    if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
        raise ValueError(f"max_rows must be a positive integer, got {max_rows!r}")
    if isinstance(relu_steps, bool) or not isinstance(relu_steps, int) or relu_steps < 0:
        raise ValueError(f"relu_steps must be a non-negative integer, got {relu_steps!r}")
    if count not in F.COUNT_MODES:
        raise ValueError(f"count must be one of {F.COUNT_MODES}, got {count!r}")
    if count != "exact" and search != "binned":
        raise ValueError(f"count={count!r} needs search='binned'")
    if reference not in ("ann", "input"):
        raise ValueError(f"reference must be 'ann' or 'input', got {reference!r}")
    if search not in ("binned", "exact"):
        raise ValueError(f"search must be 'binned' or 'exact', got {search!r}")
    targets = [_bias_target(gm, n) if bias_correction else None for n in nodes]
    param = next(gm.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    from .finetune import check_finetune_args, finetune  # it builds on this module

    check_finetune_args(finetune_epochs, finetune_lr, finetune_drop, finetune_holdout)
    x_all = _calibration_inputs(batches, device, dtype)
    x = _subsample(x_all, max_samples, seed)
    if not finetune_epochs:
        x_all = None  # only fine-tuning uses every sample: do not hold them all meanwhile
    probes = _install_probes(gm, T, channel_dim)
    for p in probes:
        p.count, p.fast = count, True
    weights = _output_gradients(gm, probes, x, batch_size) if objective == "fisher" else None
    if refine not in (False, None, True, "global", "local"):
        raise ValueError(f"refine must be False, 'global' or 'local', got {refine!r}")
    log_p_ref = torch.log_softmax(_run(gm, x, batch_size), 1) if refine == "local" else None
    fractions = torch.arange(1, grid + 1, dtype=torch.float32, device=device) / grid
    thresholds, shifts, layers, scales = [], [], [], []

    def visit(i: int, a: torch.Tensor, a_ann: torch.Tensor) -> None:
        """Calibrate ReLU call ``i`` from its input ``a`` (earlier layers quantised) and the
        ANN's ``a_ann``; leaves its threshold and shift on its probe."""
        probe = probes[i]
        dim = _normalise_channel_dim(channel_dim, a, f"ReLU call {probe.name!r}")
        others = [d for d in range(a.dim()) if d != dim]
        means = []
        for name, value in (("", a), (" in the ANN", a_ann)):
            means.append(value.mean(others))  # non-finite if any value is (or on overflow)
            if (not bool(torch.isfinite(means[-1]).all())
                    and not bool(torch.isfinite(value).all())):
                raise ValueError(
                    f"ReLU call {probe.name!r} has non-finite (NaN or infinite) activations"
                    f"{name} on the calibration data; check the model's weights and the "
                    "calibration inputs")
        shift = None
        if targets[i] is not None and bias_correction == "mean":
            shift = means[1] - means[0]
        w = weights[i] if weights is not None else None
        a_c, ann_c, w = (None if t is None else _channels_first(t, dim) for t in
                         _subsample_samples([a, a_ann, w], dim, max_values, seed + i))
        if shift is not None:
            a_c = a_c + shift.unsqueeze(1)
        a_s, target_s, w_s = a_c, (ann_c if reference == "ann" else a_c).clamp(min=0), w
        if search == "binned":
            offsets = (torch.linspace(-0.5, 0.5, offset_steps, dtype=a_c.dtype)
                       if targets[i] is not None and bias_correction == "search"
                       else torch.zeros(1, dtype=a_c.dtype))
            theta, u, scale = _binned_search(
                a_s, target_s, w_s, T, fractions.to(a_c.dtype), offsets.to(device),
                granularity, bins, coherence, count, output_scale)
            if bias_correction == "search" and targets[i] is not None:
                shift = u * theta / T
                a_s = a_s + shift.unsqueeze(1)
        else:
            scale = None
            theta = _search(a_s.float(), target_s.float(), None if w_s is None else w_s.float(),
                            T, fractions, granularity).to(a_c.dtype)
        theta = theta.clamp(min=torch.finfo(torch.float32).tiny)
        probe.shift = None if shift is None else shift.to(dtype)
        if refine == "local":
            best, best_kl = 1.0, math.inf
            for factor in refine_grid:
                probe.theta = (theta * factor).to(dtype)
                kl = _kl(log_p_ref, _run(gm, x, batch_size))
                if kl < best_kl - 1e-12:
                    best, best_kl = factor, kl
            theta = theta * best
        probe.theta = theta.to(dtype)
        probe.scale = None if scale is None else scale.to(dtype)
        scales.append(None if scale is None else scale.to(dtype).cpu())
        thresholds.append(theta.to(dtype).cpu())
        shifts.append(None if shift is None else shift.to(dtype).cpu())
        # about 2¹⁶ values per layer (and 64 per channel) are plenty for a report
        stats_cols = slice(0, None, max(1, min(a_s.shape[1] // 64, a_s.numel() >> 16)))
        layers.append(_layer_stats(probe.name, a_s[:, stats_cols], target_s[:, stats_cols],
                                   theta, T, scale))

    fitted_modules = {}

    def refit(target, module, x_q, z_ann, partner=None, relu=False):
        fitted = _fit_weights(module, x_q, z_ann, ridge, max_rows, seed, max_features, partner,
                              relu_steps if relu else 0)
        if fitted is not module:
            fitted_modules[target] = fitted
        return fitted

    ann_out, q_out = _lockstep(gm, x, visit, refit if reconstruct else None)
    for target, fitted in fitted_modules.items():
        _set_submodule(gm, target, fitted)
    if refine in (True, "global"):  # one sweep, every layer quantised
        log_p_ann = torch.log_softmax(ann_out, 1)
        for i, probe in enumerate(probes):
            base = probe.theta
            best, best_kl = 1.0, _kl(log_p_ann, _run(gm, x, batch_size))
            for factor in refine_grid:
                if factor == 1.0:
                    continue
                probe.theta = base * factor
                kl = _kl(log_p_ann, _run(gm, x, batch_size))
                if kl < best_kl - 1e-12:
                    best, best_kl = factor, kl
            probe.theta = base * best
            thresholds[i] = probe.theta.cpu()
        q_out = _run(gm, x, batch_size)
    output_shift, output_target = None, None
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    if (bias_correction and output_correction and isinstance(ann_out, torch.Tensor)
            and ann_out.dim() >= 2 and isinstance(out_node.args[0], fx.Node)):
        output_target = _foldable_producer(gm, out_node.args[0])
        if output_target is not None:
            diff = (ann_out - q_out).movedim(1, 0).reshape(ann_out.shape[1], -1)
            output_shift = diff.mean(1).cpu()
    for p in probes:
        p.theta = p.shift = None
    result = CalibrationResult(
        weights={t: (m.weight.detach().cpu().clone(), m.bias.detach().cpu().clone())
                 for t, m in fitted_modules.items()} or None,
        output_shift=output_shift, output_target=output_target,
        output_scales=scales if any(sc is not None for sc in scales) else None,
        T=T, names=names, thresholds=thresholds, bias_shifts=shifts, bias_targets=targets,
        channel_dim=channel_dim, layers=layers, seconds=time.perf_counter() - start,
        settings={"fuse": bool(fuse), "count": count, "granularity": granularity,
                  "objective": objective, "bias_correction": bias_correction,
                  "refine": refine, "grid": grid, "output_scale": output_scale,
                  "reconstruct": bool(reconstruct), "ridge": ridge, "relu_steps": relu_steps,
                  "samples": int(x.shape[0])},
    )
    if finetune_epochs:
        result = finetune(ann, result, x_all, finetune_epochs, finetune_lr, finetune_drop,
                          finetune_holdout, seed=seed)
        result.seconds = time.perf_counter() - start
    return result


def _percentile(values: torch.Tensor, q: float) -> float:
    """The ``q``-th percentile of ``values`` (no interpolation; a selection, not a sort)."""
    k = min(values.numel(), max(1, math.ceil(q / 100 * values.numel())))
    return float(values.float().kthvalue(k).values)


def _layer_stats(name, a, target, theta, T, scale=None) -> dict:
    """Diagnostics of one calibrated layer (``a``, ``target``: ``[C, M]``)."""
    th = theta.view(-1, 1) if theta.dim() else theta
    sc = th if scale is None else scale.view(-1, 1)
    q = sc * torch.clamp(torch.floor(a * T / th + 0.5), 0, T) / T
    active = target > 0
    n_active = max(1, int(active.sum()))
    flat = target.flatten()
    if flat.numel() > 1 << 18:  # the percentile of a fixed random subset is plenty for a report
        step = flat.numel() // (1 << 18)
        flat = flat[::step]
    return {
        "name": name,
        "channels": int(a.shape[0]),
        "rounding_error": float(((q - target) ** 2).sum().sqrt()
                                / target.pow(2).sum().sqrt().clamp(min=1e-30)),
        "clipped": float((a > th).sum()) / a.numel(),
        "zeroed": float((active & (q == 0)).sum()) / n_active,
        "p99.9": _percentile(flat, 99.9),
    }


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------
def _summary(theta) -> dict:
    t = torch.as_tensor(theta, dtype=torch.float64).flatten()
    return {"min": float(t.min()), "median": float(t.median()), "max": float(t.max())}


def calibration_report(result: CalibrationResult, references: dict | None = None) -> dict:
    """Per layer: the chosen thresholds (min/median/max over channels; and the output scales
    where they differ from the thresholds) against other calibrations, the relative
    rounding error ``‖q(a) − relu(a_ANN)‖ / ‖relu(a_ANN)‖``, the share
    of clipped activations (above θ) and of zeroed ones (active in the ANN, no spike).

    :param result: what :func:`calibrate_for_T` returned
    :param references: other thresholds to compare with, ``{label: [per ReLU call a number or
        tensor]}``, e.g. those of ``RateCodingRecipe('99.9%')`` or LTB. The ANN's 99.9th
        percentile of each activation on the calibration data is always included as ``'99.9%'``
        unless given
    :return: a JSON-serialisable dict: ``{'T', 'settings', 'seconds', 'layers': [...]}``

    Example::

        >>> ann = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
        >>> result = calibrate_for_T(ann, [torch.rand(32, 4)], T=2)
        >>> report = calibration_report(result, {'2θ': [2 * t for t in result.thresholds]})
        >>> report['T'], len(report['layers']), sorted(report['layers'][0]['references'])
        (2, 1, ['2θ', '99.9%'])
    """
    references = dict(references or {})
    references.setdefault("99.9%", [layer["p99.9"] for layer in result.layers])
    for label, values in references.items():
        if len(values) != len(result.thresholds):
            raise ValueError(f"references[{label!r}] has {len(values)} thresholds for "
                             f"{len(result.thresholds)} ReLU calls")
    layers = []
    for i, (theta, stats) in enumerate(zip(result.thresholds, result.layers)):
        layers.append({
            "layer": stats["name"],
            "channels": stats["channels"],
            "threshold": _summary(theta),
            "output_scale": (None if result.output_scales is None
                             or result.output_scales[i] is None
                             else _summary(result.output_scales[i])),
            "references": {label: _summary(values[i]) for label, values in references.items()},
            "rounding_error": stats["rounding_error"],
            "clipped": stats["clipped"],
            "zeroed": stats["zeroed"],
            "bias_shift": (None if result.bias_shifts[i] is None
                           else float(result.bias_shifts[i].abs().max())),
        })
    return {"T": result.T, "settings": dict(result.settings), "seconds": result.seconds,
            "layers": layers}


def format_report(report: dict) -> str:
    """The report of :func:`calibration_report` as a text table (thresholds and output scales
    as ``median [min, max]`` over channels).

    Example::

        >>> ann = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
        >>> table = format_report(calibration_report(calibrate_for_T(ann, [torch.rand(32, 4)], 2)))
        >>> table.splitlines()[0].split()[:3]
        ['layer', 'C', 'θ']
    """
    refs = list(report["layers"][0]["references"]) if report["layers"] else []

    def fmt(s):
        if abs(s["max"] - s["min"]) <= 1e-12 * max(1.0, abs(s["max"])):
            return f"{s['median']:.3g}"
        return f"{s['median']:.3g} [{s['min']:.3g}, {s['max']:.3g}]"

    scaled = any(layer.get("output_scale") for layer in report["layers"])
    head = ["layer", "C", f"θ (T={report['T']})"] + (["s (output)"] if scaled else []) + [
        f"θ {r}" for r in refs] + ["round err", "clipped", "zeroed"]
    rows = [head]
    for layer in report["layers"]:
        scale = [fmt(layer["output_scale"] or layer["threshold"])] if scaled else []
        rows.append([layer["layer"], str(layer["channels"]), fmt(layer["threshold"])] + scale
                    + [fmt(layer["references"][r]) for r in refs]
                    + [f"{layer['rounding_error']:.3f}", f"{100 * layer['clipped']:.2f}%",
                       f"{100 * layer['zeroed']:.2f}%"])
    widths = [max(len(r[j]) for r in rows) for j in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"calibrated in {report['seconds']:.2f} s ({report['settings']})")
    return "\n".join(lines)
