r"""``python -m tpp_plugin demo``: the plugin's headline on sklearn digits, in seconds on a CPU.

Trains a small ReLU CNN and a small QCFS CNN, converts the ReLU CNN with SpikingJelly's own
``RateCodingRecipe`` (default IF neuron vs ``neuron='tpp'``) and the QCFS CNN with the QCFS path,
and prints accuracy against the number of time steps ``T``.
"""

from __future__ import annotations

import time

import torch

from ..cli import ListOnce, nonnegative_int, positive_int, seed_int
from ..qcfs import qcfs_levels
from . import data
from .models import ann_accuracy, digits_cnn, framework_bars_off, progress_bar, train_ann

__all__ = ["run_demo", "spikingjelly_accuracy", "snntorch_accuracy", "format_table"]

DEFAULT_TS = (1, 2, 4, 8, 16, 32)


@torch.no_grad()
def spikingjelly_accuracy(snn, loader, T: int) -> float:
    """Accuracy of a converted SpikingJelly network run for ``T`` steps in multi-step mode, with
    the image as a constant input current (direct encoding) and the output averaged over time."""
    from spikingjelly.activation_based import functional

    functional.set_step_mode(snn, "m")
    correct = total = 0
    for x, y in loader:
        functional.reset_net(snn)
        out = snn(x.unsqueeze(0).expand(T, *x.shape)).mean(0)
        correct += (out.argmax(1) == y).sum().item()
        total += len(y)
    functional.reset_net(snn)
    return correct / total


@torch.no_grad()
def snntorch_accuracy(snn, loader, T: int) -> float:
    """Accuracy of a network from :func:`tpp_plugin.adapters.snntorch.convert` (sequence mode)
    run for ``T`` steps with the image as a constant input current."""
    from ..adapters.snntorch import reset

    correct = total = 0
    for x, y in loader:
        reset(snn)
        out = snn(x.unsqueeze(0).expand(T, *x.shape)).mean(0)
        correct += (out.argmax(1) == y).sum().item()
        total += len(y)
    return correct / total


def format_table(title: str, rows: dict, Ts) -> str:
    """Render ``{label: [acc per T]}`` (accuracies in [0, 1]) as a fixed-width text table."""
    width = max(len(k) for k in rows) + 2
    head = f"{'':<{width}}" + "".join(f"{f'T={T}':>8}" for T in Ts)
    lines = [title, head, "-" * len(head)]
    for label, accs in rows.items():
        cells = "".join(f"{100 * a:8.1f}" for a in accs)
        lines.append(f"{label:<{width}}{cells}")
    return "\n".join(lines)


def _train_models(epochs, seed, levels):
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = data.load_digits(seed=seed)
    train, test = data.loaders(x_train, y_train, x_test, y_test, seed=seed)
    relu_bar, qcfs_bar = (progress_bar(f"{name} CNN", unit="epoch") for name in ("ReLU", "QCFS"))
    relu_ann = train_ann(digits_cnn(), train, epochs, progress=relu_bar)
    qcfs_ann = train_ann(digits_cnn(qcfs_levels=levels), train, epochs, progress=qcfs_bar)
    return train, test, relu_ann, qcfs_ann


def _report(tables: dict, Ts, n_test: int, start: float, echo) -> dict:
    """Print the ReLU and QCFS tables; return them as ``{'T', 'relu', 'qcfs'}``."""
    for title, rows in tables.items():
        echo("")
        echo(format_table(f"{title}, test accuracy %", rows, Ts))
    echo(f"\nsklearn digits, {n_test} test images; {time.perf_counter() - start:.0f} s")
    relu_rows, qcfs_rows = tables.values()
    return {"T": list(Ts), "relu": relu_rows, "qcfs": qcfs_rows}


def _fill_rows(rows: dict, jobs: dict, stage: str) -> dict:
    """``rows[label] = job()`` for every ``(label, job)`` of ``jobs``, under one progress bar
    for the whole stage (none when stderr is not a terminal) and with the converters' own
    per-conversion bars silenced."""
    with framework_bars_off():
        for label, job in progress_bar(stage, total=len(jobs), unit="row")(jobs.items()):
            rows[label] = job()
    return rows


def _qcfs_reference_rows(qcfs_ann, test, Ts, levels) -> dict:
    rows = {f"ANN (QCFS, L={levels})": [ann_accuracy(qcfs_ann, test)] * len(Ts)}
    with_levels = []
    for T in Ts:
        with qcfs_levels(qcfs_ann, T):
            with_levels.append(ann_accuracy(qcfs_ann, test))
    rows["ANN with L=T"] = with_levels
    return rows


