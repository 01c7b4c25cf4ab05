r"""Building and swapping SpikingJelly neurons in converted networks: :func:`make_neuron`,
:class:`NeuronFactory` (SpikingJelly's ``neuron_factory``), :func:`swap_neurons`,
:func:`insert_permutation`."""

from __future__ import annotations

import torch
from spikingjelly.activation_based import neuron as sj_neuron
from torch import nn

from ... import functional as F
from ...convert import named_modules_of_type, set_submodule
from ...registry import NEURON_NAMES, check_neuron_name
from .graph import finish
from .neurons import TemporalPermutation, TPPNode, check_v_init

__all__ = ["make_neuron", "NeuronFactory", "swap_neurons", "insert_permutation", "neuron_kind",
           "IF_TYPES", "SPIKING_TYPES", "is_half_threshold"]


def neuron_kind(neuron) -> str | type:
    """``'tpp'`` or ``'if'`` for a name in any case, or the neuron class itself."""
    if isinstance(neuron, type) and issubclass(neuron, nn.Module):
        return neuron
    if isinstance(neuron, str):
        return check_neuron_name(neuron)
    raise TypeError(f"neuron must be a name {NEURON_NAMES} or an nn.Module class, got {neuron!r}")


def make_neuron(neuron="tpp", v_threshold: float = 1.0, **kwargs) -> nn.Module:
    """Build one spiking neuron for a converted network.

    :param neuron: ``'tpp'`` (:class:`TPPNode`), ``'if'`` (SpikingJelly's ``IFNode`` with soft
        reset — the converters' default; ``v_init=`` sets its initial potential, e.g. ``0.5``
        for θ/2), or a neuron class called as ``neuron(v_threshold=..., **kwargs)``
    :param v_threshold: threshold of the neuron (``1.0`` inside SpikingJelly's scaler pair)
    :param kwargs: neuron arguments (for ``'tpp'`` those of :class:`TPPNode`)
    """
    kind = neuron_kind(neuron)
    if kind == "tpp":
        return TPPNode(v_threshold=v_threshold, **kwargs)
    if kind == "if":
        v_init = check_v_init(kwargs.pop("v_init", 0.0))
        node = sj_neuron.IFNode(v_threshold=v_threshold, v_reset=None, **kwargs)
        if v_init:
            node.set_reset_value("v", v_init)
            node.v = v_init
        return node
    return kind(v_threshold=v_threshold, **kwargs)


class NeuronFactory:
    """A neuron factory for SpikingJelly's converters: ``factory(scale)`` and ``factory.create()``.

    Each neuron it builds gets threshold ``v_threshold`` (the converters wrap it in a
    ``VoltageScaler`` pair, so the calibration ``scale`` is not needed). With ``seed=s`` the
    ``i``-th neuron gets seed ``functional.spawn_seeds(s, i + 1)[i]``: layers draw independent,
    reproducible streams, and different ``s`` share none (see ``docs/design.md``, "Seeds").

    Example::

        >>> factory = NeuronFactory('tpp', count='exact', step_mode='m', seed=0)
        >>> a, b = factory(), factory.create()
        >>> [a.seed, b.seed] == F.spawn_seeds(0, 2)
        True
    """

    def __init__(self, neuron="tpp", v_threshold: float = 1.0, **kwargs):
        neuron_kind(neuron)
        if kwargs.get("seed") is not None:
            F.check_seed_value(kwargs["seed"], "neuron_kwargs['seed']")
        self.neuron, self.v_threshold, self.kwargs = neuron, v_threshold, kwargs
        self._built = 0

    def create(self, scale=None) -> nn.Module:
        kwargs = dict(self.kwargs)
        if kwargs.get("seed") is not None:
            kwargs["seed"] = F.spawn_seeds(kwargs["seed"], self._built + 1)[-1]
        self._built += 1
        return make_neuron(self.neuron, self.v_threshold, **kwargs)

    def __call__(self, scale=None) -> nn.Module:
        return self.create(scale)

    def __repr__(self) -> str:
        return f"NeuronFactory({self.neuron!r}, v_threshold={self.v_threshold}, **{self.kwargs})"


#: SpikingJelly neurons the converters build, which :func:`swap_neurons` replaces
IF_TYPES = (sj_neuron.IFNode,) + (
    (sj_neuron.HalfThresholdIFNode,) if hasattr(sj_neuron, "HalfThresholdIFNode") else ()
)
SPIKING_TYPES = IF_TYPES + (TPPNode,)


