"""The model's building blocks, importable as `from modules import VAE_Model`. They load on first
use (PEP 562), so that importing a light module of this package (modules.environment) does not
load torch."""
import importlib

_WHERE = {"ConvFFN": "layers", "DepthConv": "layers", "DepthConvBlock": "layers", "ResidualBlock": "layers",
          "Decoder_Fusion": "modules", "Gaussian_Predictor": "modules", "Generator": "modules",
          "Label_Encoder": "modules", "RGB_Encoder": "modules", "VAE_Model": "model"}
__all__ = list(_WHERE)


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
