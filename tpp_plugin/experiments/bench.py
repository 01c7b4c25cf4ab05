r"""``python -m tpp_plugin bench``: the TPP neuron against the frameworks' own neurons.

For each window length ``T`` it builds one input ``x`` of shape ``[T, *shape]`` and times, in
one run and interleaved (every repeat runs every case once, round robin), the cases of the
chosen backend: the plugin's :class:`~tpp_plugin.adapters.spikingjelly.TPPNode` (both ``count``
values) and :class:`~tpp_plugin.adapters.spikingjelly.TemporalPermutation` in multi-step mode,
SpikingJelly's ``IFNode`` in multi-step mode (soft reset, as in converted networks), and two
floors: ``x.clone()`` (one pass of memory traffic) and ``torch.rand_like(x)`` (one random number
per neuron and step); the permutation layer gets a 0/1 spike train of ``x``'s shape (what it
receives in a network). It prints medians, the ratio to ``IFNode`` and to ``clone + rand_like``,
and the peak memory each call allocates (its output included).

Memory: on CUDA, ``torch.cuda.max_memory_allocated`` minus the allocation before the call; on
the CPU, the allocations and frees the PyTorch profiler records (``profile_memory=True``) in
time order, whose running total's maximum is the peak. Both count tensor memory from PyTorch's
allocator only.

``--backend cupy`` (CUDA device) times the fused kernels of :mod:`tpp_plugin.kernels.cupy` (the
TPP kernel with each of the three ``count`` values, the permutation kernel, and snnTorch's
``snn.TPP`` in sequence mode, whose firing phase runs in the same kernel) against the same
modules on the torch backend and against ``x.clone()`` (a device-to-device copy of the input:
the memory-bandwidth limit, since the kernel reads ``x`` once and writes the spikes once).

``--json FILE`` also writes the table (every case's median, ratios and peak memory, per ``T``)
and the versions to ``FILE``.

``--count-mode`` also times the converted demo CNN (sklearn digits) in the full ``[T, N, ...]``
simulation against :func:`tpp_plugin.count_mode` (bernoulli networks with both of its samplers,
``one-draw`` and ``draw-equal``).

A backend in :data:`BACKENDS` is a pair: a function ``cases(x, T, device) -> [(name, callable),
...]`` and the ratio columns to print, ``[(label, reference(name) -> case name or None)]``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import platform
import statistics
import time

import torch

import tpp_plugin

from ..cli import ListOnce, device, nonnegative_int, positive_int
from . import data, scale_bench
from .models import digits_cnn, framework_bars_off, train_ann

__all__ = ["BACKENDS", "torch_cases", "time_cases", "peak_memory", "add_arguments", "main"]

IF_CASE, CLONE_CASE, RAND_CASE = "IFNode (SpikingJelly)", "clone()", "rand_like()"


def _multi_step_call(module, inputs: torch.Tensor):
    """One timed call: reset the module's state, then run ``inputs`` through it."""
    from spikingjelly.activation_based import functional

    def run():
        functional.reset_net(module)
        return module(inputs)

    return run


def _spike_train(x: torch.Tensor) -> torch.Tensor:
    """0/1 spikes with a firing rate of about one half: what a permutation layer receives."""
    return (x > x.mean()).to(x.dtype)


def torch_cases(x: torch.Tensor, T: int, device) -> list:
    """The torch backend's timed cases: ``[(name, callable)]``, each callable runs one call."""
    from spikingjelly.activation_based import neuron

    from tpp_plugin.adapters.spikingjelly import TemporalPermutation, TPPNode

    def multi_step(module, inputs=x):
        return _multi_step_call(module.to(device), inputs)

    spikes = _spike_train(x)
    return [
        ("TPPNode bernoulli", multi_step(TPPNode(step_mode="m", seed=0))),
        ("TPPNode exact", multi_step(TPPNode(count="exact", step_mode="m", seed=0))),
        ("TemporalPermutation neuron",
         multi_step(TemporalPermutation(step_mode="m", seed=0), spikes)),
        (IF_CASE, multi_step(neuron.IFNode(v_reset=None, step_mode="m"))),
        (CLONE_CASE, x.clone),
        (RAND_CASE, lambda: torch.rand_like(x)),
    ]


TORCH_SUFFIX = " [torch]"
SNN_TPP_CASE = "snn.TPP exact (sequence)"


