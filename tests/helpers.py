"""Shared test helpers."""
import torch


@torch.no_grad()
def jitter(model, seed=0, scale=0.05):
    """Add small random values to every parameter: a model as after some training, whose
    posterior differs from the prior and whose decoder reads z (at initialisation neither holds),
    so that the tests exercise every path. Returns the model."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g) * scale)
    return model
