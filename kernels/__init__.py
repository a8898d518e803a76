"""Triton kernels: one file per op, each with its @triton.jit kernels, their launchers,
`supports(...)` (the limits of this backend) and `gpu_compile_cases()` (every configuration
the launchers use, for the ahead-of-time GPU compile check in engine/readiness.py). attention.py
is that file for attention; its kernels and launchers are in attention_{forward,backward,decode}.py."""
