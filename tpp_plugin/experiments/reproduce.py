r"""``python -m tpp_plugin reproduce``: the paper's experiment, accuracy against time steps ``T``.

For each (model, ANN type) it trains the ANN once (or loads it from ``--checkpoint``), converts
it through the chosen framework's adapter, and evaluates on the test set, for every ``T``:

* the ANN; for QCFS ANNs also the ANN with its levels set to ``L = T``;
* IF starting at ``v = 0`` (SpikingJelly's default neuron; for ReLU ANNs the network SpikingJelly's
  own ``RateCodingRecipe`` builds, unmodified);
* IF starting at ``θ/2``;
* IF (θ/2) followed by a temporal permutation, for each scope (``neuron``, ``sample``, ``layer``);
* TPP with ``count='bernoulli'`` (the paper's rule) and ``count='exact'``.

All spiking variants of one ANN share its thresholds: the ANN is converted once (ReLU: by
SpikingJelly's ``RateCodingRecipe`` / 0.0.0.0.14 ``Converter``; QCFS: threshold ``λ``) and the
other variants are built from that network with :func:`~tpp_plugin.adapters.spikingjelly.
swap_neurons` / :func:`~tpp_plugin.adapters.spikingjelly.insert_permutation`. Networks run in
multi-step mode (each layer processes the whole ``[T, N, ...]`` window at once), with the image as
a constant input current. ``--seeds N`` repeats the *stochastic* variants (permutation, TPP) with
N seeds — the ANN is trained once, with ``--train-seed`` — and reports mean ± std; deterministic
variants are run once.

A per-layer diagnostic records, for every spiking layer, the share of neurons (over images) whose
spike count differs from ``clamp(round(Σ_t x_t / θ), 0, T)`` — the count the ANN activation
asks for — split into over-firing and under-firing: the mechanism the paper is about.

Every variant also runs under :func:`tpp_plugin.spike_stats`: spikes and synaptic operations
(SOPs) per image, and an energy estimate against the ANN's multiply-accumulates (``--e-ac``,
``--e-mac``: pJ per accumulate and per multiply-accumulate, default 0.9 and 4.6, 45 nm).

With ``--calibration RECIPE [RECIPE ...]`` (RateCoding modes such as ``99.9%``, ``ltb``,
``tpp``) a ReLU configuration compares threshold calibrations instead, on the same ANN and
calibration images: each recipe with its own IF neuron and with TPP of every count rule, the
calibration time of each recipe and the per-layer report of the T-aware calibration
(:mod:`tpp_plugin.experiments.reproduce_calibration`).

Output: tables on the terminal, and per configuration ``OUT/<name>.json`` and ``OUT/<name>.png``
(accuracy vs ``T`` on a log-2 axis, the diagnostic, and accuracy vs spikes per image), each
written as soon as that configuration finishes.

Under ``torchrun --nproc_per_node N`` the same command runs on ``N`` processes (``gloo`` on the
CPU, ``nccl`` with one GPU each): every process evaluates its share of the test set (each image
exactly once), counts and statistics are all-reduced, rank 0 prints and writes the files, and
the JSON records ``environment.world_size`` and ``config.test_images_evaluated``; see
:mod:`tpp_plugin.evaluate` and ``docs/distributed.md``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time

import torch
from torch import nn

from ..cli import ListOnce, calibration_mode, device, nonnegative_int, positive_float, positive_int
from ..convert import check_calibration_mode
from ..distributed import (
    all_reduce_sum,
    barrier,
    broadcast_module,
    check_process_group,
    init_distributed,
    shard_indices,
    shutdown_distributed,
    world,
)
from ..qcfs import qcfs_levels
from ..stats import check_energy_constant
from . import data
from .models import (
    MODELS,
    build_model,
    framework_bars_off,
    progress_bar,
    spiking_layers,
    train_ann,
)
from .report import (
    format_accuracy_table,
    format_calibration_report,
    format_diagnostic_table,
    format_spike_table,
    plot_result,
)
from .reproduce_calibration import (
    CalibrationComparison,
    check_recipes,
    recipe_argument,
    recipe_slug,
)
from .variants import (  # noqa: F401 (evaluate_net and the sj_/snntorch_ helpers lived here)
    FRAMEWORKS,
    SCOPES,
    VARIANTS,
    FiringDiagnostic,
    _energy_constants,
    evaluate_net,
    sj_diagnostic,
    sj_rate_coding,
    snntorch_diagnostic,
)

__all__ = [
    "DEFAULT_TS",
    "SCOPES",
    "VARIANTS",
    "TensorBatches",
    "FiringDiagnostic",
    "run_config",
    "run",
    "format_accuracy_table",
    "format_diagnostic_table",
    "format_spike_table",
    "plot_result",
    "add_arguments",
    "main",
]

SCHEMA = "tpp_plugin.reproduce/1"
DEFAULT_TS = (1, 2, 4, 8, 16, 32, 64)


# ------------------------------------------------------------------------------------------------
# data and training
# ------------------------------------------------------------------------------------------------
class TensorBatches:
    """Mini-batches of tensors that already sit on the device (no ``DataLoader`` workers).

    Iterating yields ``(x, y)`` batches; with ``shuffle=True`` every pass draws a new order from
    its own generator (seeded, so runs repeat).

    :param x: inputs ``[N, ...]``
    :param y: labels ``[N]``
    :param batch_size: batch size
    :param shuffle: reshuffle on every pass
    :param seed: seed of the shuffling

    Example::

        >>> batches = TensorBatches(torch.zeros(10, 3), torch.zeros(10), 4)
        >>> [len(y) for _, y in batches]
        [4, 4, 2]
    """

    def __init__(self, x, y, batch_size: int, shuffle: bool = False, seed: int = 0):
        self.x, self.y, self.batch_size, self.shuffle = x, y, int(batch_size), shuffle
        self._generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.y) / self.batch_size)

    def __iter__(self):
        n = len(self.y)
        order = torch.randperm(n, generator=self._generator) if self.shuffle else None
        for start in range(0, n, self.batch_size):
            if order is None:
                sl = slice(start, start + self.batch_size)
                yield self.x[sl], self.y[sl]
            else:
                idx = order[start : start + self.batch_size].to(self.x.device)
                yield self.x[idx], self.y[idx]


def load_dataset(dataset: str, data_dir=None, subset=None, resize=None, seed: int = 0):
    """``(x_train, y_train, x_test, y_test)`` of ``'digits'`` or ``'fashion-mnist'``.

    :param subset: ``None`` (all), ``[n_train]`` or ``[n_train, n_test]`` (class-stratified;
        ``n_test`` defaults to ``n_train // 6``, Fashion-MNIST's ratio)
    :param resize: downscale images to ``resize × resize`` (area averaging)
    """
    if dataset == "digits":
        x_train, y_train, x_test, y_test = data.load_digits(seed=seed)
    elif dataset == "fashion-mnist":
        x_train, y_train, x_test, y_test = data.load_fashion_mnist(data_dir)
    else:
        raise ValueError(f"unknown dataset {dataset!r}; choose digits or fashion-mnist")
    if subset:
        n_train = subset[0]
        n_test = subset[1] if len(subset) > 1 else max(1, n_train // 6)
        x_train, y_train = data.subset(x_train, y_train, n_train, seed)
        x_test, y_test = data.subset(x_test, y_test, n_test, seed + 1)
    return data.resize(x_train, resize), y_train, data.resize(x_test, resize), y_test


def _checkpoint_path(args, model: str, ann: str, image_size: int, n_train: int,
                     epochs: int) -> str | None:
    """The checkpoint of one training setting: every option that changes the ANN is in the name
    (a run on another subset or with other epochs must not load it)."""
    if not args.checkpoint:
        return None
    levels = f"-L{args.L}" if ann == "qcfs" else ""
    name = (f"{args.dataset}-{model}-{ann}{levels}-{image_size}px-n{n_train}-e{epochs}"
            f"-lr{args.lr:g}-seed{args.train_seed}.pt")
    return os.path.join(args.checkpoint, name)


def get_ann(args, model: str, ann: str, x_train, y_train, device, echo) -> tuple[nn.Module, dict]:
    """Train the ANN (or load it from ``--checkpoint``); return it in eval mode and a record."""
    image_size = x_train.shape[-1]
    torch.manual_seed(args.train_seed)
    net = build_model(model, image_size, args.L if ann == "qcfs" else None).to(device)

    epochs = args.epochs if args.epochs is not None else (30 if args.dataset == "digits" else 8)
    path = _checkpoint_path(args, model, ann, image_size, len(x_train), epochs)
    found = bool(path and os.path.isfile(path))
    barrier()  # every rank looked before rank 0 may write the file
    if found:
        net.load_state_dict(torch.load(path, map_location=device))
        echo(f"loaded {path}")
        return net.eval(), {"checkpoint": path, "trained": False, "seconds": 0.0}
    start = time.perf_counter()
    batches = TensorBatches(x_train, y_train, args.train_batch_size, True, args.train_seed)
    bar = progress_bar(f"train {model} {ann}", unit="epoch")
    train_ann(net, batches, epochs, lr=args.lr, progress=bar)
    seconds = time.perf_counter() - start
    broadcast_module(net)  # every rank trained alike; on GPUs make sure they use the same ANN
    if path and world()[0] == 0:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        torch.save(net.state_dict(), path)
    return net.eval(), {"checkpoint": path, "trained": True, "epochs": epochs, "seconds": seconds}


# ------------------------------------------------------------------------------------------------
# one configuration
# ------------------------------------------------------------------------------------------------
def _eval_batch_size(args, T: int) -> int:
    return max(1, min(args.batch_size, args.batch_steps // T))


@torch.no_grad()
def _predict(ann, x, batch_size):
    return torch.cat([ann(x[s : s + batch_size]).argmax(1) for s in range(0, len(x), batch_size)])


def _accuracy(preds, y) -> float:
    """Share of ``preds == y`` over the whole test set: this rank's counts summed over ranks."""
    correct, n = all_reduce_sum([int((preds == y).sum()), len(y)], dtype=torch.int64).tolist()
    return correct / n if n else float("nan")


def _mean_std(values) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return t.mean().item(), (t.std(unbiased=False).item() if len(values) > 1 else 0.0)


def config_name(args, model: str, ann: str) -> str:
    """File stem of one configuration's outputs, e.g. ``fashion-mnist-cnn5-relu-p99.9``, and
    ``...-relu-calib-p99.9-ltb-tpp`` for ``--calibration 99.9% ltb tpp``."""
    recipes = getattr(args, "calibration", None)
    if ann == "qcfs":
        detail = f"L{args.L}"
    elif recipes:
        detail = "calib-" + "-".join(recipe_slug(r) for r in recipes)
    else:
        detail = "p" + args.mode[:-1] if args.mode.endswith("%") else args.mode
    size = f"-{args.resize}px" if args.resize else ""
    fw = "" if args.framework == "spikingjelly" else f"-{args.framework}"
    return f"{args.dataset}{size}-{model}-{ann}-{detail}{fw}"


def run_config(args, model: str, ann_type: str, dataset, device, echo=print) -> dict:
    """Train/load, convert and evaluate one (model, ANN type); return the JSON-ready result."""
    start = time.perf_counter()
    x_train, y_train, x_test, y_test = dataset
    n_test = len(y_test)
    # this rank's share of the test set (all of it in one process): every image exactly once
    shard = shard_indices(n_test).to(x_test.device)
    x_test, y_test = x_test[shard], y_test[shard]
    evaluated = int(all_reduce_sum([len(y_test)], dtype=torch.int64)[0])
    Ts = list(args.T)
    recipes = getattr(args, "calibration", None)
    ann, ann_record = get_ann(args, model, ann_type, x_train, y_train, device, echo)
    ann_preds = _predict(ann, x_test, args.batch_size)
    result = {
        "schema": SCHEMA,
        "name": config_name(args, model, ann_type),
        "config": {
            "dataset": args.dataset, "model": model, "ann": ann_type,
            "spiking_layers": spiking_layers(ann), "image_size": int(x_test.shape[-1]),
            "L": args.L if ann_type == "qcfs" else None,
            "mode": args.mode if ann_type == "relu" and not recipes else None,
            "calibration": list(recipes) if recipes else None,
            "T": Ts, "seeds": args.seeds, "train_seed": args.train_seed,
            "framework": args.framework, "device": str(device),
            "n_train": len(y_train), "n_test": n_test, "test_images_evaluated": evaluated,
            "world_size": world()[1],
            "calibration_images": args.calib_images if ann_type == "relu" else 0,
        },
        "ann": {"accuracy": _accuracy(ann_preds, y_test), **ann_record},
        "variants": {},
    }
    with_levels = {}
    if ann_type == "qcfs":
        for T in Ts:
            with qcfs_levels(ann, T):
                with_levels[T] = _predict(ann, x_test, args.batch_size)
        result["ann"]["accuracy_L_eq_T"] = [_accuracy(with_levels[T], y_test) for T in Ts]

    n_calib = min(args.calib_images, len(y_train))
    calibration = [
        (x_train[s : min(s + 256, n_calib)], y_train[s : min(s + 256, n_calib)])
        for s in range(0, n_calib, 256)
    ]
    if recipes:  # calibration recipes side by side (reproduce_calibration)
        fw = CalibrationComparison(args, ann, calibration, device, echo)
    else:
        fw = FRAMEWORKS[args.framework](args, ann, ann_type, calibration, device)
    variants = getattr(fw, "variants", VARIANTS)
    result["config"]["conversion"] = fw.conversion
    e_ac, e_mac = _energy_constants(args)
    keys = [k for k in variants if k in fw.nets]
    jobs = [(k, s, T) for k in keys for s in range(args.seeds if variants[k][1] else 1)
            for T in Ts]
    per = {k: {} for k in keys}
    agreement = {T: [] for T in Ts}
    for key, seed, T in progress_bar(f"{model} {ann_type} SNN", len(jobs), "run")(jobs):
        preds, diag, spikes = fw.evaluate(key, T, seed, x_test, y_test,
                                          _eval_batch_size(args, T))
        per[key][(seed, T)] = (_accuracy(preds, y_test), diag, spikes)
        if key == "tpp_exact" and ann_type == "qcfs":
            agreement[T].append(_accuracy(preds, with_levels[T]))
    for key in keys:
        seeds = sorted({s for s, _ in per[key]})
        acc = [[per[key][(s, T)][0] for T in Ts] for s in seeds]
        stats = [_mean_std([row[i] for row in acc]) for i in range(len(Ts))]
        layers = per[key][(seeds[0], Ts[0])][1]
        diagnostic = [
            {
                "layer": layer["layer"], "neurons_per_run": layer["neurons"],
                "over": [_mean_std([per[key][(s, T)][1][j]["over"] for s in seeds])[0]
                         for T in Ts],
                "under": [_mean_std([per[key][(s, T)][1][j]["under"] for s in seeds])[0]
                          for T in Ts],
            }
            for j, layer in enumerate(layers)
        ]
        label, stochastic = variants[key]

        def spike_mean(field, key=key, seeds=seeds):
            values = [[per[key][(s, T)][2][field] for s in seeds] for T in Ts]
            return [None if None in v else _mean_std(v)[0] for v in values]

        result["variants"][key] = {
            "label": label, "stochastic": stochastic, "seeds": seeds, "per_seed": acc,
            "mean": [m for m, _ in stats], "std": [s for _, s in stats], "diagnostic": diagnostic,
            "spikes_per_image": spike_mean("spikes_per_image"),
            "sops_per_image": spike_mean("sops_per_image"),
            "energy_pj_per_image": spike_mean("energy_pj_per_image"),
        }
        if hasattr(fw, "row_details"):
            result["variants"][key].update(fw.row_details(key))
        if "macs_per_image" not in result["ann"]:
            first = per[key][(seeds[0], Ts[0])][2]
            result["ann"]["macs_per_image"] = first["ann_macs_per_image"]
            result["ann"]["energy_pj_per_image"] = e_mac * first["ann_macs_per_image"]
            result["config"]["energy_pj"] = {"accumulate": e_ac, "multiply_accumulate": e_mac}
    result["config"]["threshold_gap_between_ranks"] = fw.threshold_gap
    if recipes:
        result["calibration"] = fw.record()
    if ann_type == "qcfs":
        agree = [min(agreement[T]) for T in Ts]
        result["oracle"] = {
            "claim": "exact-count TPP predicts like the QCFS ANN with L=T, image for image",
            "agreement_min_over_seeds": agree,
            "holds": all(a == 1.0 for a in agree),
        }
    result["seconds"] = time.perf_counter() - start
    return result


# ------------------------------------------------------------------------------------------------
# running
# ------------------------------------------------------------------------------------------------
def _diag_T(args) -> int:
    return args.diag_T if args.diag_T in args.T else (4 if 4 in args.T else min(args.T))


def run(args, echo=print) -> list[dict]:
    """Run every requested (model, ANN type) and write its JSON and PNG; return the results.

    Under ``torchrun`` every process evaluates its shard of the test set (``gloo`` on the CPU,
    ``nccl`` with one GPU per process; see :mod:`tpp_plugin.evaluate`); rank 0 prints and writes
    the files, and every rank returns the same results.
    """
    import torch.distributed as dist

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    owned = not (dist.is_available() and dist.is_initialized()) and init_distributed(device)
    with framework_bars_off():  # one bar per (model, ANN type) stage, not one per conversion
        results = _run_on(args, device, echo)
    if owned:  # the group this call created ends with it (after an error torchrun ends it)
        shutdown_distributed()
    return results


def _run_on(args, device: torch.device, echo) -> list[dict]:
    check_process_group()
    rank, size = world()
    if device.type == "cuda" and size > 1:
        device = torch.device("cuda", torch.cuda.current_device())  # this rank's GPU
    if rank != 0:
        echo = _silent
    if device.type != "cuda":
        return _run(args, device, echo)
    # full fp32 everywhere: TF32 rounding would make the SNN and the ANN round activations near a
    # level boundary differently, and break the exact-count oracle (restored afterwards)
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        return _run(args, device, echo)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _silent(*args, **kwargs) -> None:
    pass


def _run(args, device: torch.device, echo) -> list[dict]:
    start = time.perf_counter()
    x_train, y_train, x_test, y_test = load_dataset(
        args.dataset, args.data_dir, args.subset, args.resize, args.train_seed)
    dataset = tuple(t.to(device) for t in (x_train, y_train, x_test, y_test))
    echo(f"{args.dataset}: {len(y_train)} train / {len(y_test)} test images "
         f"{tuple(x_test.shape[1:])}, device {device}"
         + (f", {world()[1]} processes" if world()[1] > 1 else ""))
    writes = bool(args.out) and world()[0] == 0  # rank 0 writes the files
    if writes:
        os.makedirs(args.out, exist_ok=True)
    results = []
    for model in args.model:
        for ann_type in args.ann:
            result = run_config(args, model, ann_type, dataset, device, echo)
            result["environment"] = environment()
            results.append(result)
            echo("")
            echo(format_accuracy_table(result))
            if "calibration" in result and "tpp" in result["calibration"]["recipes"]:
                echo("")
                echo(format_calibration_report(result, _diag_T(args)))
            echo("")
            echo(format_diagnostic_table(result, _diag_T(args)))
            echo("")
            echo(format_spike_table(result))
            echo(f"({result['seconds']:.0f} s)")
            if writes:
                stem = os.path.join(args.out, result["name"])
                with open(stem + ".json", "w") as f:
                    json.dump(result, f, indent=1)
                written = [stem + ".json"]
                if not args.no_plot:
                    plot_result(result, stem + ".png", _diag_T(args))
                    written.append(stem + ".png")
                echo("wrote " + ", ".join(written))
    echo(f"\ntotal {time.perf_counter() - start:.0f} s")
    return results


def environment() -> dict:
    """What a result was measured with: Python, torch, the installed SpikingJelly and snnTorch
    (their distributions' versions; SpikingJelly has no ``__version__``), the process count and
    the GPU, if any."""
    from importlib import metadata

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "world_size": world()[1]}
    if env["world_size"] > 1:
        import torch.distributed as dist

        env["backend"] = dist.get_backend()
    for name in ("spikingjelly", "snntorch"):
        try:
            env[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------
def _energy_argument(text: str) -> float:
    import argparse

    try:
        return check_energy_constant(float(text), "the energy")
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{error} (got {text!r})") from None


def add_arguments(parser) -> None:
    """Options of ``python -m tpp_plugin reproduce`` (values checked while parsing)."""
    parser.add_argument("--dataset", choices=["digits", "fashion-mnist"], default="digits")
    parser.add_argument("--data-dir", default=data.FASHION_MNIST_DIR,
                        help="folder with the Fashion-MNIST *-ubyte.gz files")
    parser.add_argument("--model", nargs="+", choices=list(MODELS), default=["cnn5"],
                        action=ListOnce, distinct=True,
                        help="mlp8: 8 hidden layers; cnn5: 5 spiking layers; vgg: 8 spiking "
                        "layers (one or more)")
    parser.add_argument("--ann", nargs="+", choices=["relu", "qcfs"], default=["relu"],
                        action=ListOnce, distinct=True,
                        help="ReLU ANN (threshold calibration) or QCFS ANN (one or more)")
    parser.add_argument("--L", type=positive_int, default=4, help="QCFS levels")
    parser.add_argument("--mode", type=calibration_mode, default=None,
                        help="ReLU threshold calibration: max or a percentile like 99.9%% "
                        "(default 99.9%%)")
    parser.add_argument("--calibration", type=recipe_argument, nargs="+", default=None,
                        action=ListOnce, distinct=True,
                        metavar="RECIPE",
                        help="compare threshold calibrations of the ReLU ANN instead of the IF/"
                        "permutation/TPP variants, all on the same --calib-images images: a "
                        "RateCoding mode (max, 99.9%%, 99.99%%, ...: the converter's IF and TPP), "
                        "ltb (SpikingJelly 2.x's LocalThresholdBalancingRecipe: its half-"
                        "threshold IF and TPP) and/or tpp (tpp_plugin's calibration for each T: "
                        "TPP); TPP with count exact, bernoulli and unbiased, in count mode. "
                        "Records each recipe's calibration time and the tpp calibration's per-"
                        "layer report. E.g. --calibration 99.9%% ltb tpp")
    parser.add_argument("--T", type=positive_int, nargs="+", default=list(DEFAULT_TS),
                        action=ListOnce, distinct=True, help="time steps")
    parser.add_argument("--seeds", type=positive_int, default=1,
                        help="seeds of the stochastic variants (permutation, TPP)")
    parser.add_argument("--train-seed", type=nonnegative_int, default=0,
                        help="seed of ANN training")
    parser.add_argument("--framework", choices=list(FRAMEWORKS), default="spikingjelly")
    parser.add_argument("--device", type=device, default=None,
                        help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--epochs", type=nonnegative_int, default=None,
                        help="ANN training epochs (default: 30 on digits, 8 on Fashion-MNIST)")
    parser.add_argument("--lr", type=positive_float, default=2e-3)
    parser.add_argument("--train-batch-size", type=positive_int, default=None,
                        help="default: 64 on digits, 256 on Fashion-MNIST")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="evaluation images per forward (default: 4096 on cuda, 1024 on cpu)")
    parser.add_argument("--batch-steps", type=positive_int, default=None,
                        help="cap on images × T per forward (default: 65536 on cuda, 8192 on "
                        "cpu)")
    parser.add_argument("--calib-images", type=positive_int, default=2048,
                        help="training images used to calibrate ReLU thresholds (batches of 256)")
    parser.add_argument("--subset", type=positive_int, nargs="+", default=None, metavar="N",
                        action=ListOnce,
                        help="N_TRAIN [N_TEST]: class-stratified subsets for quick runs")
    parser.add_argument("--resize", type=positive_int, default=None,
                        help="downscale images to this side (e.g. 14, like the prototype)")
    parser.add_argument("--checkpoint", default=None,
                        help="folder for trained ANNs: loaded if present, else trained and saved")
    parser.add_argument("--out", default=None, help="folder for the JSON and PNG files")
    parser.add_argument("--diag-T", type=positive_int, default=4,
                        help="T of the printed diagnostic")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    # energy estimate of the spike statistics (runs under torchrun unchanged: see docs)
    parser.add_argument("--e-ac", type=_energy_argument, default=None, metavar="PJ",
                        help="energy per accumulate (SOP), pJ (default 0.9, 45 nm)")
    parser.add_argument("--e-mac", type=_energy_argument, default=None, metavar="PJ",
                        help="energy per multiply-accumulate, pJ (default 4.6, 45 nm)")


