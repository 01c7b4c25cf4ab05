r"""Benchmark of T-aware threshold calibration on Fashion-MNIST (kept out of the test suite).

Trains (or loads) a ReLU ANN, then for each ``T`` reports the accuracy of

* SpikingJelly's ``RateCodingRecipe('99.9%')`` with its IF neuron (multi-step simulation);
* SpikingJelly's ``LocalThresholdBalancingRecipe`` with its half-threshold IF neuron
  (multi-step simulation) and with exact TPP (the quantised ANN that exact TPP computes);
* :class:`~tpp_plugin.adapters.spikingjelly.TPPCalibrationRecipe` with exact TPP (the quantised
  ANN; equal image for image) and with bernoulli TPP (count mode, same random draws as a full
  simulation),

and the calibration time of LTB and of the T-aware calibration on the same images.

Run (SpikingJelly 2.0.0)::

    OMP_NUM_THREADS=1 python -m tpp_plugin.experiments.calibration_bench \
        --models cnn5 vgg --subset 12000 2000 --resize 14 --epochs 8 --T 1 2 4 8 \
        --checkpoint /tmp/calib_bench --json calibration_bench.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch

import tpp_plugin
from tpp_plugin import calibration as C
from tpp_plugin.cli import ListOnce
from tpp_plugin.experiments.data import loaders
from tpp_plugin.experiments.models import MODELS, train_ann
from tpp_plugin.experiments.reproduce import load_dataset


def _accuracy(predict, x, y, batch=500) -> float:
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            correct += int((predict(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
    return 100.0 * correct / len(x)


def _simulate(snn, T):
    from spikingjelly.activation_based import functional

    def predict(x):
        functional.set_step_mode(snn, "m")
        functional.reset_net(snn)
        return snn(x.unsqueeze(0).expand(T, *x.shape)).mean(0)

    return predict


def _count(snn, T):
    def predict(x):
        with tpp_plugin.count_mode(snn, T):
            return snn(x)

    return predict


def main(argv=None) -> dict:
    from spikingjelly.activation_based import ann2snn

    from tpp_plugin.adapters.spikingjelly import calibrated_thresholds

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["cnn5", "vgg"], action=ListOnce,
                   distinct=True)
    p.add_argument("--subset", nargs="+", type=int, default=[12000, 2000], action=ListOnce)
    p.add_argument("--resize", type=int, default=14)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--train-batch-size", type=int, default=64)
    p.add_argument("--train-only", action="store_true")
    p.add_argument("--T", nargs="+", type=int, default=[1, 2, 4, 8], action=ListOnce,
                   distinct=True)
    p.add_argument("--calibration-images", type=int, default=1024)
    p.add_argument("--objective", default="activation", choices=C.OBJECTIVES)
    p.add_argument("--bias-correction", default="mean", choices=["mean", "search", "none"])
    p.add_argument("--refine", action="store_true")
    p.add_argument("--granularity", default="channel")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", default=None, help="folder for trained ANNs")
    p.add_argument("--json", default=None)
    p.add_argument("--skip-baselines", action="store_true")
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    x_tr, y_tr, x_te, y_te = load_dataset("fashion-mnist", subset=args.subset,
                                          resize=args.resize, seed=args.seed)
    calib = [x_tr[i:i + 256] for i in range(0, args.calibration_images, 256)]
    out = {"subset": args.subset, "resize": args.resize, "epochs": args.epochs,
           "calibration_images": args.calibration_images, "models": {}}
    for name in args.models:
        torch.manual_seed(args.seed)
        ann = MODELS[name](image_size=args.resize)
        stem = (f"{name}-{args.resize}px-{args.subset[0]}-e{args.epochs}-"
                f"b{args.train_batch_size}-s{args.seed}.pt")
        path = os.path.join(args.checkpoint, stem) if args.checkpoint else None
        if path and os.path.exists(path):
            ann.load_state_dict(torch.load(path))
        else:
            train_loader, _ = loaders(x_tr, y_tr, x_te, y_te, batch_size=args.train_batch_size,
                                      seed=args.seed)
            train_ann(ann, train_loader, epochs=args.epochs)
            if path:
                os.makedirs(args.checkpoint, exist_ok=True)
                torch.save(ann.state_dict(), path)
        ann.eval()
        row = {"ann": _accuracy(ann, x_te, y_te), "T": {}}
        print(f"{name}: ANN {row['ann']:.2f} %", flush=True)
        if args.train_only:
            continue
        ltb_thresholds = None
        if not args.skip_baselines:
            t0 = time.perf_counter()
            ltb = ann2snn.Converter(ann2snn.LocalThresholdBalancingRecipe(calib)).convert(
                copy.deepcopy(ann))
            row["ltb_seconds"] = time.perf_counter() - t0
            print(f"  LTB calibration {row['ltb_seconds']:.2f} s", flush=True)
            ltb_thresholds = calibrated_thresholds(ltb)
            rate = ann2snn.Converter(ann2snn.RateCodingRecipe(calib, mode="99.9%")).convert(
                copy.deepcopy(ann))
            rate_thresholds = calibrated_thresholds(rate)
        for T in args.T:
            res = {}
            if not args.skip_baselines:
                res["rate99.9_if"] = _accuracy(_simulate(rate, T), x_te, y_te)
                res["ltb_if"] = _accuracy(_simulate(ltb, T), x_te, y_te)
                res["ltb_tpp_exact"] = _accuracy(
                    C.quantised_ann(ann, ltb_thresholds, T, fuse=True), x_te, y_te)
                res["rate99.9_tpp_exact"] = _accuracy(
                    C.quantised_ann(ann, rate_thresholds, T, fuse=True), x_te, y_te)
            bias = False if args.bias_correction == "none" else args.bias_correction
            kwargs = dict(objective=args.objective, bias_correction=bias,
                          refine=args.refine, granularity=args.granularity)
            t0 = time.perf_counter()
            recipe = ann2snn.TPPCalibrationRecipe(calib, T, neuron="tpp",
                                                  neuron_kwargs={"count": "exact"}, **kwargs)
            snn = ann2snn.Converter(recipe).convert(copy.deepcopy(ann))
            res["tpp_calibration_seconds"] = time.perf_counter() - t0
            res["calibrated_tpp_exact"] = _accuracy(C.quantised_ann(ann, recipe.result, T),
                                                    x_te, y_te)
            res["calibrated_tpp_exact_snn_count_mode"] = _accuracy(_count(snn, T), x_te, y_te)
            bern = ann2snn.Converter(ann2snn.TPPCalibrationRecipe(
                calib, T, neuron="tpp", neuron_kwargs={"count": "bernoulli", "seed": 0},
                **kwargs)).convert(copy.deepcopy(ann))
            res["calibrated_tpp_bernoulli"] = _accuracy(_count(bern, T), x_te, y_te)
            refs = {"ltb": ltb_thresholds, "99.9%": rate_thresholds} if ltb_thresholds else None
            res["report"] = C.calibration_report(recipe.result, refs)
            row["T"][T] = res
            print(f"  T={T}: " + ", ".join(f"{k} {v:.2f}" for k, v in res.items()
                                          if isinstance(v, float)), flush=True)
        if T == args.T[-1]:
            print(C.format_report(res["report"]))
        out["models"][name] = row
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
