"""The quantiser that exact-count TPP computes (:func:`quantise`), the mean of what the random
counting rules pass on, the :class:`Probe` that stands in for a ReLU call while a model is
calibrated or evaluated, and :func:`quantised_ann`: the ANN with every ReLU call quantised.
Shared by the calibration and the fine-tuning."""

from __future__ import annotations

import copy

import torch
from torch import fx, nn

from .. import functional as F
from .graph import activation_nodes, apply_bias_shifts, fuse_conv_bn, trace
from .result import CalibrationResult

__all__ = [
    "channel_view",
    "normalise_channel_dim",
    "quantise",
    "random_count_mean",
    "mean_quantise",
    "Probe",
    "install_probes",
    "quantised_ann",
]


def channel_view(values: torch.Tensor, x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """``values`` (a scalar or ``[C]``) shaped to broadcast along ``channel_dim`` of ``x``."""
    values = values.to(dtype=x.dtype, device=x.device)
    if values.dim() == 0:
        return values
    shape = [1] * x.dim()
    shape[channel_dim] = values.numel()
    return values.reshape(shape)


def normalise_channel_dim(channel_dim: int, x: torch.Tensor, where: str) -> int:
    """``channel_dim`` as a non-negative dimension of ``x``; a ``ValueError`` naming ``where``
    if it is out of range."""
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
            return channel_view(t, a, normalise_channel_dim(channel_dim, a, "quantise"))
        return t.to(dtype=a.dtype, device=a.device)

    theta = view(theta)
    scale = theta if scale is None else view(scale)
    return (a * T).div_(theta).add_(0.5).floor_().clamp_(0, T).mul_(scale).div_(T)


def random_count_mean(w: torch.Tensor, T: int, count: str,
                      dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The mean spike count of a random-count TPP neuron at ``w = v/θ``: the bernoulli rule's
    :func:`~tpp_plugin.functional.expected_count` (tabulated, interpolated in ``dtype``), or
    ``clamp(w, 0, T)`` for ``'unbiased'`` (up to its uniforms' 2⁻¹⁶ grid)."""
    if count == "unbiased":
        return w.clamp(0, T)
    return F.expected_count_fast(w, T, dtype=dtype)


def mean_quantise(a, theta, T, channel_dim, count, scale=None):
    """The mean of what a TPP neuron passes on: :func:`quantise` for ``'exact'``, the mean
    count of the random rules times ``s/T`` otherwise."""
    if count == "exact":
        return quantise(a, theta, T, channel_dim, scale)
    dim = normalise_channel_dim(channel_dim, a, "quantise")
    theta = torch.as_tensor(theta)
    theta = channel_view(theta, a, dim) if theta.dim() else theta.to(a)
    scale = theta if scale is None else torch.as_tensor(scale)
    scale = channel_view(scale, a, dim) if scale.dim() else scale.to(a)
    return scale * random_count_mean(a * T / theta, T, count) / T


class Probe(nn.Module):
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
        """``mean_quantise(x + shift, θ, T, scale)`` with few passes over ``x`` (the
        calibration's quantised side), up to rounding in the last bit."""
        view = lambda t: channel_view(t, x, self.channel_dim)  # noqa: E731
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
            level = random_count_mean(w, self.T, self.count, dtype=w.dtype)
        return level.mul_(step)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast and self.theta is not None:
            out = self._fast_quantise(x)
            if self.keep_output:
                self.output = out
            return out
        if self.shift is not None:
            x = x + channel_view(self.shift, x, self.channel_dim)
        if self.theta is None:
            out = torch.relu(x)
        else:
            out = mean_quantise(x, self.theta, self.T, self.channel_dim, self.count,
                                 self.scale)
        if self.keep_output:
            self.output = out
        return out



def install_probes(gm: fx.GraphModule, T: int, channel_dim: int) -> list:
    """Replace each ReLU call of ``gm`` (in place) by its own :class:`Probe`."""
    probes = []
    for i, node in enumerate(activation_nodes(gm)):
        probe = Probe(i, node.name, T, channel_dim)
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

        >>> from tpp_plugin.calibration import calibrate_for_T
        >>> ann = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
        >>> x = torch.rand(32, 4)
        >>> result = calibrate_for_T(ann, [x], T=4)
        >>> qann = quantised_ann(ann, result, T=4)
        >>> qann(x).shape   # its predictions are the exact-count TPP network's
        torch.Size([32, 3])
    """
    T = F.check_window(T)
    model = trace(copy.deepcopy(ann)).eval()
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
    probes = install_probes(model, T, channel_dim)
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

