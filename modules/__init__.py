from .layers import ConvFFN, DepthConv, DepthConvBlock, ResidualBlock
from .modules import Decoder_Fusion, Gaussian_Predictor, Generator, Label_Encoder, RGB_Encoder
from .model import VAE_Model

__all__ = ["ConvFFN", "DepthConv", "DepthConvBlock", "ResidualBlock", "Decoder_Fusion", "Gaussian_Predictor",
           "Generator", "Label_Encoder", "RGB_Encoder", "VAE_Model"]