def check_arguments(args) -> None:
    """Checks across arguments (called by the command line right after parsing).

    :raises ValueError: with the message argparse reports as a usage error
    """
    if args.subset is not None and len(args.subset) > 2:
        raise ValueError(f"--subset takes N_TRAIN [N_TEST], got {len(args.subset)} values")
    if args.calibration:
        if args.mode is not None:
            raise ValueError(
                "--mode sets the thresholds of the IF/permutation/TPP comparison; with "
                "--calibration give RateCoding modes as recipes instead (e.g. --calibration "
                f"{args.mode} ltb tpp)"
            )
        check_recipes(args.calibration, args.framework, args.ann)


def _fill_defaults(args) -> None:
    args.mode = check_calibration_mode("99.9%" if args.mode is None else args.mode)
    cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if args.train_batch_size is None:
        args.train_batch_size = 64 if args.dataset == "digits" else 256
    if args.batch_size is None:
        args.batch_size = 4096 if cuda else 1024
    if args.batch_steps is None:
        args.batch_steps = 65536 if cuda else 8192
    for name in ("seeds", "L", "batch_size", "batch_steps", "train_batch_size", "calib_images"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if min(args.T) < 1:
        raise ValueError("--T values must be >= 1")


def main(args) -> int:
    """Run the reproduction from parsed command-line arguments."""
    try:
        _fill_defaults(args)
        run(args)
    except (FileNotFoundError, data.DataFileError) as exc:  # missing or unreadable data: say which
        print(f"python -m tpp_plugin reproduce: error: {exc}", file=sys.stderr)
        return 2
    return 0
