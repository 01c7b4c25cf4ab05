"""Gradient fine-tuning of a calibrated network against the ANN: the names of
:mod:`tpp_plugin.calibration.finetune`, where it lives (see there), importable from here as
before (``from tpp_plugin.finetune import finetune``)."""

from .calibration.finetune import check_finetune_args, finetune, output_distance

__all__ = ["finetune", "check_finetune_args", "output_distance"]
