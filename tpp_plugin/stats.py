r"""Spike and energy statistics of converted spiking networks: :func:`spike_stats`.

Per spiking layer it counts the spikes, the firing rate (spikes per neuron and time step) and the
**synaptic operations** (SOPs) they cause: every spike of a neuron is one accumulate in each
neuron of the next weighted layer (``Conv``/``Linear``) it reaches, so a layer's SOPs are
``Σ_neurons spikes × fan-out``. Fan-outs are exact per neuron, computed from the next layer's
connectivity (a ``3×3`` convolution with padding reaches fewer outputs from a border pixel than
from an inner one); pooling and reshaping between the spiking layer and the next weighted layer
are followed, so a spike that an average pool spreads over a pooled pixel reaches all the
synapses of that pixel.

For the whole network it reports the SOPs per image next to the ANN's multiply-accumulates (MACs)
and an energy estimate with the 45 nm CMOS figures of Horowitz (ISSCC 2014) that conversion
papers use: ``E_AC = 0.9 pJ`` per accumulate (a spike arriving at a synapse), ``E_MAC = 4.6 pJ``
per multiply-accumulate. The SNN's weighted layers that see the analog input (before the first
spiking layer) do MACs, counted once per image (the input is constant over the window):

    ``E_SNN = E_MAC · MACs(input layers) + E_AC · SOPs``,   ``E_ANN = E_MAC · MACs(all layers)``.

Works with SpikingJelly networks (both lines; multi-step, single-step, and under
:func:`tpp_plugin.count_mode`) and snnTorch networks (sequence and time loop, and count mode),
through forward hooks on the spiking neurons and on the layers between them.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as nnF

from . import contract
from . import functional as F
from .count_domain import count_window
from .distributed import all_reduce_sum
from .functional import check_window

__all__ = ["E_AC_PJ", "E_MAC_PJ", "SpikeStats", "spike_stats", "check_energy_constant"]

#: energy of one accumulate (a synaptic operation), pJ, 45 nm CMOS
E_AC_PJ = 0.9
#: energy of one multiply-accumulate, pJ, 45 nm CMOS
E_MAC_PJ = 4.6

_CONV = contract.CONVS
_WEIGHTED = contract.WEIGHTED
_AVG_POOL = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_MAX_POOL = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)


def check_energy_constant(value, name: str) -> float:
    """Return ``value`` as a float if it is a finite energy > 0 pJ, else raise naming ``name``."""
    return F.check_positive(value, name, noun="energy", unit="pJ")


def _spiking_types() -> tuple:
    """The spiking modules whose spikes are counted (TPP and the frameworks' own neurons)."""
    return contract.types_of("spiking")


class _Layer:
    """Accumulators of one spiking layer."""

    def __init__(self, name: str, module: nn.Module):
        self.name, self.module = name, module
        self.spikes = 0  # total spikes
        self.neuron_steps = 0  # neurons × time steps × samples
        self.samples = 0  # images (multi-step, count mode) or image-steps (single-step)
        self.single_steps = 0  # single-step calls' samples
        self.shape = None  # one image's neurons
        self.per_neuron = None  # spikes of each neuron, summed over images and time

    def add(self, out: torch.Tensor, window) -> None:
        out = out.detach()
        if window is not None:  # count mode: out = count/T (times the spike scale)
            counts = (out * (window / contract.spike_scale(self.module))).round_()
            steps, batch_dims = window, 1
        else:
            counts = (out != 0).to(torch.float32)
            steps = 1
            batch_dims = 2 if contract.runs_sequences(self.module) and out.dim() >= 2 else 1
            if batch_dims == 2:
                steps = out.shape[0]
        shape = tuple(out.shape[batch_dims:])
        dims = tuple(range(batch_dims))
        if counts.dtype == torch.float32 and math.prod(counts.shape[:batch_dims]) * steps < 2**24:
            # whole counts, partial sums below 2²⁴: exact in float32, many times faster
            per_neuron = counts.sum(dim=dims).to(torch.float64)
        else:
            per_neuron = counts.sum(dim=dims, dtype=torch.float64)
        if self.per_neuron is None or self.shape != shape:
            if self.per_neuron is not None:
                raise ValueError(
                    f"spike_stats: layer {self.name!r} changed its per-image shape from "
                    f"{self.shape} to {shape}; use one spike_stats per input size"
                )
            self.shape, self.per_neuron = shape, torch.zeros(shape, dtype=torch.float64,
                                                            device=out.device)
        self.per_neuron += per_neuron
        n_spikes = int(per_neuron.sum().round().item())
        self.spikes += n_spikes
        batch = out.shape[batch_dims - 1]
        self.neuron_steps += math.prod(shape) * steps * batch
        if window is None and batch_dims == 1:
            self.single_steps += batch
        else:
            self.samples += batch


class ForwardHooks:
    """Forward hooks kept in ``self._handles``; a context manager that removes them on exit
    (what the hooks counted stays)."""

    _handles: list

    def remove(self) -> None:
        """Remove the hooks (the counts stay)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


class SpikeStats(ForwardHooks):
    r"""Forward hooks that count spikes and synaptic operations; see :func:`spike_stats`.

    :param net: the spiking network
    :param T: time steps per image, needed only for per-image figures of single-step runs
        (default: the layers' ``T``/``num_steps``)
    :param e_ac: energy per accumulate (SOP), pJ (> 0)
    :param e_mac: energy per multiply-accumulate, pJ (> 0)

    Use as a context manager (hooks are removed on exit); :meth:`summary` gives the figures,
    :meth:`all_reduce` sums the counts of all processes of a ``torch.distributed`` group.
    """

    def __init__(self, net: nn.Module, T: int | None = None, e_ac: float = E_AC_PJ,
                 e_mac: float = E_MAC_PJ):
        if not isinstance(net, nn.Module):
            raise TypeError(f"spike_stats: net must be an nn.Module, got {type(net).__name__}")
        self.e_ac = check_energy_constant(e_ac, "e_ac")
        self.e_mac = check_energy_constant(e_mac, "e_mac")
        self.T = None if T is None else check_window(T)
        spiking = _spiking_types()
        self.layers: list[_Layer] = []
        self._order: list[nn.Module] = []  # first call order of hooked modules
        self._seen: set = set()
        self._inputs: dict = {}  # weighted module -> (input shape, output shape) of one call
        self._names: dict = {}
        self._handles = []
        for name, module in net.named_modules():
            if isinstance(module, spiking):
                layer = _Layer(name, module)
                self.layers.append(layer)
                self._names[module] = name
                self._handles.append(module.register_forward_hook(self._spike_hook(layer)))
            elif not any(True for _ in module.children()):
                self._names[module] = name
                self._handles.append(module.register_forward_hook(self._order_hook))
        if not self.layers:
            raise ValueError("spike_stats: the network has no spiking neuron")

    # -- hooks -----------------------------------------------------------------------------------
    def _record(self, module, inputs, output) -> None:
        if module not in self._seen:
            self._seen.add(module)
            self._order.append(module)
        if isinstance(module, _WEIGHTED) and module not in self._inputs and inputs:
            x = inputs[0]
            y = output[0] if isinstance(output, tuple) else output
            self._inputs[module] = (tuple(x.shape), tuple(y.shape))

    def _order_hook(self, module, inputs, output) -> None:
        self._record(module, inputs, output)

    def _spike_hook(self, layer: _Layer):
        def hook(module, inputs, output):
            self._record(module, inputs, output)
            out = output[0] if isinstance(output, tuple) else output
            layer.add(out, count_window(module))

        return hook

    # -- structure -------------------------------------------------------------------------------
    def _next_weighted(self, layer: _Layer):
        """The chain of modules from ``layer`` to the next weighted layer, and that layer."""
        if layer.module not in self._order:
            return [], None
        chain = []
        spiking = {lay.module for lay in self.layers}
        for module in self._order[self._order.index(layer.module) + 1:]:
            if isinstance(module, _WEIGHTED):
                return chain, module
            if module in spiking:
                return chain, None
            chain.append(module)
        return chain, None

    @staticmethod
    def _structure(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """``module`` with every coefficient replaced by 1 (its connectivity), on ``[1, ...]``;
        ``None`` if unknown."""
        if isinstance(module, nn.Linear):
            if x[0].numel() != module.in_features:
                return None
            return x.flatten(1).sum(1, keepdim=True).expand(-1, module.out_features)
        if isinstance(module, _CONV):
            d = len(module.kernel_size)
            if x.dim() != d + 2 or x.shape[1] != module.in_channels:
                return None
            weight = torch.ones_like(module.weight, dtype=x.dtype, device=x.device)
            conv = (nnF.conv1d, nnF.conv2d, nnF.conv3d)[d - 1]
            return conv(x, weight, None, module.stride, module.padding, module.dilation,
                        module.groups)
        if isinstance(module, _AVG_POOL + _MAX_POOL):
            # a spike reaches every pooled pixel whose window holds it (max-pool: an upper bound)
            d = next(i % 3 + 1 for i, cls in enumerate(_AVG_POOL + _MAX_POOL)
                     if isinstance(module, cls))
            k = module.kernel_size
            k = (k,) * d if isinstance(k, int) else tuple(k)
            pool = (nnF.avg_pool1d, nnF.avg_pool2d, nnF.avg_pool3d)[d - 1]
            stride = module.stride or k
            dilation = getattr(module, "dilation", 1)
            if dilation not in (1, (1,) * d):
                return None
            return pool(x, k, stride, module.padding, getattr(module, "ceil_mode", False),
                        True) * math.prod(k)
        if isinstance(module, (nn.Flatten, nn.Unflatten)):
            return module(x)
        flatten = type(module).__name__ == "_StepFlatten"  # SpikingJelly 0.0.0.0.14 glue
        if flatten:
            return torch.flatten(x, module.start_dim, module.end_dim)
        return x  # element-wise: scalers, batch norm, dropout, permutations, identity

    def _fan_out(self, layer: _Layer, chain, weighted) -> tuple[torch.Tensor | None, bool]:
        """Per-neuron fan-out of ``layer`` into ``weighted`` (``None`` if there is none), and
        whether it is exact (else the average fan-out, MACs of the next layer per neuron)."""
        if weighted is None or layer.shape is None:
            return None, True
        x = torch.ones((1, *layer.shape), dtype=torch.float64, requires_grad=True)
        y = x
        with torch.enable_grad():
            for module in chain + [weighted]:
                if isinstance(module, _WEIGHTED) and module is not weighted:
                    y = None
                    break
                y = self._structure(module, y)
                if y is None:
                    break
            if y is not None and y.requires_grad:
                (grad,) = torch.autograd.grad(y.sum(), x)
                return grad[0], True
        macs = self._macs(weighted)
        average = macs / max(math.prod(layer.shape), 1)
        return torch.full(layer.shape, average, dtype=torch.float64), False

    def _macs(self, module: nn.Module) -> int:
        """Multiply-accumulates of ``module`` for one image (one time step)."""
        if module not in self._inputs:
            return 0
        _, out_shape = self._inputs[module]
        if isinstance(module, nn.Linear):
            return module.in_features * module.out_features
        d = len(module.kernel_size)
        outputs = math.prod(out_shape[-(d + 1):])
        return outputs * (module.in_channels // module.groups) * math.prod(module.kernel_size)

    # -- results ---------------------------------------------------------------------------------
    def _window(self):
        if self.T is not None:
            return self.T
        windows = {contract.window_of(lay.module) for lay in self.layers} - {None}
        return windows.pop() if len(windows) == 1 else None

    def _images(self):
        first = next((lay for lay in self.layers if lay.samples or lay.single_steps), None)
        if first is None:
            return 0
        if first.samples:
            return first.samples
        T = self._window()
        return first.single_steps / T if T else None

    def summary(self) -> dict:
        """Per-layer and whole-network figures, JSON-ready.

        ``layers``: ``[{'layer', 'neurons' (per image), 'spikes', 'spikes_per_image',
        'firing_rate' (spikes per neuron and time step), 'next_layer', 'fan_out' (mean over the
        layer's neurons), 'fan_out_exact', 'sops', 'sops_per_image'}]``; totals ``images``,
        ``spikes``, ``spikes_per_image``, ``sops``, ``sops_per_image``, ``ann_macs_per_image``,
        ``snn_macs_per_image`` (weighted layers fed by the analog input) and ``energy``
        (pJ per image for the SNN and the ANN, their ratio, and the constants used). Per-image
        figures are ``None`` when the number of images is unknown (single-step runs without a
        window length).
        """
        images = self._images()

        def per_image(value):
            return value / images if images else None

        layers, total_spikes, total_sops = [], 0, 0.0
        for layer in self.layers:
            chain, weighted = self._next_weighted(layer)
            fan_out, exact = self._fan_out(layer, chain, weighted)
            if fan_out is None or layer.per_neuron is None:
                sops, mean_fan_out = 0.0, 0.0
            else:
                sops = float((layer.per_neuron.cpu() * fan_out).sum())
                mean_fan_out = float(fan_out.mean())
            total_spikes += layer.spikes
            total_sops += sops
            layers.append({
                "layer": layer.name,
                "neurons": math.prod(layer.shape) if layer.shape is not None else 0,
                "spikes": layer.spikes,
                "spikes_per_image": per_image(layer.spikes),
                "firing_rate": layer.spikes / layer.neuron_steps if layer.neuron_steps else 0.0,
                "next_layer": self._names.get(weighted) if weighted is not None else None,
                "fan_out": mean_fan_out,
                "fan_out_exact": exact,
                "sops": sops,
                "sops_per_image": per_image(sops),
            })
        weighted_layers = [m for m in self._order if isinstance(m, _WEIGHTED)]
        first_spiking = min((self._order.index(lay.module) for lay in self.layers
                             if lay.module in self._order), default=len(self._order))
        ann_macs = sum(self._macs(m) for m in weighted_layers)
        snn_macs = sum(self._macs(m) for m in weighted_layers
                       if self._order.index(m) < first_spiking)
        sops_per_image = per_image(total_sops)
        snn_energy = (None if sops_per_image is None
                      else self.e_mac * snn_macs + self.e_ac * sops_per_image)
        ann_energy = self.e_mac * ann_macs
        return {
            "images": images,
            "layers": layers,
            "spikes": total_spikes,
            "spikes_per_image": per_image(total_spikes),
            "sops": total_sops,
            "sops_per_image": sops_per_image,
            "ann_macs_per_image": ann_macs,
            "snn_macs_per_image": snn_macs,
            "energy": {
                "e_ac_pj": self.e_ac,
                "e_mac_pj": self.e_mac,
                "snn_pj_per_image": snn_energy,
                "ann_pj_per_image": ann_energy,
                "snn_over_ann": (snn_energy / ann_energy if snn_energy is not None and ann_energy
                                 else None),
            },
        }

    def all_reduce(self, group=None) -> SpikeStats:
        """Sum the counts over all processes of a ``torch.distributed`` group (in place), so
        every rank's :meth:`summary` covers the whole data set. Every rank must have run at
        least one batch (the per-neuron maps are allocated by the first one)."""
        if not (dist.is_available() and dist.is_initialized()):
            return self
        for layer in self.layers:
            if layer.per_neuron is None:
                raise RuntimeError(
                    f"spike_stats: layer {layer.name!r} saw no batch on rank "
                    f"{dist.get_rank()}; every rank must evaluate at least one batch"
                )
            counts = all_reduce_sum([layer.spikes, layer.neuron_steps, layer.samples,
                                     layer.single_steps], group)
            layer.spikes, layer.neuron_steps, layer.samples, layer.single_steps = (
                int(round(c)) for c in counts.tolist())
            layer.per_neuron = all_reduce_sum(layer.per_neuron, group, layer.per_neuron.dtype).to(
                layer.per_neuron.device)
        return self


def spike_stats(net: nn.Module, T: int | None = None, *, e_ac: float = E_AC_PJ,
                e_mac: float = E_MAC_PJ) -> SpikeStats:
    r"""Count the spikes, firing rates and synaptic operations of a spiking network.

    Returns a :class:`SpikeStats` that hooks ``net``'s spiking neurons (SpikingJelly's neurons and
    ``TPPNode``; snnTorch's ``SpikingNeuron`` subclasses, the plugin's ``snn.TPP`` and IF
    included) and the layers between them; use it as a context manager around any number of
    forward passes, then read :meth:`SpikeStats.summary`. It counts spike trains in multi-step /
    sequence mode (``[T, N, ...]``), single steps (``[N, ...]`` per call) and the rates of
    :func:`tpp_plugin.count_mode` (``count/T`` per neuron), so the figures of a count-mode run
    are those of the full simulation it stands for.

    The *next layer* of a spiking layer is the first ``Conv``/``Linear`` called after it (in
    the order of the first forward pass); modules in between (scalers, batch norm, dropout,
    permutations, pooling, flatten) are followed. A spiking layer that feeds another spiking
    layer or the output directly has no synaptic operations.

    :param net: the spiking network
    :param T: time steps per image in single-step runs (default: the layers' own window)
    :param e_ac: energy per accumulate, pJ (default :data:`E_AC_PJ` = 0.9, 45 nm)
    :param e_mac: energy per multiply-accumulate, pJ (default :data:`E_MAC_PJ` = 4.6, 45 nm)
    :raises ValueError: if the network has no spiking neuron, or an energy constant is ≤ 0
    :return: the :class:`SpikeStats` (a context manager)

    Example::

        >>> import tpp_plugin
        >>> from tpp_plugin.adapters.snntorch import convert
        >>> ann = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
        >>> x = torch.rand(20, 4)
        >>> snn = convert(ann, [x], num_steps=4, count='exact', seed=0)
        >>> with torch.no_grad(), tpp_plugin.spike_stats(snn) as stats:
        ...     _ = snn(x.expand(4, 20, 4))                 # [T, N, ...], sequence mode
        >>> s = stats.summary()
        >>> sorted(k for k in ('spikes_per_image', 'sops_per_image', 'energy') if k in s)
        ['energy', 'sops_per_image', 'spikes_per_image']
    """
    return SpikeStats(net, T, e_ac, e_mac)