def cupy_cases(x: torch.Tensor, T: int, device) -> list:
    """The ``'cupy'`` backend's cases, each with its torch-backend twin, and ``clone()``."""
    if torch.device(device).type != "cuda":
        raise SystemExit("bench --backend cupy needs a CUDA device: add --device cuda")
    from tpp_plugin.adapters.snntorch import TPP
    from tpp_plugin.adapters.spikingjelly import TemporalPermutation, TPPNode

    def multi_step(module, inputs=x):
        if isinstance(module, TPP):  # snnTorch: a whole [T, N, ...] sequence per call
            module = module.to(device)
            return lambda: module(inputs)
        return _multi_step_call(module.to(device), inputs)

    spikes = _spike_train(x)

    modules = {
        "TPPNode bernoulli": lambda backend: TPPNode(step_mode="m", seed=0, backend=backend),
        "TPPNode exact": lambda backend: TPPNode(
            count="exact", step_mode="m", seed=0, backend=backend
        ),
        "TPPNode unbiased": lambda backend: TPPNode(
            count="unbiased", step_mode="m", seed=0, backend=backend
        ),
        "TemporalPermutation neuron": lambda backend: TemporalPermutation(
            step_mode="m", seed=0, backend=backend
        ),
        SNN_TPP_CASE: lambda backend: TPP(
            num_steps=T, count="exact", sequence=True, init_hidden=True, seed=0, backend=backend
        ),
    }
    def inputs(name):
        return spikes if name.startswith("TemporalPermutation") else x

    cases = [(name, multi_step(make("cupy"), inputs(name))) for name, make in modules.items()]
    cases += [
        (name + TORCH_SUFFIX, multi_step(make("torch"), inputs(name)))
        for name, make in modules.items()
    ]
    return cases + [(CLONE_CASE, x.clone)]


def _torch_twin(name: str) -> str | None:
    """The torch-backend twin of a ``cupy`` case (``None`` for the references themselves)."""
    return None if name.endswith(TORCH_SUFFIX) or name == CLONE_CASE else name + TORCH_SUFFIX


#: backend name -> (function building its cases, ratio columns: (label, name -> reference))
BACKENDS = {
    "torch": (
        torch_cases,
        [("× IFNode", lambda _: IF_CASE), ("× (clone+rand)", lambda _: (CLONE_CASE, RAND_CASE))],
    ),
    "cupy": (cupy_cases, [("× torch backend", _torch_twin), ("× clone()", lambda _: CLONE_CASE)]),
}


def _synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_cases(cases, repeats: int, device, warmup: int = 1) -> dict:
    """Median wall time (s) of each case, run interleaved: ``repeats`` rounds over all cases."""
    device = torch.device(device)
    times = {name: [] for name, _ in cases}
    with torch.no_grad():
        for round_ in range(warmup + repeats):
            for name, fn in cases:
                _synchronize(device)
                start = time.perf_counter()
                fn()
                _synchronize(device)
                if round_ >= warmup:
                    times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


@contextlib.contextmanager
def _quiet_stderr():
    """Silence the profiler's C++ start/stop chatter on file descriptor 2."""
    try:
        saved = os.dup(2)
    except OSError:  # pragma: no cover
        yield
        return
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def peak_memory(fn, device) -> int:
    """Peak bytes allocated by one call of ``fn`` above what was allocated before it."""
    device = torch.device(device)
    with torch.no_grad():
        if device.type == "cuda":
            _synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            fn()
            _synchronize(device)
            return torch.cuda.max_memory_allocated(device) - before
        from torch.profiler import ProfilerActivity, profile

        with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU],
                                      profile_memory=True) as prof:
            fn()
        live = peak = 0
        for event in sorted(prof.events(), key=lambda e: e.time_range.start):
            live += event.self_cpu_memory_usage
            peak = max(peak, live)
        return peak


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        what = torch.cuda.get_device_name(device)
    else:
        what = platform.processor() or platform.machine()
    return (f"{what}; {os.cpu_count()} CPUs, torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads")