def run_demo(
    Ts=DEFAULT_TS, epochs: int = 30, seed: int = 0, levels: int = 4, echo=print,
    framework: str = "spikingjelly",
) -> dict:
    """Run the demo and return ``{'T': Ts, 'relu': {...}, 'qcfs': {...}}`` accuracy tables.

    Progress goes to stderr as one bar per stage (training each ANN, each table), and only when
    stderr is a terminal; the tables go to ``echo``."""
    if framework == "snntorch":
        return _run_snntorch_demo(Ts, epochs, seed, levels, echo)
    if framework != "spikingjelly":
        raise ValueError(f"framework must be 'spikingjelly' or 'snntorch', got {framework!r}")
    from spikingjelly.activation_based import ann2snn

    from ..adapters.spikingjelly import IS_LEGACY, convert_calibrated, convert_qcfs

    start = time.perf_counter()
    train, test, relu_ann, qcfs_ann = _train_models(epochs, seed, levels)

    def convert_relu(**hook):
        if IS_LEGACY:
            return ann2snn.Converter(train, mode="99.9%", **hook)(relu_ann)
        recipe = ann2snn.RateCodingRecipe(train, mode="99.9%", **hook)
        return ann2snn.Converter(recipe).convert(relu_ann)

    def convert_ltb(**hook):
        return ann2snn.Converter(ann2snn.LocalThresholdBalancingRecipe(train, **hook)).convert(
            relu_ann)

    def row(convert):  # one conversion, evaluated at every T
        snn = convert()
        return [spikingjelly_accuracy(snn, test, T) for T in Ts]

    relu_jobs = {
        # neuron='if' is the converter's default neuron; naming it also makes a 0.0.0.0.14 result
        # run in multi-step mode
        "SpikingJelly IF (default)": lambda: row(lambda: convert_relu(neuron="if")),
        "TPP bernoulli": lambda: row(lambda: convert_relu(neuron="tpp",
                                                          neuron_kwargs={"seed": seed})),
        "TPP exact": lambda: row(lambda: convert_relu(
            neuron="tpp", neuron_kwargs={"count": "exact", "seed": seed})),
    }
    if not IS_LEGACY:  # SpikingJelly 2.x's channel-wise recipe, with its own IF and with TPP
        relu_jobs["SJ LocalThresholdBalancing + IF"] = lambda: row(convert_ltb)
        relu_jobs["SJ LocalThresholdBalancing + TPP exact"] = lambda: row(lambda: convert_ltb(
            neuron="tpp", neuron_kwargs={"count": "exact", "seed": seed}))
    relu_jobs["TPP calibrated for T, exact"] = lambda: [  # one conversion per T
        spikingjelly_accuracy(convert_calibrated(relu_ann, train, T, neuron_kwargs={
            "count": "exact", "seed": seed}), test, T) for T in Ts]
    relu_rows = _fill_rows({"ANN (ReLU)": [ann_accuracy(relu_ann, test)] * len(Ts)}, relu_jobs,
                           "ReLU CNN table")

    qcfs_jobs = {
        label: (lambda neuron=neuron, kwargs=kwargs: row(
            lambda: convert_qcfs(qcfs_ann, neuron, kwargs)))
        for label, neuron, kwargs in (
            ("IF (v starts at θ/2)", "if", {}),
            ("TPP bernoulli", "tpp", {"seed": seed}),
            ("TPP exact", "tpp", {"count": "exact", "seed": seed}),
        )
    }
    qcfs_rows = _fill_rows(_qcfs_reference_rows(qcfs_ann, test, Ts, levels), qcfs_jobs,
                           "QCFS CNN table")

    tables = {
        "ReLU CNN → SpikingJelly RateCodingRecipe(mode='99.9%'), its LocalThresholdBalancing"
        "Recipe, and tpp_plugin's calibration for T": relu_rows,
        f"QCFS CNN (L={levels}) → QCFS conversion": qcfs_rows,
    }
    return _report(tables, Ts, len(test.dataset), start, echo)


def _run_snntorch_demo(Ts, epochs, seed, levels, echo) -> dict:
    from ..adapters.snntorch import convert

    start = time.perf_counter()
    train, test, relu_ann, qcfs_ann = _train_models(epochs, seed, levels)
    neurons = (
        ("IF (v starts at θ/2)", {"neuron": "if"}),
        ("TPP bernoulli", {"neuron": "tpp", "seed": seed}),
        ("TPP exact", {"neuron": "tpp", "count": "exact", "seed": seed}),
    )
    relu_jobs = {label: (lambda kwargs=kwargs: [
        snntorch_accuracy(convert(relu_ann, train, num_steps=T, mode="99.9%", **kwargs), test, T)
        for T in Ts]) for label, kwargs in neurons}
    qcfs_jobs = {label: (lambda kwargs=kwargs: [
        snntorch_accuracy(convert(qcfs_ann, num_steps=T, **kwargs), test, T) for T in Ts])
        for label, kwargs in neurons}
    relu_rows = _fill_rows({"ANN (ReLU)": [ann_accuracy(relu_ann, test)] * len(Ts)}, relu_jobs,
                           "ReLU CNN table")
    qcfs_rows = _fill_rows(_qcfs_reference_rows(qcfs_ann, test, Ts, levels), qcfs_jobs,
                           "QCFS CNN table")
    tables = {
        "ReLU CNN → tpp_plugin snnTorch converter (mode='99.9%')": relu_rows,
        f"QCFS CNN (L={levels}) → snnTorch": qcfs_rows,
    }
    return _report(tables, Ts, len(test.dataset), start, echo)


def add_arguments(parser) -> None:
    """Options of ``python -m tpp_plugin demo``."""
    parser.add_argument("--framework", choices=["spikingjelly", "snntorch"], default="spikingjelly")
    parser.add_argument("--T", type=positive_int, nargs="+", default=list(DEFAULT_TS),
                        action=ListOnce, distinct=True, help="time steps")
    parser.add_argument("--epochs", type=nonnegative_int, default=30, help="ANN training epochs")
    parser.add_argument("--levels", type=positive_int, default=4, help="QCFS levels L")
    parser.add_argument("--seed", type=seed_int, default=0)


def main(args) -> int:
    """Run the demo from parsed command-line arguments."""
    run_demo(
        Ts=args.T, epochs=args.epochs, seed=args.seed, levels=args.levels,
        framework=args.framework,
    )
    return 0
