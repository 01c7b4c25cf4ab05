r"""The converter's IF baseline for snnTorch: :class:`IF`, ``snn.Leaky`` as an
integrate-and-fire neuron that starts at half its threshold."""

from __future__ import annotations

import snntorch
import torch

from ... import functional as F
from .common import check_graded_spikes_factor, check_mem_argument, returns

__all__ = ["IF"]


class IF(snntorch.Leaky):
    r"""Integrate-and-fire neuron starting at half the threshold: ``snn.Leaky`` with
    ``beta=1``, ``reset_mechanism='subtract'`` and initial potential :math:`U_{\rm thr}/2`.

    The half-threshold start is the usual fix for rate-coded conversion (a plain IF starting at
    0 under-fires by half a spike). It survives every snnTorch reset (``snntorch.utils.reset``,
    ``Leaky.reset_hidden``, :meth:`reset_mem`) because the stored state ``self.mem`` is the
    potential *relative to the start*, :math:`U - U_{\rm thr}/2`, whose reset value is snnTorch's
    zero; the neuron fires when :math:`U > U_{\rm thr}`. ``mem`` passed in and returned is the
    membrane potential :math:`U` itself. NIR export sees a plain ``Leaky`` and drops the offset.

    ``sequence=True`` makes :meth:`forward` take a whole ``[T, B, ...]`` sequence, starting from
    :math:`U_{\rm thr}/2` and leaving the time-loop state untouched.

    Example::

        >>> lif = IF(threshold=1.0, init_hidden=True)
        >>> [float(lif(torch.tensor([0.25]))) for _ in range(4)]   # U: .75, 1.0, 1.25 → spike
        [0.0, 0.0, 1.0, 0.0]

    :param threshold: firing threshold :math:`U_{\rm thr}` (> 0). Defaults to 1
    :param sequence: take ``[T, B, ...]`` sequences. Defaults to False
    :param kwargs: ``spike_grad``, ``surrogate_disable``, ``init_hidden``, ``learn_threshold``,
        ``output``, ``graded_spikes_factor``, ``learn_graded_spikes_factor``, as ``snn.Leaky``
    """

    def __init__(
        self,
        threshold=1.0,
        *,
        sequence: bool = False,
        spike_grad=None,
        surrogate_disable: bool = False,
        init_hidden: bool = False,
        learn_threshold: bool = False,
        output: bool = False,
        graded_spikes_factor=1.0,
        learn_graded_spikes_factor: bool = False,
    ):
        threshold = F.check_threshold(threshold)
        check_graded_spikes_factor(graded_spikes_factor)
        super().__init__(
            beta=1.0,
            threshold=threshold,
            spike_grad=spike_grad,
            surrogate_disable=surrogate_disable,
            init_hidden=init_hidden,
            learn_threshold=learn_threshold,
            reset_mechanism="subtract",
            output=output,
            graded_spikes_factor=graded_spikes_factor,
            learn_graded_spikes_factor=learn_graded_spikes_factor,
        )
        self.sequence = bool(sequence)
        self._mem_out = None  # the potential last returned, to take it back without rounding

    def _offset(self):
        return self.threshold / 2

    def extra_repr(self) -> str:
        th = self.threshold
        th = f"{float(th):.4g}" if th.dim() == 0 else f"tensor{tuple(th.shape)}"
        return f"threshold={th}, v_start=threshold/2, sequence={self.sequence}"

    def fire(self, mem):
        return super().fire(mem + self._offset())

    def mem_reset(self, mem):
        return super().mem_reset(mem + self._offset())

    def reset_mem(self):
        """Reset the potential to :math:`U_{\\rm thr}/2` and return it."""
        self._mem_out = super().reset_mem() + self._offset()
        return self._mem_out

    def forward(self, input_, mem=None):
        check_mem_argument(self, mem)
        if self.sequence:
            F.check_sequence(input_, "input_", finite=False)
            saved = self.mem, self._mem_out
            self.mem = self.mem.new_zeros(0)
            try:
                steps = [self._step_forward(x, None) for x in input_]
            finally:
                self.mem, self._mem_out = saved
            spk, mem = (torch.stack(s) for s in zip(*steps))
        else:
            spk, mem = self._step_forward(input_, mem)
        return returns(self, spk, mem)

    def _step_forward(self, input_, mem):
        if mem is not None:
            mem = None if mem is self._mem_out else mem - self._offset()
        out = super().forward(input_, mem)
        spk = out[0] if isinstance(out, tuple) else out
        self._mem_out = self.mem + self._offset()
        return spk, self._mem_out
