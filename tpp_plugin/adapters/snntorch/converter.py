r"""ANN → snnTorch conversion (snnTorch has no converter of its own): :func:`convert` builds
an ``nn.Sequential`` (or, for models that are not plain chains, an ``fx.GraphModule``) of stock
torch layers and :class:`~tpp_plugin.adapters.snntorch.TPP` (or
:class:`~tpp_plugin.adapters.snntorch.IF`) neurons."""

from __future__ import annotations

import copy
import functools
import inspect

import torch
from torch import fx, nn

from ... import contract
from ... import functional as F
from ...calibration import CalibrationResult, apply_bias_shifts, calibrate_for_T
from ...convert import batch_inputs, calibrate_thresholds, check_calibration_mode
from ...count_domain import call_is_affine
from ...engine import graph as passes
from ...engine.window import check_streaming_mode
from ...qcfs import QCFS
from ...registry import check_neuron_name, current_default_calibration, current_default_neuron
from .common import check_backend, refuse_surrogate
from .if_neuron import IF
from .permutation import TemporalPermutation
from .time import (
    TimeFlatten,
    TimeLoop,
    WindowDelay,
    _FoldTime,
    _TimeCell,
    _TimeContext,
    _UnfoldTime,
    delayed_tpp_layers,
)
from .tpp import TPP

__all__ = ["convert", "align_time_loop"]


_LAYERS = (contract.WEIGHTED + contract.BATCH_NORMS + contract.AVG_POOLS
           + (nn.Flatten, nn.Unflatten, nn.Identity))
_MAX_POOLS = contract.MAX_POOLS
_DROPOUTS = contract.DROPOUTS
_ACTIVATIONS = (nn.ReLU, QCFS)
_RESERVED = (
    "threshold", "num_steps", "init_hidden", "output", "graded_spikes_factor", "sequence",
    "warmup_windows", "pool", "streaming",
)
_FUNCTIONAL_ACTIVATIONS = {
    torch.relu, torch.relu_, nn.functional.relu, nn.functional.relu_, nn.functional.relu6,
    nn.functional.leaky_relu, nn.functional.gelu, nn.functional.silu, torch.sigmoid,
    torch.tanh, "relu", "relu_", "sigmoid", "tanh",
}
_SUPPORTED = (
    "Linear, Conv1d/2d/3d, BatchNorm1d/2d/3d, (Adaptive)AvgPool, (Adaptive)MaxPool, Flatten, "
    "Unflatten, Identity, Dropout, and nn.ReLU / tpp_plugin.QCFS activations"
)


