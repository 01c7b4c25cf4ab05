r"""The calibration for T on SpikingJelly: :class:`TPPCalibrationRecipe` (2.x),
:func:`convert_calibrated` (both lines), :func:`calibrated_thresholds`, and the channel-wise
scaler 0.0.0.0.14 lacks (:class:`ChannelScaler`)."""

from __future__ import annotations

import copy
import inspect

import torch
from spikingjelly.activation_based import ann2snn, base
from spikingjelly.activation_based.ann2snn.modules import VoltageScaler
from torch import fx, nn

from ... import functional as F
from ...calibration import activation_nodes, apply_bias_shifts, calibrate_for_T, fuse_conv_bn
from ...calibration.checks import CheckedBatches, check_batches_argument
from .building import SPIKING_TYPES, NeuronFactory, neuron_kind
from .compat import IS_LEGACY, adapt_step_modes, scaler_types
from .graph import finish, make_step_mode_capable, unwrapped
from .neurons import TPPNode
from .qcfs import insert_spiking_blocks

__all__ = ["ChannelScaler", "TPPCalibrationRecipe", "convert_calibrated", "calibrated_thresholds"]


class ChannelScaler(VoltageScaler, base.StepModule):
    """Multiplies its input by a per-channel ``[C]`` scale along ``channel_dim`` (of each step, in
    multi-step mode). SpikingJelly 0.0.0.0.14 has no channel-wise scaler; this one is a
    ``VoltageScaler`` (scale in the buffer ``scale``), so the plugin's count mode and max-pool
    absorption treat it as the affine scaler it is. On 2.x the converters use SpikingJelly's own
    ``ChannelVoltageScaler``.

    :param scale: positive finite ``[C]`` tensor (or a number: the same for every channel)
    :param channel_dim: the channel dimension of a single-step input ``[N, C, *]``
    :param step_mode: ``'s'`` (``[N, C, *]``) or ``'m'`` (``[T, N, C, *]``)

    Example::

        >>> s = ChannelScaler(torch.tensor([1.0, 2.0]))
        >>> s(torch.ones(3, 2, 4)).sum((0, 2))
        tensor([12., 24.])
    """

    def __init__(self, scale=1.0, channel_dim: int = 1, step_mode: str = "s"):
        scale = torch.as_tensor(scale).detach().clone()
        if scale.dim() > 1 or scale.numel() == 0:
            raise ValueError(f"scale must be a number or a 1-D tensor, got shape "
                             f"{tuple(scale.shape)}")
        F.check_threshold(scale.double(), "scale")
        super().__init__(1.0)
        self.scale = scale
        self.channel_dim = int(channel_dim)
        self.step_mode = step_mode

    def extra_repr(self) -> str:
        return (f"scale_shape={tuple(self.scale.shape)}, channel_dim={self.channel_dim}, "
                f"step_mode={self.step_mode}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale.to(dtype=x.dtype, device=x.device)
        if scale.dim() == 0:
            return x * scale
        dim = self.channel_dim + (1 if self.step_mode == "m" and self.channel_dim >= 0 else 0)
        dim = dim + x.dim() if dim < 0 else dim
        if not 0 <= dim < x.dim() or x.shape[dim] != scale.numel():
            raise ValueError(
                f"ChannelScaler with {scale.numel()} channels (channel_dim={self.channel_dim}, "
                f"step_mode={self.step_mode!r}) cannot scale an input of shape {tuple(x.shape)}"
            )
        shape = [1] * x.dim()
        shape[dim] = scale.numel()
        return x * scale.reshape(shape)


def _channel_scaler(scale: torch.Tensor, channel_dim: int) -> nn.Module:
    """A scaler for a threshold: ``VoltageScaler`` for a scalar, else SpikingJelly's
    ``ChannelVoltageScaler`` (2.x) or :class:`ChannelScaler` (0.0.0.0.14)."""
    if scale.dim() == 0:
        return VoltageScaler(float(scale))
    channel_cls = next((c for c in scaler_types() if c.__name__ == "ChannelVoltageScaler"), None)
    if channel_cls is not None:
        return channel_cls(scale, channel_dim=channel_dim)
    return ChannelScaler(scale, channel_dim=channel_dim)


def _calibration_factory(neuron, neuron_kwargs, T) -> NeuronFactory:
    """The neurons of a calibrated conversion; a TPP neuron's window is the calibration's ``T``
    (a ``neuron_kwargs`` ``T`` that differs is refused: its thresholds are for ``T``)."""
    if neuron_kwargs is not None and not isinstance(neuron_kwargs, dict):
        raise TypeError(f"neuron_kwargs must be a dict or None, got {neuron_kwargs!r}")
    kwargs = dict(neuron_kwargs or {})
    kind = neuron_kind(neuron)
    if kind == "tpp" or (isinstance(kind, type) and issubclass(kind, TPPNode)):
        if "T" in kwargs and kwargs["T"] != T:
            raise ValueError(
                f"neuron_kwargs: T={kwargs['T']!r} contradicts T={T}: the thresholds are "
                f"calibrated for windows of {T} steps; leave T out of neuron_kwargs (it "
                "defaults to the calibration's T) or calibrate for the neurons' T")
        kwargs["T"] = T  # single-step loops of T steps work out of the box
    return NeuronFactory(neuron, **kwargs)


def _replace_calibrated(gm: fx.GraphModule, result, factory: NeuronFactory) -> fx.GraphModule:
    """Apply the bias shifts of ``result`` and replace each calibrated ReLU call by
    ``scaler(1/θ) → neuron(v_threshold=1) → scaler(s)`` (in place; ``s`` the output scale,
    ``θ`` unless the calibration chose another)."""
    apply_bias_shifts(gm, result)
    by_name = dict(zip(result.names, result.thresholds))
    nodes = activation_nodes(gm)
    if [n.name for n in nodes] != list(result.names):
        raise ValueError("the calibration does not belong to this graph (its ReLU calls differ)")
    scales = dict(zip(result.names, result.output_scales or [None] * len(result.names)))
    device = next(gm.parameters(), torch.empty(0)).device
    blocks = []
    for node in nodes:
        theta = by_name[node.name].to(device)
        scale = theta if scales[node.name] is None else scales[node.name].to(device)
        blocks.append((node, _channel_scaler(1.0 / theta, result.channel_dim), factory.create(),
                       _channel_scaler(scale, result.channel_dim)))
    return insert_spiking_blocks(gm, blocks, "tpp_calibrated")


def _calibration_kwargs(kwargs: dict, neuron, neuron_kwargs) -> dict:
    """The checked arguments of ``calibrate_for_T``; ``count`` defaults to the counting rule of
    the neurons the network will have (a TPP neuron's ``count``, ``'exact'`` for others)."""
    allowed = set(list(inspect.signature(calibrate_for_T).parameters)[3:]) - {"fuse"}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise TypeError(f"unknown calibration argument(s) {unknown}; choose from "
                        f"{sorted(allowed)}")
    kwargs = dict(kwargs)
    if "count" not in kwargs:
        kind = neuron_kind(neuron)
        tpp = kind == "tpp" or (isinstance(kind, type) and issubclass(kind, TPPNode))
        default = inspect.signature(TPPNode).parameters["count"].default
        kwargs["count"] = (neuron_kwargs or {}).get("count", default) if tpp else "exact"
    return kwargs


if not IS_LEGACY:

    class TPPCalibrationRecipe(ann2snn.ConversionRecipe):
        r"""SpikingJelly 2.x recipe: thresholds calibrated for the target ``T``
        (:func:`tpp_plugin.calibration.calibrate_for_T`) and the TPP neurons' counting rule.

        A network of exact-count TPP neurons computes the ANN with every ReLU output rounded to
        ``T`` levels of its threshold, so the recipe chooses the thresholds as post-training
        quantisation for that ``T``: per channel (default) or per layer, layer by layer with the
        earlier layers already quantised, plus bias correction folded into the conv/linear
        layers. Conv-BN pairs are fused first (``fuse_flag``). Each ReLU call becomes
        ``ChannelVoltageScaler(1/θ) → neuron(v_threshold=1) → ChannelVoltageScaler(θ)``
        (``VoltageScaler`` for a per-layer θ); a ``ReLU → MaxPool`` pair pools the neuron's
        window potentials. The input ANN is not modified.

        :param dataloader: calibration data: batches ``[N, *]`` or ``(inputs, labels)``
        :param T: the number of time steps the SNN will run (per window)
        :param neuron: ``'tpp'`` (default), ``'if'`` or a neuron class
        :param neuron_kwargs: neuron arguments, e.g. ``{'count': 'exact', 'seed': 0}``; for TPP
            ``T`` defaults to the recipe's ``T``
        :param fuse_flag: fuse conv-BN pairs before calibrating
        :param calibration: more arguments of :func:`~tpp_plugin.calibration.calibrate_for_T`
            (``granularity``, ``objective``, ``bias_correction``, ``refine``, ``channel_dim``,
            ``grid``, ``max_samples``, ``seed``, ...). ``count`` (the counting rule calibrated
            for) defaults to the TPP neurons' ``count`` (``'exact'`` for other neurons)

        After conversion the recipe keeps the calibration in ``recipe.result`` (for
        :func:`~tpp_plugin.calibration.calibration_report`).

        Shape: the converted network takes ``[T, N, *]`` in multi-step mode and ``[N, *]`` per
        call in single-step mode (window-synchronous), like any SpikingJelly conversion.

        Example::

            >>> from spikingjelly.activation_based import functional
            >>> ann = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(),
            ...                     nn.Linear(4 * 6 * 6, 3)).eval()
            >>> loader, x = [torch.rand(16, 1, 8, 8)], torch.rand(5, 1, 8, 8)
            >>> recipe = ann2snn.TPPCalibrationRecipe(loader, T=4, neuron='tpp',
            ...                                       neuron_kwargs={'count': 'exact'})
            >>> snn = ann2snn.Converter(recipe).convert(ann)
            >>> functional.set_step_mode(snn, 'm')
            >>> snn(x.unsqueeze(0).repeat(4, 1, 1, 1, 1)).mean(0).shape
            torch.Size([5, 3])
        """

        _tpp_switchable = True  # it takes neuron= itself

        def __init__(self, dataloader, T: int, neuron="tpp", neuron_kwargs: dict | None = None,
                     fuse_flag: bool = True, **calibration):
            if dataloader is not None:
                check_batches_argument(dataloader, "dataloader")
            self.dataloader = dataloader
            self.T = F.check_window(T)
            self.factory = _calibration_factory(neuron, neuron_kwargs, self.T)
            self.fuse_flag = bool(fuse_flag)
            self.calibration = _calibration_kwargs(calibration, neuron, neuron_kwargs)
            self.result = None

        def validate(self, converter):
            if self.dataloader is None:
                raise ValueError("TPPCalibrationRecipe needs a dataloader of calibration inputs")

        def before_trace(self, converter, ann):
            return copy.deepcopy(ann).eval()  # bias shifts and fusion must not touch the user's

        def after_trace(self, converter, fx_model):
            fx_model = fx_model.to(converter.device)
            return fuse_conv_bn(fx_model) if self.fuse_flag else fx_model

        def calibrate(self, converter, fx_model):
            batches = CheckedBatches(self.dataloader, None, name="dataloader")
            self.result = calibrate_for_T(fx_model, batches, self.T, fuse=False,
                                          **self.calibration)
            self.result.settings["fuse"] = self.fuse_flag  # the graph it belongs to is fused
            return fx_model

        def replace(self, converter, fx_model):
            fx_model = _replace_calibrated(fx_model, self.result, self.factory)
            return adapt_step_modes(fx_model, "TPPCalibrationRecipe", converter.device)

        def finalize(self, converter, fx_model):
            return finish(fx_model)

else:
    TPPCalibrationRecipe = None


def convert_calibrated(ann: nn.Module, dataloader, T: int, neuron="tpp",
                       neuron_kwargs: dict | None = None, fuse_flag: bool = True,
                       return_result: bool = False, **calibration):
    r"""Convert a ReLU ANN with thresholds calibrated for ``T`` time steps, on either
    SpikingJelly line (2.x: ``ann2snn.Converter(TPPCalibrationRecipe(...)).convert(ann)``;
    0.0.0.0.14: the same steps with ``torch.fx`` and the plugin's step-mode wrappers, per-channel
    scales in :class:`ChannelScaler`).

    :param ann: a ReLU network (not modified)
    :param dataloader: calibration data: batches ``[N, *]`` or ``(inputs, labels)``
    :param T: the number of time steps per window
    :param neuron: ``'tpp'`` (default), ``'if'`` or a neuron class
    :param neuron_kwargs: neuron arguments, e.g. ``{'count': 'exact'}`` (TPP's ``T`` defaults to
        ``T``)
    :param fuse_flag: fuse conv-BN pairs before calibrating
    :param return_result: also return the :class:`~tpp_plugin.calibration.CalibrationResult`
    :param calibration: more arguments of :func:`~tpp_plugin.calibration.calibrate_for_T`
        (``count`` defaults to the TPP neurons' ``count``, ``'exact'`` for other neurons)
    :return: the SNN (an ``fx.GraphModule`` in single-step mode), or ``(snn, result)``

    Example::

        >>> from spikingjelly.activation_based import functional
        >>> ann = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(),
        ...                     nn.Linear(4 * 6 * 6, 3)).eval()
        >>> loader, x = [torch.rand(16, 1, 8, 8)], torch.rand(5, 1, 8, 8)
        >>> snn = convert_calibrated(ann, loader, T=4, neuron_kwargs={'count': 'exact'})
        >>> functional.set_step_mode(snn, 'm')
        >>> snn(x.unsqueeze(0).repeat(4, 1, 1, 1, 1)).mean(0).shape
        torch.Size([5, 3])
    """
    if not IS_LEGACY:
        recipe = TPPCalibrationRecipe(dataloader, T, neuron, neuron_kwargs, fuse_flag,
                                      **calibration)
        snn = ann2snn.Converter(recipe).convert(ann)
        return (snn, recipe.result) if return_result else snn
    T = F.check_window(T)
    factory = _calibration_factory(neuron, neuron_kwargs, T)
    calibration = _calibration_kwargs(calibration, neuron, neuron_kwargs)
    if dataloader is None:
        raise ValueError("convert_calibrated needs a dataloader of calibration inputs")
    dataloader = CheckedBatches(dataloader, None, name="dataloader")
    model = copy.deepcopy(ann).eval()
    device = next(model.parameters(), torch.empty(0)).device
    with torch.no_grad():
        gm = fx.symbolic_trace(model)
        if fuse_flag:
            gm = fuse_conv_bn(gm)
        result = calibrate_for_T(gm, dataloader, T, fuse=False, **calibration)
        result.settings["fuse"] = bool(fuse_flag)
        gm = _replace_calibrated(gm, result, factory)
    snn = finish(make_step_mode_capable(gm).to(device))
    return (snn, result) if return_result else snn


def calibrated_thresholds(snn: nn.Module) -> list:
    """The output scale of each spiking layer of a converted network, in graph order — its
    threshold for SpikingJelly's recipes: the scale of the scaler after each neuron (a 0-d
    tensor, or ``[C]`` for channel-wise recipes such as LTB's and
    :class:`TPPCalibrationRecipe`'s). For comparing calibrations
    (:func:`tpp_plugin.calibration.calibration_report`).

    :param snn: a converted network (``fx.GraphModule``)
    :return: a list of tensors

    Example::

        >>> ann = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(),
        ...                     nn.Linear(4 * 6 * 6, 3)).eval()
        >>> snn = convert_calibrated(ann, [torch.rand(16, 1, 8, 8)], T=2)
        >>> [tuple(t.shape) for t in calibrated_thresholds(snn)]  # one per channel
        [(4,)]
    """
    modules = dict(snn.named_modules())
    out = []
    for node in snn.graph.nodes:
        if node.op == "call_module" and isinstance(unwrapped(modules[node.target]),
                                                   SPIKING_TYPES):
            user = next(iter(node.users))
            scaler = unwrapped(modules[user.target])
            out.append(scaler.scale.detach().clone())
    return out