def is_half_threshold(node: nn.Module) -> bool:
    half = getattr(sj_neuron, "HalfThresholdIFNode", None)
    return half is not None and type(node) is half


def _threshold_of(node: nn.Module) -> float:
    th = node.v_threshold
    return float(th.item() if isinstance(th, torch.Tensor) else th)


def swap_neurons(net: nn.Module, neuron="tpp", **kwargs) -> nn.Module:
    """Replace every ``IFNode``/:class:`TPPNode` in a converted network (in place).

    Each new neuron keeps the old one's threshold and step mode. Works on any SpikingJelly line
    and on networks converted by any recipe that uses those neurons.

    :param net: converted network
    :param neuron: ``'tpp'``, ``'if'`` or a neuron class (see :func:`make_neuron`)
    :param kwargs: neuron arguments; ``seed=s`` gives the ``i``-th neuron seed
        ``functional.spawn_seeds(s, n)[i]``
    :return: ``net``

    Example::

        >>> from spikingjelly.activation_based import neuron
        >>> snn = nn.Sequential(nn.Linear(3, 2), neuron.IFNode(v_reset=None))
        >>> snn = swap_neurons(snn, 'tpp', count='exact', seed=0)
        >>> type(snn[1]).__name__, snn[1].seed == F.spawn_seeds(0, 1)[0]
        ('TPPNode', True)
    """
    found = list(named_modules_of_type(net, SPIKING_TYPES))
    if not found:
        raise ValueError("net has no IFNode or TPPNode to swap")
    seed = kwargs.pop("seed", None)
    seeds = F.spawn_seeds(seed, len(found)) if seed is not None else None
    for i, (name, old) in enumerate(found):
        node_seed = None if seed is None else seeds[i]
        set_submodule(net, name, _replacement(old, neuron, kwargs, node_seed))
    return finish(net)


def _replacement(old: nn.Module, neuron, kwargs: dict, seed) -> nn.Module:
    """The neuron that takes ``old``'s place: same threshold, step mode and max-pool; a
    half-threshold IF stays half-threshold as ``'if'`` unless ``v_init`` is given."""
    node_kwargs = {"step_mode": old.step_mode, **kwargs}
    if seed is not None:
        node_kwargs["seed"] = seed
    kind = neuron_kind(neuron)
    if kind == "if" and is_half_threshold(old):
        node_kwargs.setdefault("v_init", 0.5)
    pool = getattr(old, "pool", None)
    if pool is not None:
        if kind != "tpp":
            raise ValueError(
                "this TPPNode max-pools its window potential (a converted ReLU → MaxPool pair); "
                "only a TPP neuron can take its place: convert the ANN again for IF neurons"
            )
        node_kwargs.setdefault("pool", pool)
    return make_neuron(neuron, _threshold_of(old), **node_kwargs)


def insert_permutation(
    net: nn.Module, scope: str = "neuron", T: int | None = None, seed: int | None = None
) -> nn.Module:
    """Put a :class:`TemporalPermutation` right after every spiking neuron (in place).

    With IF neurons this is the paper's temporal-misalignment experiment.

    :param net: converted network
    :param scope: permutation scope (see :class:`TemporalPermutation`)
    :param T: window length (needed in single-step mode)
    :param seed: the ``i``-th permutation gets seed ``functional.spawn_seeds(seed, n)[i]``
    :return: ``net``

    Example::

        >>> from spikingjelly.activation_based import neuron
        >>> snn = nn.Sequential(neuron.IFNode(v_reset=None, step_mode='m'))
        >>> snn = insert_permutation(snn, seed=0)
        >>> [type(m).__name__ for m in snn[0]]
        ['IFNode', 'TemporalPermutation']
    """
    F.check_scope(scope)
    found = list(named_modules_of_type(net, SPIKING_TYPES))
    if not found:
        raise ValueError("net has no IFNode or TPPNode to follow with a permutation")
    seeds = F.spawn_seeds(seed, len(found)) if seed is not None else [None] * len(found)
    for i, (name, node) in enumerate(found):
        perm = TemporalPermutation(scope, T=T, seed=seeds[i], step_mode=node.step_mode)
        set_submodule(net, name, nn.Sequential(node, perm))
    return finish(net)


