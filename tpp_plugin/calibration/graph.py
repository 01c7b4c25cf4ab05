"""The traced graph of the model being calibrated: tracing, its ReLU calls, conv-BN fusion,
the layers whose biases carry the bias shifts, and putting a calibration's weights and shifts
into a model (:func:`apply_bias_shifts`)."""

from __future__ import annotations

import operator

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..convert import set_submodule
from .result import CalibrationResult

__all__ = [
    "AFFINE_WITH_BIAS",
    "BATCH_NORMS",
    "ADDS",
    "trace",
    "activation_nodes",
    "bias_target",
    "foldable_producer",
    "is_bias_target_module",
    "fuse_conv_bn",
    "bias_shift_targets",
    "apply_bias_shifts",
]

#: the layers whose bias can carry a shift (a conv or linear layer without one gets one)
AFFINE_WITH_BIAS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
#: batch norms (an affine one carries a shift in its bias)
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
#: the targets of a graph node that adds two values (a residual sum)
ADDS = (operator.add, torch.add, "add")


def trace(model: nn.Module) -> fx.GraphModule:
    """``model`` traced with ``torch.fx`` (itself if it already is a graph); a ``TypeError``
    naming the cause if it cannot be traced."""
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


def bias_target(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The module whose bias can carry a shift of the ReLU call ``node``'s input: the conv,
    linear or (affine) batch norm producing it, also through an ``add`` (a residual sum), used
    by nothing else. ``None`` if there is none."""
    return foldable_producer(gm, node.args[0] if node.args else None)


def foldable_producer(gm: fx.GraphModule, src) -> str | None:
    """The module behind graph value ``src`` whose bias can shift it (see :func:`bias_target`)."""
    modules = dict(gm.named_modules())
    for _ in range(8):
        if not isinstance(src, fx.Node) or len(src.users) != 1:
            return None
        if src.op == "call_module":
            module = modules.get(src.target)
            if isinstance(module, AFFINE_WITH_BIAS) or (
                    isinstance(module, BATCH_NORMS) and module.affine):
                return src.target
            return None
        if src.op in ("call_function", "call_method") and src.target in ADDS:
            candidates = [a for a in src.args if isinstance(a, fx.Node)]
            src = next((a for a in candidates if a.op == "call_module"
                        and is_bias_target_module(modules.get(a.target)) and len(a.users) == 1),
                       None)
            continue
        return None
    return None


def is_bias_target_module(module) -> bool:
    """Whether ``module``'s bias can carry a shift: a conv/linear layer or an affine batch
    norm."""
    return isinstance(module, AFFINE_WITH_BIAS) or (
        isinstance(module, BATCH_NORMS) and module.affine)


def fuse_conv_bn(gm: fx.GraphModule) -> fx.GraphModule:
    """Fold every batch norm that directly follows a convolution (used only by it) into the
    convolution, as SpikingJelly's converters do with ``fuse_flag=True`` (in place; eval mode).

    :param gm: a traced model (``fx.GraphModule``)
    :return: ``gm``
    """
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
        set_submodule(gm, src.target, fuse_conv_bn_eval(conv.eval(), bn.eval()))
        modules = dict(gm.named_modules())
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def bias_shift_targets(result: CalibrationResult) -> list:
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
    for name, shift in bias_shift_targets(result):
        module = model.get_submodule(name)
        if isinstance(module, BATCH_NORMS):
            module.bias.data += shift.to(module.bias)
            continue
        if module.bias is None:
            module.bias = nn.Parameter(torch.zeros(
                module.out_features if isinstance(module, nn.Linear) else module.out_channels,
                dtype=module.weight.dtype, device=module.weight.device))
        module.bias.data += shift.to(module.bias)
    return model
