r"""Calibration time of ``TPPCalibrationRecipe`` against SpikingJelly's
``LocalThresholdBalancingRecipe`` (LTB) on the same calibration loader (kept out of the tests).

For every model and ``T`` the three conversions run in turn, ``--repeats`` times, in one process
(interleaved, so machine load hits them alike); the median wall clock of each is reported with
its ratio to LTB's:

* ``ltb``: ``Converter(LocalThresholdBalancingRecipe(loader)).convert(ann)`` (all images);
* ``tpp``: ``Converter(TPPCalibrationRecipe(loader, T, neuron='tpp',
  neuron_kwargs={'count': count})).convert(ann)`` with its defaults (it reads every batch and
  calibrates on ``max_samples=1024`` of the images, chosen with its seed);
* ``tpp_all``: the same with ``max_samples=None`` (every image, as LTB).

ANN weights come from ``--weights model=path`` (e.g. the checkpoints of ``reproduce``); a model
without weights keeps its random initialisation — the cost of a calibration depends on the
shapes, not on what the network learned. SpikingJelly 2.x only (LTB is 2.x's).

Run::

    OMP_NUM_THREADS=1 python -m tpp_plugin.experiments.calibration_timing \
        --models mlp8 cnn5 vgg resnet --T 1 2 4 8 --repeats 3 --json timing.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

import torch

from ..cli import ListOnce
from .models import MODELS
from .reproduce import environment, load_dataset

__all__ = ["time_calibrations", "format_timing", "main"]

#: the conversions timed, in the order they run
CONVERSIONS = ("ltb", "tpp", "tpp_all")


def _converters(loader, T: int, count: str) -> dict:
    from spikingjelly.activation_based import ann2snn

    def tpp(**kwargs):
        return lambda: ann2snn.TPPCalibrationRecipe(loader, T, neuron="tpp",
                                                    neuron_kwargs={"count": count}, **kwargs)

    return {"ltb": lambda: ann2snn.LocalThresholdBalancingRecipe(loader),
            "tpp": tpp(), "tpp_all": tpp(max_samples=None)}


def time_calibrations(ann, loader, Ts, repeats: int = 3, count: str = "exact") -> dict:
    """``{T: {conversion: {'seconds': [...], 'median': s}, 'ratio': {...}}}`` for one ANN.

    :param ann: a ReLU network (not modified)
    :param loader: the calibration batches, shared by every conversion
    :param Ts: the ``T`` of the ``tpp`` conversions (LTB does not depend on it, and is timed
        again with each, beside them)
    :param repeats: runs of each conversion per ``T``, interleaved
    :param count: the TPP counting rule calibrated for
    """
    from spikingjelly.activation_based import ann2snn

    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    out = {}
    for T in Ts:
        recipes = _converters(loader, T, count)
        seconds = {name: [] for name in CONVERSIONS}
        for _ in range(repeats):
            for name in CONVERSIONS:
                net = copy.deepcopy(ann)
                start = time.perf_counter()
                ann2snn.Converter(recipes[name]()).convert(net)
                seconds[name].append(time.perf_counter() - start)
        row = {name: {"seconds": s, "median": statistics.median(s)}
               for name, s in seconds.items()}
        row["ratio"] = {name: row[name]["median"] / row["ltb"]["median"]
                        for name in CONVERSIONS if name != "ltb"}
        out[T] = row
    return out


def format_timing(results: dict) -> str:
    """A markdown table of :func:`main`'s ``models``: median seconds and ratios to LTB."""
    lines = ["| model | T | LTB (s) | tpp (s) | tpp / LTB | tpp, every image (s) | / LTB |",
             "|---|---|---|---|---|---|---|"]
    for model, rows in results.items():
        for T, row in rows.items():
            lines.append(
                f"| {model} | {T} | {row['ltb']['median']:.3f} | {row['tpp']['median']:.3f} | "
                f"{row['ratio']['tpp']:.2f}× | {row['tpp_all']['median']:.3f} | "
                f"{row['ratio']['tpp_all']:.2f}× |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="fashion-mnist", choices=["fashion-mnist", "digits"])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--models", nargs="+", default=["mlp8", "cnn5", "vgg", "resnet"],
                   choices=sorted(MODELS), action=ListOnce, distinct=True)
    p.add_argument("--weights", nargs="*", default=[], metavar="MODEL=PATH", action=ListOnce,
                   help="state dicts of the ANNs (default: random initialisation)")
    p.add_argument("--T", nargs="+", type=int, default=[1, 2, 4, 8], action=ListOnce,
                   distinct=True)
    p.add_argument("--count", default="exact", choices=["exact", "bernoulli", "unbiased"])
    p.add_argument("--calib-images", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--resize", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    weights = dict(w.split("=", 1) for w in args.weights)
    unknown = sorted(set(weights) - set(args.models))
    if unknown:
        p.error(f"--weights for models not in --models: {unknown}")

    x_train = load_dataset(args.dataset, args.data_dir, resize=args.resize, seed=args.seed)[0]
    x = x_train[:args.calib_images]
    loader = torch.utils.data.DataLoader(x, batch_size=args.batch_size)
    results = {}
    for name in args.models:
        torch.manual_seed(args.seed)
        ann = MODELS[name](image_size=x.shape[-1])
        if name in weights:
            ann.load_state_dict(torch.load(weights[name], map_location="cpu"))
        results[name] = time_calibrations(ann.eval(), loader, args.T, args.repeats, args.count)
        print(format_timing({name: results[name]}), flush=True)
    out = {"settings": vars(args), "environment": environment(), "models": results}
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
