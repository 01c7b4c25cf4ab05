r"""What a batch of a data loader or a calibration list is, for the functions that take one."""

from __future__ import annotations

import torch

__all__ = ["batch_inputs"]


def batch_inputs(batch) -> torch.Tensor:
    """The input tensor of a data-loader batch (a tensor, or the first item of a tuple/list).

    Example::

        >>> batch_inputs((torch.zeros(2, 3), torch.tensor([0, 1]))).shape
        torch.Size([2, 3])
    """
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("empty batch")
        batch = batch[0]
    if not isinstance(batch, torch.Tensor):
        raise TypeError(f"calibration batches must hold tensors, got {type(batch).__name__}")
    return batch
