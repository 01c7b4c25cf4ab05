r"""The checks of what :func:`~tpp_plugin.calibration.calibrate_for_T` and
:func:`~tpp_plugin.calibration.finetune.finetune` are given besides their options: the
calibration batches (:class:`CheckedBatches`), the fine-tuning inputs and the calibration result
(:func:`check_finetune_inputs`), and the fingerprint that ties a result to its ANN
(:func:`ann_fingerprint`). Each raises a ``TypeError`` or ``ValueError`` naming the argument and
the value, before any work (design §7)."""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterable

import torch
from torch import nn

from .. import functional as F
from ..convert import eval_mode
from .graph import activation_nodes, fuse_conv_bn, trace
from .result import CalibrationResult

__all__ = ["positive_int", "check_ann", "CheckedBatches", "check_batches_argument",
           "check_finetune_inputs", "ann_fingerprint", "FLOAT_DTYPES"]

#: parameter dtypes the calibration and fine-tuning compute in
FLOAT_DTYPES = (torch.float32, torch.float64)
# the calibration sums activations (and their squares) over samples: inputs must stay far below
# the dtype's largest value (a 2**16-th of it; e.g. about 5e33 in float32)
_HEADROOM = 2.0 ** 16


def _shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def positive_int(value, name: str, none: bool = False) -> None:
    """Refuse ``value`` unless it is an ``int`` >= 1 (or ``None`` where ``none``): a
    ``TypeError`` for another kind (a bool or a float included), a ``ValueError`` below 1."""
    if value is None and none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        allowed = "a positive integer or None" if none else "a positive integer"
        raise TypeError(f"{name} must be {allowed}, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value!r}")


def check_ann(ann, trains: bool = False) -> None:
    """Refuse an ``ann`` that is no module; with ``trains`` (fine-tuning) also one whose
    parameters are not float32/float64 (training a 16-bit copy overflows)."""
    if not isinstance(ann, nn.Module):
        raise TypeError(f"ann must be an nn.Module, got {type(ann).__name__}")
    param = next((p for p in ann.parameters() if p.is_floating_point()), None)
    if trains and param is not None and param.dtype not in FLOAT_DTYPES:
        raise TypeError(f"ann: fine-tuning trains in float32 or float64, but ann's parameters "
                        f"are {param.dtype}; fine-tune a float copy (ann.float())")


def check_batches_argument(batches, name: str = "batches") -> None:
    """Refuse a ``batches`` argument that is no iterable of batches: ``None``, a tensor (its
    rows would be taken for batches), a dict or a string."""
    if isinstance(batches, torch.Tensor):
        raise TypeError(
            f"{name} must be an iterable of batches (e.g. a DataLoader or a list [x]), got a "
            f"tensor of shape {_shape(batches)}: its rows would be taken for batches; pass [x]")
    if batches is None or isinstance(batches, (dict, str, bytes)) or not isinstance(
            batches, Iterable):
        raise TypeError(f"{name} must be an iterable of batches (e.g. a DataLoader or a list "
                        f"[x]), got {type(batches).__name__}")


def _inputs_of(batch, i: int, name: str) -> torch.Tensor:
    """The input tensor of batch ``i``: the batch itself or the first item of an ``(x, y)``
    pair; refuses a pair in ``(y, x)`` order (integer labels ``[N]`` first, floating inputs
    ``[N, *]`` second)."""
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError(f"{name}: batch {i} is empty: a batch is x or (x, y)")
        first = batch[0]
        second = batch[1] if len(batch) > 1 else None
        if (isinstance(first, torch.Tensor) and isinstance(second, torch.Tensor)
                and not first.is_floating_point() and first.dim() == 1
                and second.is_floating_point() and second.dim() >= 2):
            raise ValueError(
                f"{name}: batch {i} is (labels, inputs): its first item is a {first.dtype} "
                f"tensor of shape {_shape(first)} and its second a {second.dtype} tensor of "
                f"shape {_shape(second)}; a batch is (inputs, labels)")
        batch = first
    if not isinstance(batch, torch.Tensor):
        raise TypeError(f"{name}: batch {i} must be a tensor x or a pair (x, y) of tensors, got "
                        f"{type(batch).__name__}")
    if batch.is_complex():
        raise TypeError(f"{name}: batch {i} has inputs of dtype {batch.dtype}; calibration "
                        "takes real numbers")
    if batch.dim() == 0:
        raise ValueError(f"{name}: batch {i} is a 0-d tensor ({batch.item()!r}): a batch has a "
                         "sample dimension [N, *]")
    return batch


