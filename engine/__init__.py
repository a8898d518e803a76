"""engine: a transformer engine whose hot ops are fused Triton and C++/CUDA kernels."""
