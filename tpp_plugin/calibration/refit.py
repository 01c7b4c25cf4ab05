"""Weight reconstruction: the least-squares refit of a conv/linear layer fed by quantised
activations to the ANN's output of that layer (ridge-regularised towards the ANN's weights)."""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["patches", "can_refit", "refit_rows", "fit_weights"]


def patches(module, x):
    """The inputs of the linear map ``module`` applies, one column per output position:
    ``[in_features, positions]`` (a view for a linear layer, one copy for a convolution)."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, module.in_features).T
    cols = nn.functional.unfold(x, module.kernel_size, module.dilation, module.padding,
                                module.stride)  # [N, D, L]
    return cols.transpose(0, 1).reshape(cols.shape[1], -1)


def can_refit(module, max_features=None) -> bool:
    """Whether :func:`fit_weights` refits ``module`` (else it returns it as it is): not a
    grouped or string-padded convolution, at most ``max_features`` inputs per output."""
    if isinstance(module, nn.Conv2d) and (module.groups != 1 or isinstance(module.padding, str)
                                          or module.padding_mode != "zeros"):
        return False
    # more features: the (D + 1)² system would cost O(D³)
    return max_features is None or module.weight[0].numel() <= max_features


def refit_rows(n: int, per_sample: int, max_rows: int, seed: int):
    """The sorted indices of the samples (of ``n``, ``per_sample`` output positions each)
    :func:`fit_weights` fits on, or ``None`` for all of them (on the CPU)."""
    if n * per_sample <= max_rows:
        return None
    keep = max(1, max_rows // per_sample)
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:keep]
    return idx.sort().values


def fit_weights(module, x_q, z_ann, ridge, max_rows, seed, max_features=None, partner=None,
                relu_steps=0):
    """A copy of the conv/linear ``module`` whose weights and bias map the quantised network's
    input ``x_q`` to the ANN's output ``z_ann`` in least squares, with a ridge penalty
    ``ridge · mean(diag(AᵀA)) · ‖θ − θ_ANN‖²`` towards the ANN's weights. With ``partner``, the
    other term of a residual sum in the ANN and in the quantised network, the target is
    ``z_ann + partner[0] − partner[1]``. At most ``max_rows`` rows (output positions) are
    fitted: whole samples, chosen with ``seed``. A grouped or string-padded convolution, or a
    layer with more than ``max_features`` inputs per output, is returned as it is.

    ``relu_steps > 0``: the output feeds a ReLU, so where the ANN's ReLU input is ``≤ 0`` only
    the fit's positive part is an error: that many times, the fit is solved again with the
    target there replaced by ``min(fit, 0)`` (the ReLU input's; the Gram matrix and its factor
    are reused, each step costs two products of the size of the right-hand side)."""
    if not can_refit(module, max_features):
        return module
    channel_dim = -1 if isinstance(module, nn.Linear) else 1
    idx = refit_rows(x_q.shape[0], z_ann[0].numel() // z_ann.shape[channel_dim], max_rows, seed)
    if idx is not None:
        idx = idx.to(x_q.device)
        x_q, z_ann = x_q[idx], z_ann[idx]
        partner = None if partner is None else tuple(t[idx] for t in partner)
    rows = lambda t: t.movedim(channel_dim, -1).reshape(-1, t.shape[channel_dim])  # noqa: E731
    floor = 0.0  # where the target is at most this, the ReLU input is ≤ 0
    if partner is not None:
        z_ann = z_ann + partner[0] - partner[1]
        floor = -rows(partner[1])
    cols = patches(module, x_q)  # [D, R]
    out = rows(z_ann)
    w = module.weight.detach().reshape(module.weight.shape[0], -1)
    b = module.bias.detach() if module.bias is not None else w.new_zeros(w.shape[0])
    prior = torch.cat([w, b.unsqueeze(1)], 1).T.double()  # [D + 1, out]
    # the normal equations of the rows [patch, 1] without building them
    D = cols.shape[0]
    gram = cols.new_empty(D + 1, D + 1, dtype=torch.float64)
    gram[:D, :D] = cols @ cols.T
    gram[:D, D] = gram[D, :D] = cols.sum(1)
    gram[D, D] = cols.shape[1]
    lam = ridge * float(gram.diagonal().mean())
    gram.diagonal().add_(lam)
    factor, info = torch.linalg.cholesky_ex(gram)
    target = out
    for step in range(relu_steps + 1):
        rhs = torch.cat([cols @ target, target.sum(0, keepdim=True)]).double() + lam * prior
        theta = (torch.cholesky_solve(rhs, factor) if int(info) == 0
                 else torch.linalg.solve(gram, rhs)).to(w.dtype)
        if step < relu_steps:
            fit = torch.addmm(theta[-1], cols.T, theta[:-1])
            target = torch.where(out <= floor, torch.minimum(fit, torch.as_tensor(floor).to(fit)),
                                 out)
    fitted = copy.deepcopy(module)
    fitted.weight.data = theta[:-1].T.reshape_as(module.weight).contiguous()
    fitted.bias = nn.Parameter(theta[-1].clone())
    return fitted
