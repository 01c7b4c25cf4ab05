"""The threshold search: per channel (or per layer) the candidate thresholds are scored on
binned statistics of the activations (:func:`binned_search`; for the exact count from prefix
sums over the bins, :func:`exact_count_errors`), or on every activation
(:func:`exact_search`); :func:`output_gradients` gives the Fisher weights of
``objective='fisher'``."""

from __future__ import annotations

import torch
from torch import nn

from .quantiser import random_count_mean

__all__ = [
    "output_gradients",
    "channels_first",
    "subsample_samples",
    "sample_subset",
    "bin_statistics",
    "exact_count_errors",
    "binned_search",
    "exact_search",
]


def output_gradients(gm, probes, x, batch_size) -> list:
    """Per ReLU call, the squared gradient of the float ANN's loss (cross-entropy against its own
    prediction) with respect to the call's output, summed over the batch: the Fisher weight of
    each activation."""
    weights = [None] * len(probes)
    for p in probes:
        p.keep_output = True
    try:
        with torch.enable_grad():
            for i in range(0, x.shape[0], batch_size):
                out = gm(x[i:i + batch_size].detach().requires_grad_(True))
                if out.dim() < 2:
                    raise ValueError(
                        "objective='fisher' needs a classifier output of shape [N, classes]; "
                        "use objective='activation'")
                target = out.detach().argmax(1)
                loss = nn.functional.cross_entropy(out, target, reduction="sum")
                grads = torch.autograd.grad(loss, [p.output for p in probes],
                                            allow_unused=True)
                for j, g in enumerate(grads):
                    g = torch.zeros_like(probes[j].output) if g is None else g.detach() ** 2
                    weights[j] = g if weights[j] is None else torch.cat([weights[j], g])
    finally:
        for p in probes:
            p.keep_output, p.output = False, None
    return weights


def channels_first(t: torch.Tensor, dim: int) -> torch.Tensor:
    """``[C, M]``, contiguous (the histograms' scatters are several times faster on it)."""
    return t.movedim(dim, 0).reshape(t.shape[dim], -1).contiguous()


def bin_statistics(a, target, weight, granularity, bins):
    """Histograms of each channel's non-negative pre-activations (``a``, ``[C, M]``) on
    ``[0, top]``: per bin the (weighted) count, sum and sum of squares of ``target``
    (``[C, bins + 1]`` each; column 0 holds the negatives, column ``b + 1`` bin ``b``)."""
    C = a.shape[0]
    top = a.amax(1).clamp(min=0) if granularity == "channel" else a.amax().clamp(min=0).expand(C)
    top = torch.where(top > 0, top, torch.ones_like(top))
    # bin of each value, shifted by one: the negatives (floor < 0) all land in bin 0
    idx = torch.addcmul(torch.ones((), dtype=a.dtype, device=a.device), a,
                        (bins / top).unsqueeze(1)).floor_().clamp_(0, bins).long()
    wt = target if weight is None else weight * target
    stats = []
    for values in (weight, wt, wt * target):
        acc = torch.zeros(C, bins + 1, dtype=a.dtype, device=a.device)
        if values is None:  # unweighted counts
            values = torch.ones((), dtype=a.dtype, device=a.device).expand_as(a)
        stats.append(acc.scatter_add_(1, idx, values))
    return top, stats