def bench_neurons(backend: str, device, Ts, shape, repeats: int, echo=print) -> dict:
    """Time the backend's cases for every ``T``; print and return ``{T: {name: row}}``."""
    device = torch.device(device)
    build, columns = BACKENDS[backend]
    results = {}
    for T in Ts:
        x = torch.rand((T, *shape), device=device) * 2.0
        cases = build(x, T, device)
        medians = time_cases(cases, repeats, device)
        rows = {}
        echo(f"\nT={T}, x: {list(x.shape)} float32 ({x.nbytes / 2**20:.1f} MiB), "
             f"median of {repeats}")
        echo(f"{'case':<36}{'ms':>10}" + "".join(f"{label:>17}" for label, _ in columns)
             + f"{'peak MiB':>10}{'× x':>7}")
        for name, fn in cases:
            peak = peak_memory(fn, device)
            ratios = {label: _ratio(medians, name, reference(name)) for label, reference in columns}
            rows[name] = {
                "ms": 1e3 * medians[name],
                "ratios": ratios,
                "peak_mib": peak / 2**20,
                "peak_x": peak / x.nbytes,
            }
            r = rows[name]
            cells = "".join("{:>17}".format("" if v is None else f"{v:.2f}")
                            for v in ratios.values())
            echo(f"{name:<36}{r['ms']:>10.3f}{cells}{r['peak_mib']:>10.1f}{r['peak_x']:>7.2f}")
        results[T] = rows
    return results


def _ratio(medians: dict, name: str, reference) -> float | None:
    """``name``'s median over the reference's (a case name, or a tuple of names summed)."""
    if reference is None:
        return None
    names = (reference,) if isinstance(reference, str) else reference
    return medians[name] / sum(medians[n] for n in names)



def bench_count_mode(Ts, repeats: int, epochs: int, echo=print) -> dict:
    """Full simulation vs :func:`tpp_plugin.count_mode` on the converted demo CNN (SpikingJelly
    converter and snnTorch converter, float32, the whole digits test set as one batch).

    Bernoulli networks are timed with both count-mode samplers: ``one-draw`` (the default: one
    uniform per neuron, the full simulation's counts in distribution) and ``draw-equal`` (the
    full simulation's ``T`` draws per neuron). *same pred* compares the predictions of the
    draw-equal path (exact networks: of count mode) with the full simulation's, seeds reset
    before each; the accuracy columns are the full simulation's and one-draw count mode's.
    """
    from spikingjelly.activation_based import ann2snn, functional

    from ..adapters import snntorch as snt
    from ..adapters.spikingjelly import IS_LEGACY

    torch.manual_seed(0)
    x_train, y_train, x_test, y_test = data.load_digits(seed=0)
    train, _ = data.loaders(x_train, y_train, x_test, y_test, seed=0)
    ann = train_ann(digits_cnn(), train, epochs)
    calibration = [x_train[:512]]
    echo(f"\nconverted demo CNN, {len(x_test)} test images in one batch, median of {repeats}")
    echo(f"{'network':<30}{'T':>4}{'full ms':>9}{'count ms':>10}{'speed-up':>10}{'/ T':>6}"
         f"{'draw-eq ms':>12}{'speed-up':>10}{'acc full':>10}{'acc count':>11}{'same pred':>11}")
    results = {}
    for count in ("bernoulli", "exact"):
        kwargs = {"count": count, "seed": 0}
        if IS_LEGACY:  # the 0.0.0.0.14 converter iterates (images, labels), reuses the layers
            sj = ann2snn.Converter([(calibration[0], y_train[:512])], mode="99.9%",
                                   neuron="tpp", neuron_kwargs=kwargs)(copy.deepcopy(ann))
        else:
            recipe = ann2snn.RateCodingRecipe(calibration, mode="99.9%", neuron="tpp",
                                              neuron_kwargs=kwargs)
            with framework_bars_off():  # no calibration bar between the table's rows
                sj = ann2snn.Converter(recipe).convert(ann)
        functional.set_step_mode(sj, "m")
        for T in Ts:
            snn = snt.convert(ann, calibration, num_steps=T, mode="99.9%", **kwargs)
            nets = {f"SpikingJelly TPP {count}": (sj, lambda n: functional.reset_net(n)),
                    f"snnTorch TPP {count}": (snn, snt.reset)}
            for label, (net, reset) in nets.items():
                def full(net=net, reset=reset, T=T):
                    reset(net)
                    return net(x_test.unsqueeze(0).expand(T, *x_test.shape)).mean(0)

                def counted(net=net, T=T, sampler="one-draw"):
                    with tpp_plugin.count_mode(net, T, bernoulli=sampler):
                        return net(x_test)

                cases = [("full", full), ("count", counted)]
                if count == "bernoulli":
                    cases.append(("draw-equal", functools.partial(counted, sampler="draw-equal")))
                medians = time_cases(cases, repeats, "cpu")
                with torch.no_grad():
                    tpp_plugin.reseed(net)
                    reference = full().argmax(1)
                    tpp_plugin.reseed(net)
                    fast = counted().argmax(1)
                    tpp_plugin.reseed(net)
                    equal = (counted(sampler="draw-equal") if count == "bernoulli"
                             else counted()).argmax(1)
                row = {
                    "speedup": medians["full"] / medians["count"],
                    "same": (reference == equal).float().mean().item(),
                    "accuracy_full": (reference == y_test).float().mean().item(),
                    "accuracy_count": (fast == y_test).float().mean().item(),
                    **medians,
                }
                if "draw-equal" in medians:
                    row["speedup_draw_equal"] = medians["full"] / medians["draw-equal"]
                results[(label, T)] = row
                equal_cells = (f"{1e3 * medians['draw-equal']:>12.1f}"
                               f"{row['speedup_draw_equal']:>10.1f}"
                               if "draw-equal" in medians else f"{'—':>12}{'—':>10}")
                echo(f"{label:<30}{T:>4}{1e3 * medians['full']:>9.1f}"
                     f"{1e3 * medians['count']:>10.1f}{row['speedup']:>10.1f}"
                     f"{row['speedup'] / T:>6.2f}{equal_cells}"
                     f"{100 * row['accuracy_full']:>9.1f}%{100 * row['accuracy_count']:>10.1f}%"
                     f"{100 * row['same']:>10.1f}%")
    return results