def _type_name(module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


class _Tracer(fx.Tracer):
    """Stop at the layers the converter knows (QCFS included); trace custom modules through."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        known = _LAYERS + _MAX_POOLS + _DROPOUTS + _ACTIVATIONS
        return isinstance(m, known) or super().is_leaf_module(m, qualname)


def _trace(ann: nn.Module) -> fx.GraphModule:
    try:
        graph = _Tracer().trace(ann)
    except Exception as error:  # noqa: BLE001 - any tracing failure: say what to do
        raise TypeError(
            f"convert: cannot trace {_type_name(ann)} with torch.fx ({type(error).__name__}: "
            f"{error}); the forward must not branch on tensor values — or pass an nn.Sequential"
        ) from error
    return fx.GraphModule(ann, graph, class_name=type(ann).__name__)


def _node_label(node: fx.Node) -> str:
    target = node.target if isinstance(node.target, str) else getattr(
        node.target, "__qualname__", str(node.target))
    return f"graph node {node.name!r} ({node.op} {target})"


def _is_max_pool(node, modules) -> bool:
    return node.op == "call_module" and isinstance(modules[node.target], _MAX_POOLS)


def _check_graph(graph: fx.Graph, modules: dict, pool_of: dict, neuron: str) -> None:
    """Refuse what the spiking net cannot compute: unknown modules anywhere; after the first
    neuron, non-affine ops on spikes and (TPP) max-pools not merged into a neuron."""
    merged = {p for pools in pool_of.values() for p in pools}
    spiking: dict = {}
    for node in graph.nodes:
        on_spikes = any(spiking.get(n, False) for n in node.all_input_nodes)
        spiking[node] = on_spikes
        if node.target in _FUNCTIONAL_ACTIVATIONS and node.op in ("call_function", "call_method"):
            raise TypeError(
                f"convert: {_node_label(node)} is an activation function, which the converter "
                "cannot turn into a neuron (it has no module to calibrate): use an nn.ReLU "
                "module (or tpp_plugin.QCFS) in the ANN's forward"
            )
        if node.op == "call_module":
            module = modules[node.target]
            if isinstance(module, _ACTIVATIONS):
                spiking[node] = True
            elif not isinstance(module, _LAYERS + _MAX_POOLS + _DROPOUTS):
                raise TypeError(
                    f"convert: cannot convert module {node.target!r} of type {_type_name(module)}"
                    f" ({_node_label(node)}); supported: {_SUPPORTED}"
                )
            elif isinstance(module, _MAX_POOLS) and neuron == "tpp" and on_spikes \
                    and node not in merged:
                raise ValueError(
                    f"convert: cannot rewrite max pooling {node.target!r} ({_node_label(node)}) "
                    "for TPP neurons: a TPP neuron max-pools its window potential exactly only "
                    "when the max-pool directly follows (or precedes) an activation whose output "
                    "nothing else uses; max-pooling spikes would not compute the ANN's max. "
                    "Move it next to an activation, use average pooling, or neuron='if'"
                )
        elif node.op in ("call_function", "call_method") and on_spikes \
                and not call_is_affine(node, spiking):
            raise TypeError(
                f"convert: {_node_label(node)} is not affine and acts on spikes; between "
                "spiking layers only affine ops (conv, linear, BatchNorm, average pooling, "
                "flatten/view/reshape, add) convert — use nn.ReLU modules for activations and "
                "nn.MaxPool modules for max pooling"
            )


def _window_of_input(node: fx.Node, pool_of: dict) -> fx.Node:
    """The node whose value a neuron integrates: the input of the max-pool before the
    activation if it has one, else the activation's input."""
    pools = pool_of.get(node, ())
    if pools and pools[0].args[0] is not node:  # max-pool → activation
        return pools[0].args[0]
    return node.args[0]


def convert(
    ann: nn.Module,
    calibration=None,
    *,
    num_steps: int,
    neuron: str | None = None,
    mode="max",
    momentum: float = 0.1,
    sequence: bool = True,
    streaming: str = "synchronous",
    permutation: str | None = None,
    **neuron_kwargs,
) -> nn.Module:
    r"""Convert a ReLU or QCFS ANN into an snnTorch network.

    Every *use* of an activation becomes its own spiking neuron (a module called twice, as the
    shared ``ReLU(inplace=True)`` of a torchvision ``BasicBlock``, becomes two neurons) with
    threshold :math:`θ` — that call's calibrated maximum for ``nn.ReLU`` (from ``calibration``
    data), :math:`λ` for :class:`tpp_plugin.QCFS` — whose spikes are scaled by :math:`θ`
    (``graded_spikes_factor=θ``), so the next layer sees :math:`θ·s_t` and a neuron firing
    :math:`n` times in :math:`T` steps stands for the activation :math:`θn/T`. The layers between
    activations are deep copies of the ANN's, in eval mode (BatchNorm uses its running
    statistics); dropout is dropped. Feed the image as a constant input current at every step;
    the output summed (or averaged) over the window is the logits.

    **Max pooling** next to an activation (``ReLU → MaxPool`` or ``MaxPool → ReLU``) becomes one
    :class:`TPP` with ``pool=`` that max-pools its window potential before firing — exact: a
    ``count='exact'`` network computes the ANN with every activation rounded to :math:`T`
    levels, max-pools included. IF neurons keep the max-pool on spikes (an approximation).

    **Structure.** An ``nn.Sequential`` of layers (nested ones allowed) gives an
    ``nn.Sequential``; any other model (residual adds, ``torch.flatten``,
    ``x.view(x.size(0), -1)``, shared modules, a Sequential of custom blocks) is traced with
    ``torch.fx`` into an ``fx.GraphModule`` of the same structure. In sequence mode the graph
    folds time into the batch (``[T, B, ...] → [T·B, ...]``), so every layer and reshape sees
    one step per sample, and the neurons unfold it. In the time loop, a residual branch that
    passes fewer TPP layers than the other is delayed by whole windows, so both meet in step;
    :func:`steps_needed` counts the TPP layers of the longest path.

    :param ann: the ANN, in eval mode: ``Linear``, ``Conv1d/2d/3d``, ``BatchNorm1d/2d/3d``,
        average and max pooling, ``Flatten``, ``Unflatten``, ``Identity``, ``Dropout`` modules
        and ``nn.ReLU`` or ``QCFS`` activations, joined by a ``nn.Sequential`` or by a
        ``forward`` that ``torch.fx`` can trace, with affine functions (add, flatten, view,
        reshape, ...) between spiking layers
    :type ann: torch.nn.Module
    :param calibration: iterable of batches (tensors or ``(x, y)``) to calibrate ReLU
        thresholds; required if the ANN has any ``nn.ReLU``
    :param num_steps: the window length :math:`T`
    :type num_steps: int
    :param neuron: ``'tpp'`` (:class:`TPP`) or ``'if'`` (:class:`IF`: ``snn.Leaky(beta=1,
        reset_mechanism='subtract')`` starting at :math:`θ/2`). Defaults to the active
        :func:`tpp_plugin.registry.default_neuron` (whose arguments then come first in
        ``neuron_kwargs``), else ``'tpp'``
    :param mode: ReLU threshold statistic: ``'max'``, a percentile like ``'99.9%'``, or a
        fraction of the max; or ``'tpp'``: per-channel thresholds, bias corrections and refitted
        weights chosen for ``num_steps`` and the neurons' ``count``
        (:func:`tpp_plugin.calibration.calibrate_for_T`, docs/calibration.md); or
        the :class:`~tpp_plugin.calibration.CalibrationResult` of an earlier
        ``calibrate_for_T(ann, calibration, num_steps, fuse=False)``, to build several networks
        (e.g. one per ``count``) from one calibration. Defaults to ``'max'``
    :param momentum: moving-average momentum of the statistic across batches
    :param sequence: If `True` (default) the net takes whole sequences ``[T, B, ...]``; if
        `False` it takes one time step ``[B, ...]`` per call (snnTorch's time loop,
        ``for step in range(num_steps)``), as ``streaming`` says
    :param streaming: the time loop's behaviour (``sequence=False``): ``'synchronous'``
        (default) — the input is constant within a window of ``num_steps`` calls (rate coding),
        and step ``t`` of the loop returns exactly step ``t`` of sequence mode, with the same
        random numbers and no delay (a :class:`TimeLoop` around the sequence-mode net; a
        changed input inside a window raises); ``'delayed'`` — causal, for input that changes:
        every TPP layer delays by one window, run :func:`steps_needed` steps and read the last
        ``num_steps`` (TPP layers stay silent until their input is valid, and draw the same
        random numbers as in sequence mode)
    :param permutation: add a :class:`TemporalPermutation` of this scope after every neuron
        (sequence mode only). Defaults to None
    :param neuron_kwargs: more arguments of the neuron, e.g. ``count='exact'``, ``seed=0``
        (each TPP layer and permutation gets its own seed drawn from it), ``generator`` or
        ``backend='cupy'`` (:class:`TPP`'s CUDA kernel for the firing phase, on every TPP layer;
        ``'torch'`` is the default and the only implementation of ``neuron='if'``)
    :return: the spiking network, in eval mode, on the ANN's device and dtype
    :rtype: torch.nn.Sequential or torch.fx.GraphModule
    :raises TypeError: naming the module or graph node that cannot be converted (an unknown
        module, a non-affine function on spikes, a forward ``torch.fx`` cannot trace)
    :raises ValueError: naming a max-pool that a TPP network cannot compute (not next to an
        activation, or that activation's output used elsewhere too)

    Example::

        import snntorch.functional as SF
        from tpp_plugin.adapters.snntorch import convert, reset, steps_needed
        from tpp_plugin.experiments.models import resnet, train_ann

        ann = train_ann(resnet(image_size=8), train_loader)       # residual, not Sequential
        num_steps = 4
        snn_net = convert(ann, calibration=[x_train[:512]], num_steps=num_steps, mode='99.9%')
        with torch.no_grad():                                      # an fx.GraphModule
            out = snn_net(images.expand(num_steps, *images.shape))  # [T, B, classes]
        acc = SF.accuracy_rate(out, labels)

        loop_net = convert(ann, [x_train[:512]], num_steps=num_steps, sequence=False)
        reset(loop_net)
        with torch.no_grad():                 # the tutorial loop: num_steps calls, no delay
            rec = [loop_net(images) for _ in range(num_steps)]
        logits = torch.stack(rec).mean(0)     # == sequence mode's, for the same seeds
    """
    if not isinstance(ann, nn.Module):
        raise TypeError(f"convert needs an nn.Module, got {type(ann).__name__}")
    num_steps = F.check_window(num_steps, "num_steps")
    if neuron is None:
        default = current_default_neuron()
        neuron, default_kwargs = default if default is not None else ("tpp", {})
        neuron_kwargs = {**default_kwargs, **neuron_kwargs}
        if current_default_calibration() is not None and not (
                isinstance(mode, CalibrationResult)
                or (isinstance(mode, str) and mode.lower() == "tpp")):
            raise ValueError(  # (run --calibrate replaces SpikingJelly's threshold recipes)
                f"tpp_plugin --calibrate: cannot replace snnTorch convert(mode={mode!r}): the "
                "plugin's snnTorch converter calibrates for T itself with mode='tpp' and "
                "num_steps=T; pass that, or run without --calibrate")
    neuron = check_neuron_name(neuron)
    streaming = check_streaming_mode(streaming)
    if permutation is not None:
        F.check_scope(permutation)
        if not sequence and streaming == "delayed":
            raise ValueError("permutation needs whole windows: sequence=True, or the "
                             "synchronous time loop (streaming='synchronous')")
    for key in _RESERVED:
        if key in neuron_kwargs:
            raise TypeError(f"convert sets the neuron's {key!r} itself; do not pass it")
    if neuron == "tpp":
        refuse_surrogate(neuron_kwargs.get("spike_grad"), neuron_kwargs.get("surrogate_disable"))
        check_backend(neuron_kwargs.get("backend", "torch"))
    elif neuron_kwargs.get("backend", "torch") != "torch":
        raise ValueError(
            f"convert: backend={neuron_kwargs['backend']!r} is an implementation of the TPP "
            "neuron; the IF neuron (snn.Leaky) has only snnTorch's: drop backend= or use "
            "neuron='tpp'"
        )
    else:
        neuron_kwargs.pop("backend", None)
    seed = neuron_kwargs.pop("seed", None)
    generator = neuron_kwargs.pop("generator", None)
    F.check_seed(seed, generator)
    calibrated = None
    if isinstance(mode, CalibrationResult):  # thresholds chosen for num_steps, earlier
        calibrated = _check_calibration_result(mode, num_steps, calibration)
        ann = apply_bias_shifts(copy.deepcopy(ann), calibrated)
    elif isinstance(mode, str) and mode.lower() == "tpp":  # thresholds chosen for num_steps
        if calibration is None:
            raise ValueError("convert: mode='tpp' calibrates for num_steps: pass calibration=")
        # calibrated for the neurons' counting rule ('exact' for IF)
        count = (neuron_kwargs.get("count", inspect.signature(TPP).parameters["count"].default)
                 if neuron == "tpp" else "exact")
        calibrated = calibrate_for_T(ann, calibration, num_steps, fuse=False, count=count)
        ann = apply_bias_shifts(copy.deepcopy(ann), calibrated)
    else:
        mode = check_calibration_mode(mode)

    traced = _trace(ann)
    graph, modules = traced.graph, dict(traced.named_modules())
    activations = [n for n in graph.nodes
                   if n.op == "call_module" and isinstance(modules[n.target], _ACTIVATIONS)]
    pool_of = passes.pair_max_pools(
        activations, lambda node: _is_max_pool(node, modules)) if neuron == "tpp" else {}
    _check_graph(graph, modules, pool_of, neuron)

    # thresholds, one per activation call
    calls, uses = [], {}
    for node in activations:
        calls.append((modules[node.target], uses.get(node.target, 0)))
        uses[node.target] = uses.get(node.target, 0) + 1
    relu_calls = [i for i, (m, _) in enumerate(calls) if isinstance(m, nn.ReLU)]
    thresholds = [m.threshold if isinstance(m, QCFS) else None for m, _ in calls]
    scales = list(thresholds)  # graded_spikes_factor: the threshold, or a calibrated step
    if calibrated is not None:
        _use_calibration(calibrated, [activations[i] for i in relu_calls], relu_calls,
                         thresholds, scales, ann, calibration)
    elif relu_calls:
        if calibration is None:
            raise ValueError(
                "convert: the ANN has nn.ReLU activations, whose thresholds come from "
                "calibration data: pass calibration=<data loader> (or train with tpp_plugin.QCFS)"
            )
        values = calibrate_thresholds(
            ann, calibration, [calls[i] for i in relu_calls], mode, momentum,
            names=[f"convert: activation {activations[i].name!r}" for i in relu_calls])
        for i, th in zip(relu_calls, values):
            thresholds[i] = scales[i] = th

    ref = next(iter(ann.parameters()), None)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    n_random = len(activations) * (2 if permutation else 1)
    seeds = iter(
        F.spawn_seeds(seed, n_random)
        if seed is not None
        else [None] * n_random
    )

    def random_source():  # one seed per random layer, drawn from `seed`; or the shared generator
        return dict(seed=next(seeds), generator=generator)

    # the delayed time loop steps each layer; every other mode builds the sequence-mode net
    looped = not sequence and streaming == "delayed"

    def make_cell(i: int, depth: int) -> list:
        """The neuron of activation call ``i`` (and its permutation), ``depth`` TPP layers deep."""
        theta = torch.as_tensor(thresholds[i], dtype=dtype, device=device)
        scale = torch.as_tensor(scales[i], dtype=dtype, device=device).clone()
        common = dict(threshold=theta, graded_spikes_factor=scale, init_hidden=True)
        if neuron == "tpp":
            pools = [_layer_copy(modules[p.target]) for p in pool_of.get(activations[i], ())]
            pool = nn.Sequential(*pools) if len(pools) > 1 else (pools[0] if pools else None)
            # delayed loop: the layer behind `depth` TPP layers sees valid input from window
            # depth+1 (a graph's layers get theirs from align_time_loop)
            cell = TPP(num_steps=num_steps, sequence=not looped, pool=pool,
                       streaming="delayed" if looped else "synchronous",
                       warmup_windows=depth if looped else 0, **common, **random_source(),
                       **neuron_kwargs)
        else:
            next(seeds)
            cell = IF(sequence=not looped, **common, **neuron_kwargs)
        cells = [cell.to(device=device, dtype=dtype)]
        if permutation:
            cells.append(TemporalPermutation(permutation, **random_source()))
        return cells

    chain = isinstance(ann, nn.Sequential) and _is_chain(graph)
    build = _build_sequential if chain else _build_graph
    net = build(traced, activations, pool_of, make_cell, neuron, num_steps, not looped)
    if looped and not chain and neuron == "tpp":
        align_time_loop(net, num_steps)
    if not sequence and not looped:
        net = TimeLoop(net, num_steps)
    return net.eval()


def _check_calibration_result(result, num_steps: int, calibration):
    """A :class:`~tpp_plugin.calibration.CalibrationResult` passed as ``mode``: calibrated for
    ``num_steps``, on the unfused ANN (this converter keeps batch norms), with ``calibration``
    data at hand (one batch gives the activations' shapes)."""
    if result.T != num_steps:
        raise ValueError(f"convert: the calibration was made for T={result.T}, but "
                         f"num_steps={num_steps}; calibrate for the window the network runs")
    if result.settings.get("fuse", False):
        raise ValueError("convert: the calibration folded batch norms into the convolutions "
                         "(fuse=True), which this converter keeps: calibrate with fuse=False")
    if calibration is None:
        raise ValueError("convert: with a calibration result as mode, pass calibration= too "
                         "(one batch gives the activations' shapes)")
    return result


def _use_calibration(result, nodes, relu_calls, thresholds, scales, ann, calibration) -> None:
    """Put a :func:`tpp_plugin.calibration.calibrate_for_T` result into the per-call lists:
    per-channel values shaped to broadcast over each call's output ``[B, C, *spatial]``."""
    if list(result.names) != [n.name for n in nodes]:
        raise RuntimeError(
            f"convert: the calibration's ReLU calls {list(result.names)} do not match the "
            f"converter's {[n.name for n in nodes]}"
        )
    ranks = _output_ranks(ann, calibration, nodes)
    steps = result.output_scales or result.thresholds
    for j, i in enumerate(relu_calls):
        def shaped(t, rank=ranks[j]):
            t = torch.as_tensor(t)
            return t.reshape(-1, *[1] * (rank - 2)) if t.dim() == 1 else t

        thresholds[i], scales[i] = shaped(result.thresholds[j]), shaped(steps[j])


@torch.no_grad()
def _output_ranks(ann: nn.Module, calibration, nodes) -> list:
    """The number of dimensions of each activation call's output, from one calibration batch."""
    modules = [ann.get_submodule(n.target) for n in nodes]
    ranks, seen = [], {}
    wanted = {(id(m), k) for m, k in _call_keys(modules)}

    def hook(module, _inputs, output):
        k = seen.get(id(module), 0)
        seen[id(module)] = k + 1
        if (id(module), k) in wanted:
            ranks.append(output.dim())

    handles = [m.register_forward_hook(hook) for m in set(modules)]
    try:
        ann(batch_inputs(next(iter(calibration))))
    finally:
        for h in handles:
            h.remove()
    return ranks


def _call_keys(modules) -> list:
    """``(module, k)``: the ``k``-th call of each module, in call order."""
    count: dict = {}
    keys = []
    for m in modules:
        keys.append((m, count.get(id(m), 0)))
        count[id(m)] = count.get(id(m), 0) + 1
    return keys


def _is_chain(graph: fx.Graph) -> bool:
    """Whether the graph is one input through a chain of modules (a Sequential of layers, not
    of custom blocks with their own forward)."""
    previous = None
    for node in graph.nodes:
        if node.op == "placeholder":
            if previous is not None:
                return False
        elif node.op not in ("call_module", "output") or node.all_input_nodes != [previous]:
            return False
        previous = node
    return True


def _layer_copy(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module).eval()


def _build_sequential(traced, activations, pool_of, make_cell, neuron, num_steps, sequence):
    """The graph of an ``nn.Sequential`` is a chain: emit an ``nn.Sequential`` again."""
    modules = dict(traced.named_modules())
    merged = {p for pools in pool_of.values() for p in pools}
    index = {n: i for i, n in enumerate(activations)}
    layers, depth = [], 0
    for node in traced.graph.nodes:
        if node.op != "call_module" or node in merged:
            continue
        module = modules[node.target]
        if isinstance(module, _DROPOUTS):
            continue
        if node in index:
            layers += make_cell(index[node], depth)
            depth += neuron == "tpp"
        else:
            layers.append(TimeFlatten(_layer_copy(module)) if sequence else _layer_copy(module))
    return nn.Sequential(*layers)


def _build_graph(traced, activations, pool_of, make_cell, neuron, num_steps, sequence):
    """Any traced model: an ``fx.GraphModule`` with the same structure (see :func:`convert`)."""
    modules = dict(traced.named_modules())
    merged = {p for pools in pool_of.values() for p in pools}
    index = {n: i for i, n in enumerate(activations)}
    graph, root, env = fx.Graph(), {}, {}
    context = _TimeContext()
    names = set()  # the names the kept layers and attributes take, and their parents'
    for node in traced.graph.nodes:
        kept = node.op == "get_attr" or (
            node.op == "call_module" and node not in merged and node not in index
            and not isinstance(modules[node.target], _DROPOUTS))
        if kept:
            parts = node.target.split(".")
            names |= {".".join(parts[: i + 1]) for i in range(len(parts))}

    def fresh(name: str) -> str:
        candidate, k = name, 0
        while candidate in names or candidate in root:
            k += 1
            candidate = f"{name}_{k}"
        names.add(candidate)
        return candidate

    def add_module(name: str, module: nn.Module, args, kwargs=None) -> fx.Node:
        if name not in root:
            root[name] = module
        return graph.call_module(name, args, kwargs or {})

    def mapped(arg):
        return fx.node.map_arg(arg, env.__getitem__)

    for node in traced.graph.nodes:
        if node.op == "placeholder":
            new = graph.node_copy(node)
            if sequence:
                new = add_module(fresh("fold_time"), _FoldTime(context), (new,))
            env[node] = new
        elif node.op == "get_attr":
            new = graph.node_copy(node)
            root[node.target] = copy.deepcopy(_fetch(traced, node.target))
            env[node] = new
        elif node.op == "call_module" and node in merged:
            continue  # part of a neuron
        elif node.op == "call_module" and isinstance(modules[node.target], _DROPOUTS):
            env[node] = env[node.args[0]]
        elif node.op == "call_module" and node in index:
            (arg,) = mapped((_window_of_input(node, pool_of),))
            cells = make_cell(index[node], 0)
            cell = cells[0] if len(cells) == 1 else nn.Sequential(*cells)
            new = add_module(fresh(node.name), _TimeCell(cell, context) if sequence else cell,
                             (arg,))
            env[node] = new
            for pool in pool_of.get(node, ()):
                if pool.args[0] is node:
                    env[pool] = new  # activation → max-pool: the pool's users read the neuron
        elif node.op == "call_module":
            args, kwargs = mapped((node.args, node.kwargs))
            if node.target not in root:
                root[node.target] = _layer_copy(modules[node.target])
            new = graph.call_module(node.target, args, kwargs)
            env[node] = new
        elif node.op in ("call_function", "call_method"):
            args, kwargs = mapped((node.args, node.kwargs))
            new = graph.create_node(node.op, node.target, args, kwargs, node.name)
            env[node] = new
        elif node.op == "output":
            result = mapped(node.args[0])
            if sequence:
                result = fx.node.map_arg(result, functools.partial(
                    _unfold_output, add_module, fresh("unfold_time"), _UnfoldTime(context)))
            graph.output(result)
    net = fx.GraphModule(root, graph, class_name=f"Spiking{type(traced).__name__.lstrip('_')}")
    return net


def _delay_windows(module: nn.Module) -> int:
    """Windows of delay of a module in the delayed time loop (its TPP layers and delays)."""
    return delayed_tpp_layers(module) + sum(m.windows for m in module.modules()
                                      if isinstance(m, WindowDelay))


def align_time_loop(net: fx.GraphModule, num_steps: int) -> fx.GraphModule:
    """A delayed time-loop graph (in place): branches that pass fewer TPP layers are delayed to
    meet the others in step (:func:`tpp_plugin.engine.align_delays`), and each TPP layer stays
    silent for the windows before its input is valid (``warmup_windows``: the windows of delay
    on the longest path to it)."""
    passes.align_delays(net, _delay_windows, lambda w: WindowDelay(w, num_steps), stem="delay")
    depth = passes.delay_depths(net, _delay_windows)
    for node in net.graph.nodes:
        if node.op == "call_module":
            module = net.get_submodule(node.target)
            for m in module.modules():
                if isinstance(m, TPP) and m.streaming == "delayed":
                    m.warmup_windows = depth[node] - _delay_windows(module)
    return net


def _unfold_output(add_module, name, unfold, node):
    return add_module(name, unfold, (node,))


def _fetch(module: nn.Module, target: str):
    obj = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
