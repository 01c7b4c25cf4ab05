"""What a calibration reports: the diagnostics of each calibrated layer
(:func:`layer_stats`, computed during the calibration) and the report built from them
(:func:`calibration_report`, :func:`format_report`)."""

from __future__ import annotations

import math

import torch

from .result import CalibrationResult

__all__ = ["percentile", "layer_stats", "calibration_report", "format_report"]


def percentile(values: torch.Tensor, q: float) -> float:
    """The ``q``-th percentile of ``values`` (no interpolation; a selection, not a sort)."""
    k = min(values.numel(), max(1, math.ceil(q / 100 * values.numel())))
    return float(values.float().kthvalue(k).values)


def layer_stats(name, a, target, theta, T, scale=None) -> dict:
    """Diagnostics of one calibrated layer (``a``, ``target``: ``[C, M]``)."""
    th = theta.view(-1, 1) if theta.dim() else theta
    sc = th if scale is None else scale.view(-1, 1)
    q = sc * torch.clamp(torch.floor(a * T / th + 0.5), 0, T) / T
    active = target > 0
    n_active = max(1, int(active.sum()))
    flat = target.flatten()
    if flat.numel() > 1 << 18:  # the percentile of a fixed random subset is plenty for a report
        step = flat.numel() // (1 << 18)
        flat = flat[::step]
    return {
        "name": name,
        "channels": int(a.shape[0]),
        "rounding_error": float(((q - target) ** 2).sum().sqrt()
                                / target.pow(2).sum().sqrt().clamp(min=1e-30)),
        "clipped": float((a > th).sum()) / a.numel(),
        "zeroed": float((active & (q == 0)).sum()) / n_active,
        "p99.9": percentile(flat, 99.9),
    }



def _summary(theta) -> dict:
    """Min, median and max of a threshold (a number or a tensor over channels)."""
    t = torch.as_tensor(theta, dtype=torch.float64).flatten()
    return {"min": float(t.min()), "median": float(t.median()), "max": float(t.max())}


def calibration_report(result: CalibrationResult, references: dict | None = None) -> dict:
    """Per layer: the chosen thresholds (min/median/max over channels; and the output scales
    where they differ from the thresholds) against other calibrations, the relative
    rounding error ``‖q(a) − relu(a_ANN)‖ / ‖relu(a_ANN)‖``, the share
    of clipped activations (above θ) and of zeroed ones (active in the ANN, no spike).

    :param result: what :func:`calibrate_for_T` returned
    :param references: other thresholds to compare with, ``{label: [per ReLU call a number or
        tensor]}``, e.g. those of ``RateCodingRecipe('99.9%')`` or LTB. The ANN's 99.9th
        percentile of each activation on the calibration data is always included as ``'99.9%'``
        unless given
    :return: a JSON-serialisable dict: ``{'T', 'settings', 'seconds', 'layers': [...]}``

    Example::

        >>> from torch import nn
        >>> from tpp_plugin.calibration import calibrate_for_T
        >>> ann = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
        >>> result = calibrate_for_T(ann, [torch.rand(32, 4)], T=2)
        >>> report = calibration_report(result, {'2θ': [2 * t for t in result.thresholds]})
        >>> report['T'], len(report['layers']), sorted(report['layers'][0]['references'])
        (2, 1, ['2θ', '99.9%'])
    """
    references = dict(references or {})
    references.setdefault("99.9%", [layer["p99.9"] for layer in result.layers])
    for label, values in references.items():
        if len(values) != len(result.thresholds):
            raise ValueError(f"references[{label!r}] has {len(values)} thresholds for "
                             f"{len(result.thresholds)} ReLU calls")
    layers = []
    for i, (theta, stats) in enumerate(zip(result.thresholds, result.layers)):
        layers.append({
            "layer": stats["name"],
            "channels": stats["channels"],
            "threshold": _summary(theta),
            "output_scale": (None if result.output_scales is None
                             or result.output_scales[i] is None
                             else _summary(result.output_scales[i])),
            "references": {label: _summary(values[i]) for label, values in references.items()},
            "rounding_error": stats["rounding_error"],
            "clipped": stats["clipped"],
            "zeroed": stats["zeroed"],
            "bias_shift": (None if result.bias_shifts[i] is None
                           else float(result.bias_shifts[i].abs().max())),
        })
    return {"T": result.T, "settings": dict(result.settings), "seconds": result.seconds,
            "layers": layers}


def format_report(report: dict) -> str:
    """The report of :func:`calibration_report` as a text table (thresholds and output scales
    as ``median [min, max]`` over channels).

    Example::

        >>> from torch import nn
        >>> from tpp_plugin.calibration import calibrate_for_T
        >>> ann = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
        >>> table = format_report(calibration_report(calibrate_for_T(ann, [torch.rand(32, 4)], 2)))
        >>> table.splitlines()[0].split()[:3]
        ['layer', 'C', 'θ']
    """
    refs = list(report["layers"][0]["references"]) if report["layers"] else []

    def fmt(s):
        if abs(s["max"] - s["min"]) <= 1e-12 * max(1.0, abs(s["max"])):
            return f"{s['median']:.3g}"
        return f"{s['median']:.3g} [{s['min']:.3g}, {s['max']:.3g}]"

    scaled = any(layer.get("output_scale") for layer in report["layers"])
    head = ["layer", "C", f"θ (T={report['T']})"] + (["s (output)"] if scaled else []) + [
        f"θ {r}" for r in refs] + ["round err", "clipped", "zeroed"]
    rows = [head]
    for layer in report["layers"]:
        scale = [fmt(layer["output_scale"] or layer["threshold"])] if scaled else []
        rows.append([layer["layer"], str(layer["channels"]), fmt(layer["threshold"])] + scale
                    + [fmt(layer["references"][r]) for r in refs]
                    + [f"{layer['rounding_error']:.3f}", f"{100 * layer['clipped']:.2f}%",
                       f"{100 * layer['zeroed']:.2f}%"])
    widths = [max(len(r[j]) for r in rows) for j in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"calibrated in {report['seconds']:.2f} s ({report['settings']})")
    return "\n".join(lines)