class CheckedBatches:
    """``batches`` as they are read, each checked: a tensor or ``(x, y)`` pair (not
    ``(y, x)``), finite, far from overflow, inputs of one shape in every batch; the first also
    run through ``model`` (one sample), so a batch that does not fit the model is named as
    the data's fault. Iterable as often as ``batches`` is.

    :param batches: the calibration batches
    :param model: a copy of the ANN in eval mode (run without gradients; ``None``: no fit check)
    :param dtype: the dtype the model computes in
    :param name: the argument's name in the messages
    """

    def __init__(self, batches, model: nn.Module | None, dtype=torch.float32,
                 name: str = "batches"):
        if isinstance(batches, CheckedBatches):  # checked by a caller: keep its name
            batches, name = batches.batches, batches.name
        check_batches_argument(batches, name)
        self.batches, self.model, self.dtype, self.name = batches, model, dtype, name
        self._fits = False

    def __iter__(self):
        shape = None
        dtype = self.dtype if self.dtype in FLOAT_DTYPES else torch.float32
        limit = torch.finfo(dtype).max / _HEADROOM
        for i, batch in enumerate(self.batches):
            x = _inputs_of(batch, i, self.name)
            if shape is None:
                shape = _shape(x)
            elif _shape(x)[1:] != shape[1:]:
                raise ValueError(
                    f"{self.name}: batch {i} holds inputs of shape {_shape(x)}, batch 0 of "
                    f"shape {shape}: every batch must hold samples of one shape")
            if x.numel() and x.is_floating_point():
                if not bool(torch.isfinite(x).all()):
                    raise ValueError(f"{self.name}: batch {i}: the calibration inputs contain "
                                     "NaN or infinite values")
                biggest = float(x.abs().max())
                if biggest > limit:
                    raise ValueError(
                        f"{self.name}: batch {i} holds a value of magnitude {biggest:.3g}, too "
                        f"close to the largest {dtype} ({torch.finfo(dtype).max:.3g}): "
                        "the calibration sums activations over samples; scale the inputs "
                        f"below {limit:.3g}")
            if not self._fits and self.model is not None and len(x):
                self._check_fit(x, i)
            yield batch

    def _check_fit(self, x: torch.Tensor, i: int) -> None:
        param = next(self.model.parameters(), None)
        device = param.device if param is not None else x.device
        try:
            with torch.no_grad():
                self.model(x[:1].to(device=device, dtype=self.dtype))
        except (RuntimeError, IndexError, TypeError, ValueError) as exc:
            raise ValueError(
                f"{self.name}: batch {i} of shape {_shape(x)} does not fit the model (the model's "
                f"error: {exc}); calibrate with batches shaped like its input") from exc
        self._fits = True


def ann_fingerprint(model: nn.Module) -> str:
    """A digest of the values of every parameter and buffer of ``model`` (independent of their
    names and order), with which a :class:`CalibrationResult` records the ANN it belongs to."""
    digests = []
    for t in list(model.parameters()) + list(model.buffers()):
        flat = t.detach().reshape(-1).cpu().contiguous()
        data = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
        digests.append(hashlib.sha1(str(flat.dtype).encode() + data).hexdigest())
    return hashlib.sha1("".join(sorted(digests)).encode()).hexdigest()


def _traced(ann: nn.Module, fuse: bool) -> nn.Module:
    gm = trace(copy.deepcopy(ann)).eval()
    return fuse_conv_bn(gm) if fuse else gm


def _check_finetune_loader(x) -> None:
    """A loader of fine-tuning inputs: iterable (a ``DataLoader``, or a list of batches: each a
    tensor or a tuple/list whose first item is one)."""
    if isinstance(x, (str, bytes)) or not hasattr(x, "__iter__"):
        raise TypeError(f"x must be a tensor of calibration inputs [N, *] or a loader of such "
                        f"batches, got {type(x).__name__}")
    if isinstance(x, (list, tuple)):
        for i, batch in enumerate(x):
            first = batch[0] if isinstance(batch, (list, tuple)) and batch else batch
            if not isinstance(first, torch.Tensor):
                raise TypeError(f"x must be a tensor of calibration inputs [N, *] or a loader of "
                                f"such batches, got a {type(x).__name__} whose item {i} is "
                                f"{type(batch).__name__}")


def check_finetune_inputs(ann, result, x, batch_size, seed) -> nn.Module:
    """The checks of :func:`~tpp_plugin.calibration.finetune.finetune`'s ``ann``, ``result``,
    ``x``, ``batch_size`` and ``seed``: a float32/float64 module; a
    :class:`CalibrationResult` of this ANN (its ReLU calls, and where recorded its weights);
    a non-empty finite floating tensor of inputs that fits the ANN, or a loader of such batches.

    :return: the traced (and, as the calibration did, fused) copy of ``ann``
    """
    check_ann(ann, trains=True)
    if not isinstance(result, CalibrationResult):
        raise TypeError(f"result must be the CalibrationResult of calibrate_for_T(ann, ...), got "
                        f"{type(result).__name__}")
    positive_int(batch_size, "batch_size")
    F.check_seed_value(seed, "seed")
    param = next(ann.parameters(), None)
    gm = _traced(ann, bool(result.settings.get("fuse", False)))
    names = [n.name for n in activation_nodes(gm)]
    if names != list(result.names):
        raise ValueError(f"result: it calibrates the ReLU calls {list(result.names)}, but ann has "
                         f"{names}: pass the result of calibrate_for_T on this ann")
    recorded = result.settings.get("ann")
    if recorded is not None and recorded != ann_fingerprint(gm):
        raise ValueError("result: it was calibrated on another ANN (ann's weights differ from "
                         "those calibrate_for_T saw): pass the result of calibrate_for_T on "
                         "this ann, or calibrate it again")
    if not isinstance(x, torch.Tensor):
        _check_finetune_loader(x)
        return gm  # a loader: its batches are checked as they are read
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating tensor, got dtype {x.dtype}")
    if x.dim() == 0 or x.shape[0] == 0:
        raise ValueError(f"x must hold at least one sample [N, *], got shape {_shape(x)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"x contains NaN or infinite values (shape {_shape(x)})")
    device = param.device if param is not None else x.device
    dtype = param.dtype if param is not None else torch.float32
    try:
        with torch.no_grad(), eval_mode(gm):
            gm(x[:1].to(device=device, dtype=dtype))
    except (RuntimeError, IndexError, TypeError, ValueError) as exc:
        raise ValueError(f"x of shape {_shape(x)} does not fit ann (the model's error: {exc}); "
                         "pass inputs shaped like the ANN's input") from exc
    return gm
