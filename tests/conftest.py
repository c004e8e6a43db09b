import pytest
import torch

from scm_graph.model import build_model
from scm_graph.spec import DataSpec, NetSpec, Spec


def tiny_spec(**net) -> Spec:
    n = dict(channels=8, channel_mult=(1, 2), num_blocks=1, norm_groups=4)
    n.update(net)
    return Spec(data=DataSpec(resolution=8, channels=1, num_classes=10), net=NetSpec(**n))


@pytest.fixture
def tiny_model64():
    """A small U-Net in float64 with non-zero output weights (so F is not identically 0)."""
    torch.manual_seed(0)
    m = build_model(tiny_spec()).double()
    with torch.no_grad():
        m.net.conv_out.weight.normal_(0, 0.1)
        m.w_phi.linear.weight.normal_(0, 0.1)
    return m
