"""engine: a transformer engine whose hot ops are fused Triton and C++/CUDA kernels.

    import engine
    import engine.functional as EF        # torch.nn.functional's signatures
    y = EF.layer_norm(x, (768,), w, b)    # runs the fastest backend available for x's device
    engine.backends.available()           # which backends work here, and why not
"""
from engine import backends, functional, nn, ops  # noqa: F401  (ops registers the implementations)
from engine.optimize import optimize  # noqa: E402

__all__ = ["backends", "functional", "nn", "optimize"]
