"""The options of :func:`~tpp_plugin.calibration.calibrate_for_T` as one record,
:class:`CalibrationOptions`: their defaults and their checks in one place."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .. import functional as F
from .checks import positive_int
from .finetune import check_finetune_args
from .stream import check_cache_bytes

__all__ = ["OBJECTIVES", "GRANULARITIES", "CalibrationOptions", "options_from"]

#: error measures :func:`calibrate_for_T` can minimise per channel
OBJECTIVES = ("activation", "fisher")
#: threshold granularities
GRANULARITIES = ("channel", "layer")


@dataclass(frozen=True)
class CalibrationOptions:
    """Every setting of :func:`~tpp_plugin.calibration.calibrate_for_T` but the model, the data
    and ``T``, with its default; each field means what the keyword argument of the same name of
    ``calibrate_for_T`` does (see its parameters). Checked when built: a bad value raises the
    error ``calibrate_for_T`` raises for it; ``bias_correction=True`` is kept as ``'search'``.

    Pass it as ``calibrate_for_T(ann, loader, T, options)``; keyword arguments given as well
    override its fields.

    Example::

        >>> options = CalibrationOptions(granularity='layer', max_samples=256)
        >>> options.grid, options.bias_correction
        (64, 'mean')
        >>> CalibrationOptions(bias_correction=True).bias_correction
        'search'
        >>> CalibrationOptions(refine='everything')
        Traceback (most recent call last):
            ...
        ValueError: refine must be False, 'global' or 'local', got 'everything'
    """

    granularity: str = "channel"
    objective: str = "activation"
    bias_correction: str | bool | None = "mean"
    refine: str | bool | None = False
    channel_dim: int = 1
    fuse: bool = True
    grid: int = 64
    refine_grid: tuple = (0.8, 0.85, 0.9, 0.95, 1.0, 1.05, 1.1, 1.2)
    max_samples: int | None = 1024
    max_values: int | None = 16384
    search: str = "binned"
    reference: str = "ann"
    coherence: float = 0.0
    output_correction: bool = True
    count: str = "exact"
    output_scale: bool = True
    bins: int | None = None
    offset_steps: int = 9
    batch_size: int = 256
    seed: int = 0
    reconstruct: bool = True
    ridge: float = 0.1
    max_rows: int = 16384
    max_features: int | None = 2048
    relu_steps: int = 0
    finetune_epochs: int = 0
    finetune_lr: float = 1e-3
    finetune_drop: float = 0.0
    finetune_holdout: float = 0.2
    stream: bool = True
    cache_bytes: int | None = 1 << 28
    distributed: bool = True

    def __post_init__(self) -> None:
        if self.bias_correction is True:
            object.__setattr__(self, "bias_correction", "search")
        self._check_search()
        self._check_refit()
        self._check_counting()
        self._check_sizes()
        check_finetune_args(self.finetune_epochs, self.finetune_lr, self.finetune_drop,
                            self.finetune_holdout)
        if self.refine not in (False, None, True, "global", "local"):
            raise ValueError(f"refine must be False, 'global' or 'local', got {self.refine!r}")
        check_cache_bytes(self.cache_bytes)
        if not isinstance(self.distributed, bool):
            raise TypeError(f"distributed must be True or False, got {self.distributed!r}")

    def _check_search(self) -> None:
        """The threshold search's options: granularity, objective, grid, bins, channel_dim and
        bias_correction."""
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got "
                             f"{self.granularity!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        grid, bins = self.grid, self.bins
        if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
            raise ValueError(f"grid must be a positive integer, got {grid!r}")
        if bins is not None and (isinstance(bins, bool) or not isinstance(bins, int)
                                 or bins < 1):
            raise ValueError(f"bins must be a positive integer or None, got {bins!r}")
        if not isinstance(self.channel_dim, int) or isinstance(self.channel_dim, bool):
            raise TypeError(f"channel_dim must be an int, got {self.channel_dim!r}")
        if self.bias_correction not in (False, None, "search", "mean"):
            raise ValueError("bias_correction must be 'search', 'mean' or False, got "
                             f"{self.bias_correction!r}")

    def _check_sizes(self) -> None:
        """The sample counts, batch size, seed, offsets and refinement grid (a bool is no
        count: ``max_samples=True`` would keep one sample)."""
        for name in ("max_samples", "max_values"):
            positive_int(getattr(self, name), name, none=True)
        positive_int(self.batch_size, "batch_size")
        positive_int(self.offset_steps, "offset_steps")
        F.check_seed_value(self.seed, "seed")
        coherence = self.coherence
        if isinstance(coherence, bool) or not isinstance(coherence, (int, float)):
            raise TypeError(f"coherence must be a number, got {coherence!r}")
        if not (math.isfinite(coherence) and coherence >= 0):
            raise ValueError(f"coherence must be a finite number >= 0, got {coherence!r}")
        grid = self.refine_grid
        if isinstance(grid, (str, bytes)) or not hasattr(grid, "__iter__"):
            raise TypeError(f"refine_grid must be a sequence of positive numbers, got {grid!r}")
        factors = list(grid)
        if not factors or not all(
                isinstance(f, (int, float)) and not isinstance(f, bool) and math.isfinite(f)
                and f > 0 for f in factors):
            raise ValueError(f"refine_grid must be a non-empty sequence of finite numbers > 0, "
                             f"got {grid!r}")

    def _check_refit(self) -> None:
        """The weight refit's options: ridge, max_features, max_rows and relu_steps."""
        ridge, max_features = self.ridge, self.max_features
        if not (isinstance(ridge, (int, float)) and not isinstance(ridge, bool)
                and math.isfinite(ridge) and ridge > 0):
            raise ValueError(f"ridge must be a positive number, got {ridge!r}")
        if max_features is not None and (isinstance(max_features, bool)
                                         or not isinstance(max_features, int)
                                         or max_features < 1):
            raise ValueError(f"max_features must be a positive integer or None, got "
                             f"{max_features!r}")
        max_rows, relu_steps = self.max_rows, self.relu_steps
        if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
            raise ValueError(f"max_rows must be a positive integer, got {max_rows!r}")
        if isinstance(relu_steps, bool) or not isinstance(relu_steps, int) or relu_steps < 0:
            raise ValueError(f"relu_steps must be a non-negative integer, got {relu_steps!r}")

    def _check_counting(self) -> None:
        """The counting rule, and the search and reference that go with it."""
        if self.count not in F.COUNT_MODES:
            raise ValueError(f"count must be one of {F.COUNT_MODES}, got {self.count!r}")
        if self.count != "exact" and self.search != "binned":
            raise ValueError(f"count={self.count!r} needs search='binned'")
        if self.reference not in ("ann", "input"):
            raise ValueError(f"reference must be 'ann' or 'input', got {self.reference!r}")
        if self.search not in ("binned", "exact"):
            raise ValueError(f"search must be 'binned' or 'exact', got {self.search!r}")

    def recorded_settings(self, samples: int) -> dict:
        """The settings a :class:`~tpp_plugin.calibration.CalibrationResult` records of a
        calibration with these options on ``samples`` samples."""
        return {"fuse": bool(self.fuse), "count": self.count, "granularity": self.granularity,
                "objective": self.objective, "bias_correction": self.bias_correction,
                "refine": self.refine, "grid": self.grid, "output_scale": self.output_scale,
                "reconstruct": bool(self.reconstruct), "ridge": self.ridge,
                "relu_steps": self.relu_steps, "samples": samples}


_NAMES = frozenset(f.name for f in dataclasses.fields(CalibrationOptions))


def options_from(options: CalibrationOptions | None, overrides: dict,
                 caller: str = "calibrate_for_T") -> CalibrationOptions:
    """``options`` (default: the defaults) with the keyword arguments ``overrides`` of
    ``caller`` in place of its fields, checked; a ``TypeError`` for a keyword that is no
    option, as Python raises for an unexpected keyword argument.

    Example::

        >>> options_from(CalibrationOptions(grid=16), {'seed': 3}).grid
        16
    """
    for name in overrides:
        if name not in _NAMES:
            raise TypeError(f"{caller}() got an unexpected keyword argument {name!r}")
    if options is None:
        return CalibrationOptions(**overrides)
    if not isinstance(options, CalibrationOptions):
        raise TypeError(f"options must be a CalibrationOptions or None, got {options!r} (pass "
                        f"the other arguments of {caller} by keyword)")
    return dataclasses.replace(options, **overrides) if overrides else options