def exact_count_errors(n, s, ss_sum, neg_sum, top, T, fractions, offsets, coherence,
                       free_scale, m):
    """Errors ``[K, U, C]`` (and output steps, or ``None``) of every candidate fraction ``k`` and
    offset ``u`` for the exact count, from prefix sums over the bins: a bin's level is
    non-decreasing in its index, so each candidate is ``T`` bin boundaries and costs
    ``O(C · T)``, not ``O(C · bins)``.

    Level ``≥ j`` holds from the first bin whose centre ``c`` has ``c·T/θ + u + ½ ≥ j``; with
    ``θ = f·top`` and ``c = (b + ½)·top/B`` that bin is ``ceil((j − ½ − u)·B·f/T − ½)``, the
    same for every channel. ``Σ_l l·S_l`` and ``Σ_l l²·N_l`` are sums over ``j`` of the tails
    above those boundaries (``l² = Σ_{j ≤ l} (2j − 1)``).
    """
    C, B = n.shape
    zero = n.new_zeros(C, 1)
    tail_n = torch.cat([zero, n.cumsum(1)], 1)
    tail_n = tail_n[:, -1:] - tail_n  # [C, B + 1]: Σ of bins ≥ e
    tail_s = torch.cat([zero, s.cumsum(1)], 1)
    tail_s = tail_s[:, -1:] - tail_s
    j = torch.arange(1, T + 1, dtype=torch.float64)
    f = fractions.double().view(-1, 1, 1)
    u = offsets.double().view(1, -1, 1)
    first = torch.ceil((j - 0.5 - u) * (B / T) * f - 0.5).clamp_(0, B).long()  # [K, U, T]
    K, U = first.shape[:2]
    idx = first.reshape(-1).to(n.device)
    tn = tail_n[:, idx].view(C, K, U, T)
    ts = tail_s[:, idx].view(C, K, U, T)
    level_n = tn.sum(-1)  # Σ_l l·N_l
    num = ts.sum(-1)  # Σ_l l·S_l
    den = (tn * (2 * j.to(tn) - 1)).sum(-1)  # Σ_l l²·N_l
    fixed = (f.view(1, -1, 1).to(n) * top.view(C, 1, 1) / T)  # θ/T: [C, K, 1]
    ss = ss_sum.view(C, 1, 1)
    steps = None
    if free_scale:
        ok = (den > 0) & (num > 0)
        step = torch.where(ok, num / den.clamp(min=1e-30), fixed.expand_as(num))
        err = torch.where(ok, ss - num * step, fixed * fixed * den - 2 * fixed * num + ss)
        steps = step.permute(1, 2, 0)
    else:
        step = fixed
        err = step * step * den - 2 * step * num + ss
    if coherence:
        total = step * level_n - tail_s[:, :1].view(C, 1, 1) + neg_sum.view(C, 1, 1)
        err = err + coherence * total * total / m
    return err.permute(1, 2, 0), steps


