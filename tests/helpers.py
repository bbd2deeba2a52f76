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


def fake_cuda_graphs(monkeypatch, graph_class, capture):
    """Let modules.runtime's CUDA-graph capture run on the CPU: streams that do nothing,
    `graph_class` for torch.cuda.CUDAGraph and `capture(graph)` (a context manager) for
    torch.cuda.graph."""
    import contextlib

    class FakeStream:
        def wait_stream(self, other):
            pass

    stream = FakeStream()
    monkeypatch.setattr(torch.cuda, "Stream", lambda: stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", graph_class)
    monkeypatch.setattr(torch.cuda, "graph", capture)
