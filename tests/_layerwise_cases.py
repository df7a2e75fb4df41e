"""What the layer-wise tests share: one torch thread, the relative error, a small U-Net."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from haloseg.models.unet import UNet


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> object:
    """Blocks are tiny: thread start-up and spinning would dominate the run time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference relative to the reference's largest magnitude."""
    return ((a - b).abs().max() / b.abs().max()).item()


def small_unet(n: int, norm: str, up: str, dtype: torch.dtype = torch.float64) -> UNet:
    """A depth-2 U-Net with 4 base channels, 2 input channels and 3 classes."""
    torch.manual_seed(0)
    m = UNet(spatial_dims=n, in_channels=2, out_channels=3, depth=2, base_channels=4,
             norm=norm, upsampling=up)  # fmt: skip
    return m.to(dtype)


class Zoo(nn.Module):
    """Padding modes, strides, dilation, pooling, functional convolution with a standardised
    weight (a constant computed from a parameter), a broadcast scale, in-place operations."""

    def __init__(self) -> None:
        super().__init__()
        self.reflect = nn.Conv2d(2, 4, 3, padding=2, dilation=2, padding_mode="reflect")
        self.replicate = nn.Conv2d(4, 4, 5, padding=2, padding_mode="replicate")
        self.down = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        self.avg = nn.AvgPool2d(3, stride=1, padding=1)
        self.weight = nn.Parameter(torch.randn(4, 6, 3, 3))
        self.scale = nn.Parameter(torch.rand(1, 4, 1, 1) + 0.5)
        self.up = nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, output_padding=1)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act(self.reflect(x))
        b = self.replicate(a)
        b.relu_()  # in place: later readers of b see the activation, as in eager
        c = self.avg(self.down(b + a * 0.5))  # 9 x 11
        u = self.up(self.pool(c))  # 10 x 12
        d = F.interpolate(c, size=u.shape[2:], mode="bilinear", align_corners=True)
        w = (self.weight - self.weight.mean()) / self.weight.std()
        e = F.conv2d(d, w, padding="same") * self.scale
        e += u  # in place on a value another layer read before
        f = F.pad(e + u, (1, 2, 3, 0), mode="replicate")
        g = F.interpolate(F.pad(f, (-1, -2, 0, -3)), size=b.shape[2:], mode="nearest")
        return torch.cat([g, b], dim=1)[:, 1:]  # channels only
