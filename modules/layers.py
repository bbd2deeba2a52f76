"""Building blocks of the lab's modules (adapted from learned video compression).

Parameter names and nesting match the lab's `layers.py`, so state_dicts written by lab code load.
"""
import torch.nn as nn
import torch.nn.functional as F


class ResidualBlock(nn.Module):
    """3x3 conv, LeakyReLU, 3x3 conv, LeakyReLU, plus identity (1x1 conv when channels change)."""

    def __init__(self, in_ch, out_ch, leaky_relu_slope=0.01):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1)
        self.leaky_relu = nn.LeakyReLU(negative_slope=leaky_relu_slope)
        self.conv2 = nn.Conv2d(out_ch, out_ch, kernel_size=3, padding=1)
        self.adaptor = nn.Conv2d(in_ch, out_ch, kernel_size=1) if in_ch != out_ch else None

    def forward(self, x):
        identity = x if self.adaptor is None else self.adaptor(x)
        out = self.leaky_relu(self.conv1(x))
        out = self.leaky_relu(self.conv2(out))
        return out + identity


class DepthConv(nn.Module):
    """1x1 conv + LeakyReLU, depthwise 3x3, 1x1 conv to out_ch; plus identity."""

    def __init__(self, in_ch, out_ch, depth_kernel=3, slope=0.01):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_ch, in_ch, 1), nn.LeakyReLU(negative_slope=slope))
        self.depth_conv = nn.Conv2d(in_ch, in_ch, depth_kernel, padding=depth_kernel // 2, groups=in_ch)
        self.conv2 = nn.Conv2d(in_ch, out_ch, 1)
        self.adaptor = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x):
        identity = x if self.adaptor is None else self.adaptor(x)
        return self.conv2(self.depth_conv(self.conv1(x))) + identity


class ConvFFN(nn.Module):
    """Gated 1x1 feed-forward: x + conv_out(a * LeakyReLU(b)) with (a, b) = halves of conv(x)."""

    def __init__(self, in_ch, slope=0.1):
        super().__init__()
        internal_ch = max(min(in_ch * 4, 1024), in_ch * 2)
        self.conv = nn.Conv2d(in_ch, internal_ch, 1)
        self.conv_out = nn.Conv2d(internal_ch // 2, in_ch, 1)
        self.relu = nn.LeakyReLU(negative_slope=slope)

    def forward(self, x):
        # The halves as two convolutions on the halves of the one weight, not conv(x).chunk(2): in
        # channels_last the chunks are strided views, on which the gate's multiply and LeakyReLU
        # ran 2-4x slower (CPU, bf16, measured). Same function, same parameters.
        w, b, h = self.conv.weight, self.conv.bias, self.conv.out_channels // 2
        return x + self.conv_out(F.conv2d(x, w[:h], b[:h]) * self.relu(F.conv2d(x, w[h:], b[h:])))


class DepthConvBlock(nn.Module):
    def __init__(self, in_ch, out_ch, depth_kernel=3, slope_depth_conv=0.01, slope_ffn=0.1):
        super().__init__()
        self.block = nn.Sequential(
            DepthConv(in_ch, out_ch, depth_kernel, slope=slope_depth_conv),
            ConvFFN(out_ch, slope=slope_ffn),
        )

    def forward(self, x):
        return self.block(x)
