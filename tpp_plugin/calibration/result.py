"""What a calibration returns: :class:`CalibrationResult`, one threshold tensor per ReLU call
and what goes with it (bias shifts, output steps, refitted weights, diagnostics)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["CalibrationResult"]


@dataclass
class CalibrationResult:
    """Thresholds (and bias shifts) chosen by :func:`calibrate_for_T` for one ``T``.

    :ivar T: the number of time steps calibrated for
    :ivar names: the ReLU calls, in graph order (``fx`` node names)
    :ivar thresholds: one tensor per call: 0-d (per layer) or ``[C]`` (per channel)
    :ivar bias_shifts: per call a ``[C]`` shift of the pre-activation, or ``None``
    :ivar bias_targets: per call the module whose bias carries the shift, or ``None``
    :ivar layers: per call a dict of diagnostics (rounding error, clipped and zeroed shares,
        the ANN's ``'99.9%'`` activation percentile) for :func:`calibration_report`
    :ivar seconds: wall-clock time of the calibration
    :ivar output_shift: ``[classes]`` shift of the output (bias correction of the last layer), or
        ``None``
    :ivar output_target: the module whose bias carries ``output_shift``, or ``None``
    :ivar output_scales: per call the output scale ``s`` of the neuron (the scaler after it;
        like ``thresholds``), or ``None`` when it equals the threshold
    :ivar weights: ``{module name: (weight, bias)}`` of the conv/linear layers whose weights
        were refitted (``reconstruct=True``), or ``None``
    """

    T: int
    names: list
    thresholds: list
    bias_shifts: list
    bias_targets: list
    channel_dim: int = 1
    layers: list = field(default_factory=list)
    seconds: float = 0.0
    settings: dict = field(default_factory=dict)
    output_shift: torch.Tensor | None = None
    output_target: str | None = None
    output_scales: list | None = None
    weights: dict | None = None

