"""SpikingJelly test helpers shared by the window-synchronous and calibration tests."""

import torch
from spikingjelly.activation_based import functional


@torch.no_grad()
def single_step_loop(net, x, T):
    """SpikingJelly's example loop: reset, then T single-step calls with the same input."""
    functional.set_step_mode(net, "s")
    functional.reset_net(net)
    return torch.stack([net(x) for _ in range(T)])


@torch.no_grad()
def multi_step(net, x, T):
    """``[T, N, ...]`` output of ``x`` repeated T times, in multi-step mode (left in 's')."""
    functional.set_step_mode(net, "m")
    functional.reset_net(net)
    out = net(x.unsqueeze(0).expand(T, *x.shape))
    functional.set_step_mode(net, "s")
    return out
