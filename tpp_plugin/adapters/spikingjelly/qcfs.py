r"""QCFS-trained ANNs to SpikingJelly networks without calibration (threshold = λ of each
``QCFS``): :class:`QCFSRecipe` (2.x) and :func:`convert_qcfs` (both lines)."""

from __future__ import annotations

import copy

import torch
from spikingjelly.activation_based import ann2snn
from spikingjelly.activation_based.ann2snn.modules import VoltageScaler
from torch import fx, nn

from ...convert import named_modules_of_type, set_submodule
from ...qcfs import QCFS
from .building import NeuronFactory, neuron_kind
from .compat import IS_LEGACY, adapt_step_modes
from .graph import finish, make_step_mode_capable

__all__ = ["QCFSRecipe", "convert_qcfs", "insert_spiking_blocks"]


def _qcfs_default_kwargs(neuron, neuron_kwargs) -> dict:
    kwargs = dict(neuron_kwargs or {})
    if neuron_kind(neuron) == "if":
        kwargs.setdefault("v_init", 0.5)  # θ/2 in units of the (scaled) threshold
    return kwargs


def _replace_activation_nodes(gm: fx.GraphModule, thresholds: dict, factory: NeuronFactory):
    """Replace each ``call_module`` node whose target is in ``thresholds`` by
    ``VoltageScaler(1/θ) → neuron → VoltageScaler(θ)``, named like SpikingJelly's converters."""
    nodes = [n for n in gm.graph.nodes if n.op == "call_module" and n.target in thresholds]
    blocks = [(n, VoltageScaler(1.0 / thresholds[n.target]), factory.create(thresholds[n.target]),
               VoltageScaler(thresholds[n.target])) for n in nodes]
    return insert_spiking_blocks(gm, blocks, "tpp_spiking")


def insert_spiking_blocks(gm: fx.GraphModule, blocks, stem: str) -> fx.GraphModule:
    """Replace each activation node of ``blocks = [(node, scaler0, neuron, scaler1)]`` by
    ``scaler0 → neuron → scaler1``, registered as ``<parent>.<stem>_<i>.{scaler0,if_node,
    scaler1}`` like SpikingJelly's converters (in place)."""
    for count, (node, *modules) in enumerate(blocks):
        parent = node.target.rpartition(".")[0]
        prefix = f"{parent}.{stem}_{count}" if parent else f"{stem}_{count}"
        last = node
        for leaf, module in zip(("scaler0", "if_node", "scaler1"), modules):
            gm.add_submodule(f"{prefix}.{leaf}", module)
            with gm.graph.inserting_after(last):
                last = gm.graph.call_module(
                    f"{prefix}.{leaf}", args=node.args if leaf == "scaler0" else (last,))
        node.replace_all_uses_with(last)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def _qcfs_thresholds_as_relu(ann: nn.Module) -> tuple[nn.Module, dict]:
    """A copy of ``ann`` with every QCFS replaced by ``nn.ReLU`` (an FX leaf), and their λ."""
    qcfs = list(named_modules_of_type(ann, QCFS))
    if not qcfs:
        raise ValueError(
            "the model has no tpp_plugin.QCFS activation; use the rate-coding converter"
        )
    ann = copy.deepcopy(ann)
    thresholds = {}
    for name, module in qcfs:
        thresholds[name] = module.threshold
        set_submodule(ann, name, nn.ReLU())
    return ann, thresholds


if not IS_LEGACY:

    class QCFSRecipe(ann2snn.ConversionRecipe):
        """SpikingJelly 2.x recipe for QCFS-trained ANNs: each ``QCFS(λ, L)`` becomes a spiking
        neuron with threshold ``λ`` — no calibration data needed.

        :param neuron: ``'tpp'`` (default), ``'if'`` (initial potential θ/2 unless ``v_init`` is
            given) or a neuron class
        :param neuron_kwargs: neuron arguments, e.g. ``{'count': 'exact', 'seed': 0}``

        Example::

            >>> from spikingjelly.activation_based import functional
            >>> from tpp_plugin import QCFS
            >>> qcfs_ann = nn.Sequential(nn.Linear(3, 4), QCFS(L=4), nn.Linear(4, 2))
            >>> recipe = QCFSRecipe(neuron='tpp', neuron_kwargs={'count': 'exact', 'seed': 0})
            >>> snn = ann2snn.Converter(recipe).convert(qcfs_ann)
            >>> functional.set_step_mode(snn, 'm')
            >>> snn(torch.rand(4, 5, 3)).shape            # [T, N, features]
            torch.Size([4, 5, 2])
        """

        _tpp_switchable = True  # it takes neuron= itself

        def __init__(self, neuron="tpp", neuron_kwargs: dict | None = None):
            self.factory = NeuronFactory(neuron, **_qcfs_default_kwargs(neuron, neuron_kwargs))
            self._thresholds: dict = {}

        def before_trace(self, converter, ann):
            ann, self._thresholds = _qcfs_thresholds_as_relu(ann)
            return ann.eval()

        def replace(self, converter, fx_model):
            fx_model = _replace_activation_nodes(fx_model, self._thresholds, self.factory)
            return adapt_step_modes(fx_model, "QCFSRecipe", converter.device)

        def finalize(self, converter, fx_model):
            return finish(fx_model)

else:
    QCFSRecipe = None


def convert_qcfs(ann: nn.Module, neuron="tpp", neuron_kwargs: dict | None = None) -> nn.Module:
    """Convert a QCFS-trained ANN to a SpikingJelly SNN on either SpikingJelly line.

    On 2.x this runs ``ann2snn.Converter(QCFSRecipe(...)).convert(ann)``; on 0.0.0.0.14 it traces
    the model with ``torch.fx`` and wraps the stateless layers in step-mode containers, so the
    result runs in both step modes. The ANN itself is not modified.

    :param ann: model with :class:`tpp_plugin.QCFS` activations
    :param neuron: ``'tpp'`` (default), ``'if'`` or a neuron class
    :param neuron_kwargs: neuron arguments
    :return: the SNN (an ``fx.GraphModule``), in single-step mode

    Example::

        >>> from spikingjelly.activation_based import functional
        >>> from tpp_plugin import QCFS
        >>> ann = nn.Sequential(nn.Linear(3, 4), QCFS(L=4), nn.Linear(4, 2)).eval()
        >>> snn = convert_qcfs(ann, 'tpp', {'count': 'exact', 'seed': 0})
        >>> functional.set_step_mode(snn, 'm')
        >>> x, T = torch.rand(5, 3), 4
        >>> out = snn(x.unsqueeze(0).repeat(T, 1, 1)).mean(0)
        >>> torch.allclose(out, ann(x), atol=1e-5)      # exact counts == the QCFS ANN, L = T
        True
    """
    if not IS_LEGACY:
        return ann2snn.Converter(QCFSRecipe(neuron, neuron_kwargs)).convert(ann)
    factory = NeuronFactory(neuron, **_qcfs_default_kwargs(neuron, neuron_kwargs))
    relu_ann, thresholds = _qcfs_thresholds_as_relu(ann)
    device = next(relu_ann.parameters(), torch.empty(0)).device
    gm = fx.symbolic_trace(relu_ann.eval())
    gm = _replace_activation_nodes(gm, thresholds, factory)
    return finish(make_step_mode_capable(gm).to(device))


