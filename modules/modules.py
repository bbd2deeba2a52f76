"""The lab's five modules. Class names, constructor arguments and Sequential indices are the lab's,
so that a state_dict written by lab code loads unchanged. All keep the full H x W resolution."""
import torch
import torch.nn as nn

from .layers import DepthConvBlock, ResidualBlock


class RGB_Encoder(nn.Sequential):
    def __init__(self, in_chans, out_chans):
        super().__init__(
            ResidualBlock(in_chans, out_chans // 8),
            DepthConvBlock(out_chans // 8, out_chans // 8),
            ResidualBlock(out_chans // 8, out_chans // 4),
            DepthConvBlock(out_chans // 4, out_chans // 4),
            ResidualBlock(out_chans // 4, out_chans // 2),
            DepthConvBlock(out_chans // 2, out_chans // 2),
            nn.Conv2d(out_chans // 2, out_chans, 3, padding=1),
        )


class Label_Encoder(nn.Sequential):
    def __init__(self, in_chans, out_chans, norm_layer=nn.BatchNorm2d):
        # The lab writes nn.LeakyReLU(True), i.e. a slope of 1.0 (the identity); we use the
        # default slope so the layer is a non-linearity. It has no parameters, so lab weights load;
        # VAE_Model(lab_activation=True) sets the slope back to 1 for them (here and in the
        # Gaussian_Predictor).
        super().__init__(
            nn.ReflectionPad2d(3),
            nn.Conv2d(in_chans, out_chans // 2, kernel_size=7),
            norm_layer(out_chans // 2),
            nn.LeakyReLU(),
            ResidualBlock(out_chans // 2, out_chans),
        )


def reparameterize(mu, logvar, eps=None):
    """z = mu + eps * sigma with eps ~ N(0, I) (standard normal, not uniform)."""
    if eps is None:
        eps = torch.randn_like(mu)
    return mu + eps * torch.exp(0.5 * logvar)


class Gaussian_Predictor(nn.Sequential):
    """Posterior q(z | frame features, label features): returns (z, mu, logvar), each N x H x W."""

    def __init__(self, in_chans=48, out_chans=96):
        super().__init__(
            ResidualBlock(in_chans, out_chans // 4),
            DepthConvBlock(out_chans // 4, out_chans // 4),
            ResidualBlock(out_chans // 4, out_chans // 2),
            DepthConvBlock(out_chans // 2, out_chans // 2),
            ResidualBlock(out_chans // 2, out_chans),
            nn.LeakyReLU(),
            nn.Conv2d(out_chans, out_chans * 2, kernel_size=1),
        )

    def reparameterize(self, mu, logvar, eps=None):
        return reparameterize(mu, logvar, eps)

    def forward(self, img, label, eps=None):
        mu, logvar = super().forward(torch.cat([img, label], dim=1)).chunk(2, dim=1)
        return self.reparameterize(mu, logvar, eps), mu, logvar


class Decoder_Fusion(nn.Sequential):
    def __init__(self, in_chans=48, out_chans=96):
        super().__init__(
            DepthConvBlock(in_chans, in_chans),
            ResidualBlock(in_chans, in_chans // 4),
            DepthConvBlock(in_chans // 4, in_chans // 2),
            ResidualBlock(in_chans // 2, in_chans // 2),
            DepthConvBlock(in_chans // 2, out_chans // 2),
            nn.Conv2d(out_chans // 2, out_chans, 1, 1),
        )

    def forward(self, img, label, parm):
        return super().forward(torch.cat([img, label, parm], dim=1))


class Generator(nn.Sequential):
    def __init__(self, input_nc, output_nc):
        super().__init__(
            DepthConvBlock(input_nc, input_nc),
            ResidualBlock(input_nc, input_nc // 2),
            DepthConvBlock(input_nc // 2, input_nc // 2),
            ResidualBlock(input_nc // 2, input_nc // 4),
            DepthConvBlock(input_nc // 4, input_nc // 4),
            ResidualBlock(input_nc // 4, input_nc // 8),
            DepthConvBlock(input_nc // 8, input_nc // 8),
            nn.Conv2d(input_nc // 8, output_nc, 1),
        )