def binned_search(a, target, weight, T, fractions, offsets, granularity, bins, coherence=0.0,
                  count="exact", free_scale=False):
    """Joint search of the threshold (per channel, or per layer) and of a per-channel rounding
    offset ``u`` (a bias shift of ``u·θ/T``) on binned statistics.

    ``a`` (pre-activations), ``target`` (the ANN's activations) and ``weight`` are ``[C, M]``.
    The non-negative pre-activations of each channel are put in ``bins`` bins on ``[0, max]``;
    per bin the (weighted) count, sum and sum of squares of the target give the squared error
    of any quantiser that is constant on the bin, so every candidate costs ``O(C · bins)``
    (``O(C · T)`` for the exact count, :func:`exact_count_errors`) instead of ``O(C · M)``.
    Negative pre-activations give 0 for every candidate (``|u| ≤ ½``) and do not affect the
    choice. Returns ``(theta, u, scale)``: ``[C]`` (or 0-d), ``[C]`` and ``[C]`` or ``None``.
    """
    C = a.shape[0]
    if bins is None:  # 512, but a few values per bin at least
        bins = min(512, max(64, a.shape[1] // 8))
    top, stats = bin_statistics(a, target, weight, granularity, bins)
    n, s, ss = (t[:, 1:] for t in stats)
    m = a.shape[1]
    # the (weighted) error sum of the negatives (output 0 for every candidate): -Σ w·target
    neg_sum = -stats[1][:, 0]  # [C]
    ss_sum = ss.sum(-1)  # [C]
    steps = None
    if count == "exact":
        errors, steps = exact_count_errors(
            n.double(), s.double(), ss_sum.double(), neg_sum.double(), top.double(), T,
            fractions, offsets, coherence, free_scale, m)
    else:  # two-point count: floor(w) or floor(w) + 1, with the rule's mean
        centres = (torch.arange(bins, dtype=a.dtype, device=a.device) + 0.5) / bins
        centres = centres.unsqueeze(0) * top.unsqueeze(1)  # [C, B]
        u = offsets.to(a.dtype).view(-1, 1, 1)  # [U, 1, 1]
        w_top = centres.unsqueeze(0) * (T / top).unsqueeze(1)  # [1, C, B]: w of each bin at θ=top
        errors = []
        for k in range(fractions.numel()):
            theta = (fractions[k] * top).view(1, C, 1)
            w_bin = w_top / fractions[k] + u
            low = torch.floor(w_bin).clamp_(0, T)
            p_up = (random_count_mean(w_bin, T, count) - low).clamp_(0, 1)
            q_lo, q_hi = low * theta / T, (low + 1) * theta / T
            err = ((1 - p_up) * (n * q_lo * q_lo - 2 * q_lo * s + ss)
                   + p_up * (n * q_hi * q_hi - 2 * q_hi * s + ss)).sum(-1)
            if coherence:
                q = q_lo + p_up * theta / T  # the mean
                total = (n * q - s).sum(-1) + neg_sum  # Σ e per channel
                err = err + coherence * total * total / m
            errors.append(err)
        errors = torch.stack(errors)  # [K, U, C]
    best_u_err, best_u = errors.min(1)  # [K, C]
    if granularity == "channel":
        best_k = best_u_err.argmin(0)  # [C]
        theta = fractions[best_k].to(a.dtype) * top
        u_idx = best_u.gather(0, best_k.view(1, -1)).squeeze(0)
    else:
        best_k = best_u_err.sum(1).argmin().expand(C)
        theta = fractions[best_k[0]].to(a.dtype) * top[0]
        u_idx = best_u[best_k[0]]
    scale = None
    if steps is not None:
        chosen = steps[best_k, u_idx, torch.arange(C, device=a.device)]
        scale = (chosen * T).to(a.dtype)
    return theta, offsets[u_idx], scale


def exact_search(a, target, weight, T, fractions, granularity):
    """The best threshold per channel (``[C]``) or per layer (0-d) from ``fractions`` of the
    calibration maximum, for pre-activations ``a`` and ANN activations ``target``
    (both ``[C, M]``), with squared-error weights ``weight`` (``[C, M]`` or ``None``)."""
    pos = a.clamp(min=0)
    if granularity == "channel":
        top = pos.amax(1)
    else:
        top = pos.amax().expand(a.shape[0])
    top = torch.where(top > 0, top, torch.ones_like(top))
    K = fractions.numel()
    chunk = max(1, min(K, (1 << 23) // max(1, a.numel())))
    a_T = (a * T).unsqueeze(0)
    errors = []
    for k0 in range(0, K, chunk):
        theta = (fractions[k0:k0 + chunk].view(-1, 1) * top.view(1, -1)).unsqueeze(-1)  # [k,C,1]
        u = a_T / theta
        u.add_(0.5).floor_().clamp_(0, T).mul_(theta / T).sub_(target.unsqueeze(0)).square_()
        if weight is not None:
            u.mul_(weight.unsqueeze(0))
        errors.append(u.sum(-1))  # [k, C]
    errors = torch.cat(errors)  # [K, C]
    if granularity == "channel":
        best = errors.argmin(0)
        return fractions[best] * top
    best = errors.sum(1).argmin()
    return fractions[best] * top[0]


def subsample_samples(tensors, channel_dim: int, max_values, seed: int):
    """The same random samples (along dim 0) of each tensor, enough for about ``max_values``
    values per channel (all if fewer; dim 0 being the channel dimension, all)."""
    t0 = tensors[0]
    per_sample = t0[0].numel() // t0.shape[channel_dim] if channel_dim else 0
    idx = sample_subset(t0.shape[0], per_sample, max_values, seed)
    if idx is None:
        return tensors
    idx = idx.to(t0.device)
    return [None if t is None else t[idx] for t in tensors]


def sample_subset(n: int, per_sample: int, max_values, seed: int):
    """The sorted indices of the samples :func:`subsample_samples` keeps out of ``n`` with
    ``per_sample`` values per channel each, or ``None`` for all of them (on the CPU)."""
    if max_values is None or not per_sample or n * per_sample <= max_values:
        return None
    keep = -(-max_values // per_sample)
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:keep]
    return idx.sort().values