def add_arguments(parser) -> None:
    """Options of ``python -m tpp_plugin bench``."""

    parser.add_argument("--backend", choices=sorted(BACKENDS), default="torch",
                        help="implementation to time (default: torch)")
    parser.add_argument("--device", type=device, default="cpu",
                        help="torch device, e.g. cpu or cuda")
    parser.add_argument("--T", type=positive_int, nargs="+", default=[4, 8, 32],
                        action=ListOnce, distinct=True,
                        help="window lengths")
    parser.add_argument("--shape", type=positive_int, nargs="+", default=[64, 64, 16, 16],
                        action=ListOnce,
                        help="shape of one time step (default: 64 64 16 16)")
    parser.add_argument("--repeats", type=positive_int, default=7,
                        help="timed rounds (median)")
    parser.add_argument("--count-mode", action="store_true",
                        help="also time the demo CNN: full simulation vs count mode")
    parser.add_argument("--epochs", type=nonnegative_int, default=5,
                        help="demo CNN training epochs")
    parser.add_argument("--json", metavar="FILE", default=None,
                        help="also write the neuron table (and the versions) to FILE as JSON")
    scale_bench.add_arguments(parser)


def main(args) -> int:
    """Run the benchmark from parsed command-line arguments."""
    try:
        import spikingjelly  # noqa: F401
    except ImportError:
        print("bench needs SpikingJelly (its IFNode is the reference): "
              "pip install 'tpp_plugin[spikingjelly]'")
        return 2
    if args.scale:
        return scale_bench.main(args)
    device = torch.device(args.device)
    print(f"python -m tpp_plugin bench --backend {args.backend} --device {device} "
          f"--T {' '.join(map(str, args.T))} --shape {' '.join(map(str, args.shape))} "
          f"--repeats {args.repeats}" + (" --count-mode" if args.count_mode else ""))
    print(f"machine: {_machine(device)}")
    results = bench_neurons(args.backend, device, args.T, args.shape, args.repeats)
    if args.json:
        write_json(args.json, args, device, results)
        print(f"wrote {args.json}")
    if args.count_mode:
        bench_count_mode(args.T, args.repeats, args.epochs)
    return 0


def write_json(path: str, args, device: torch.device, results: dict) -> None:
    """The neuron table of :func:`bench_neurons` with the run's settings and versions."""
    import json

    versions = {"torch": torch.__version__}
    if args.backend == "cupy":
        import cupy

        versions["cupy"] = cupy.__version__
    document = {
        "backend": args.backend, "device": str(device), "machine": _machine(device),
        "shape": list(args.shape), "repeats": args.repeats, "versions": versions,
        "results": {str(T): rows for T, rows in results.items()},
    }
    with open(path, "w") as f:
        json.dump(document, f, indent=1)
