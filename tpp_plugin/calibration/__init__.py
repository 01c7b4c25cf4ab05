r"""T-aware threshold calibration for ANN→SNN conversion with TPP neurons.

A network of exact-count TPP neurons (``count='exact'``) with thresholds θ computes exactly the
ANN with every ReLU output ``a`` replaced by

.. math::

    q_θ(a) = \frac{θ}{T}\,\mathrm{clamp}\left(\left\lfloor \frac{aT}{θ} + \tfrac12 \right\rfloor,
    0, T\right)

(``T`` levels of ``θ/T`` on ``[0, θ]``). Choosing θ for a target ``T`` is therefore post-training
quantisation of the activations, and one ANN pass with :math:`q_θ` in place of each ReLU
evaluates a candidate (:func:`quantised_ann`). Bernoulli TPP fires ``floor`` or ``ceil`` of
``a·T/θ`` — the same quantiser with noise — so thresholds calibrated for exact counts serve it too.

:func:`calibrate_for_T` chooses the thresholds layer by layer in graph order, with every earlier
layer already quantised, so a layer's thresholds (and bias shift) compensate for what the earlier
layers lost:

1. *weight reconstruction* (``reconstruct=True``): each conv/linear layer fed by quantised
   activations gets the weights and bias that map its quantised input to the ANN's output of
   that layer in least squares (ridge-regularised towards the ANN's weights): the layer absorbs
   what the quantisation before it lost, as far as a linear map can (a layer whose output is
   one term of a residual sum is fitted to the ANN's sum minus the other, already quantised,
   term, so it absorbs the shortcut's error too);
   *bias correction*: the pre-activation of the layer is shifted, per channel, so that its mean
   over the calibration data equals the ANN's (the shift is folded into the bias of the affine
   layer that produces it);
2. per channel (or per layer) a grid of candidate thresholds — fractions of the channel's
   calibration maximum — is evaluated at once on binned statistics, and the one with the
   smallest squared error against the ANN's activation is kept (``objective='fisher'`` weighs
   each activation's error by the squared gradient of the ANN's loss with respect to it);
3. optionally (``refine='global'``) each layer's thresholds are then scaled together by the
   factor, from a small grid, that minimises the KL divergence of the quantised network's output
   from the ANN's.

The ANN and the network being quantised run side by side, node by node, over all calibration
samples at once: one pass of each in all. ``count='bernoulli'`` calibrates for bernoulli TPP
(the expected squared error of its two-point count).

The result is framework-neutral: one threshold tensor per ReLU *call* (scalar or per channel),
per call a bias shift for the preceding conv/linear/batch-norm layer, and the refitted weights of
the conv/linear layers. The SpikingJelly
adapter turns it into a network (``ann2snn.TPPCalibrationRecipe``); :func:`calibration_report`
summarises it.

The package, one job per module: :mod:`.quantiser` (the quantiser, the probes,
:func:`quantised_ann`), :mod:`.graph` (tracing, ReLU calls, conv-BN fusion, bias-shift
targets), :mod:`.search` (the threshold search), :mod:`.refit` (the weight refit),
:mod:`.passes` (batched and lockstep passes), :mod:`.options` (:class:`CalibrationOptions`),
:mod:`.calibrate` (:func:`calibrate_for_T`), :mod:`.report` (:func:`calibration_report`),
:mod:`.finetune` (the gradient fine-tuning) and :mod:`.result` (:class:`CalibrationResult`).
"""

from .calibrate import calibrate_for_T
from .graph import activation_nodes, apply_bias_shifts, fuse_conv_bn
from .options import GRANULARITIES, OBJECTIVES, CalibrationOptions
from .quantiser import quantise, quantised_ann
from .report import calibration_report, format_report
from .result import CalibrationResult

__all__ = [
    "OBJECTIVES",
    "GRANULARITIES",
    "CalibrationOptions",
    "CalibrationResult",
    "activation_nodes",
    "quantise",
    "quantised_ann",
    "apply_bias_shifts",
    "fuse_conv_bn",
    "calibrate_for_T",
    "calibration_report",
    "format_report",
]
