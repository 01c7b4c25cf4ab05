"""The QCFS activation module and its helpers."""

import pytest
import torch
from torch import nn

from tpp_plugin import QCFS, qcfs_levels, replace_relu


def test_qcfs_module_forward_and_trainable_lambda():
    act = QCFS(L=4, lam=2.0)
    y = act(torch.tensor([-1.0, 0.3, 0.9, 5.0]))
    assert torch.allclose(y, torch.tensor([0.0, 0.5, 1.0, 2.0]))
    y.sum().backward()
    assert act.lam.grad is not None
    assert act.threshold == 2.0
    frozen = QCFS(lam=2.0, trainable=False)
    assert not any(p.requires_grad for p in frozen.parameters())
    assert "lam" in dict(frozen.named_buffers())


def test_replace_relu_and_levels_context():
    net = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Sequential(nn.Linear(3, 3), nn.ReLU()))
    replace_relu(net, L=8)
    acts = [m for m in net.modules() if isinstance(m, QCFS)]
    assert len(acts) == 2 and all(a.L == 8 for a in acts)
    with qcfs_levels(net, 2):
        assert all(a.L == 2 for a in acts)
    assert all(a.L == 8 for a in acts)
    with pytest.raises(ValueError, match="nn.ReLU"):
        replace_relu(nn.Sequential(nn.Linear(2, 2)))


@pytest.mark.parametrize("kwargs, name", [({"L": 0}, "L"), ({"lam": -1.0}, "lam")])
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        QCFS(**kwargs)
