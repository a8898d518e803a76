from setuptools import find_packages, setup

# The C++/CUDA code in csrc/ is built on first use by engine/_ext.py (torch.utils.cpp_extension.load),
# so a plain `pip install -e .` needs no compiler.
setup(
    name="engine",
    version="0.1.0",
    description="A transformer engine whose hot ops are fused Triton and C++/CUDA kernels",
    packages=find_packages(include=["engine", "engine.*", "kernels", "bench"]),
    package_data={"": ["../csrc/**/*"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "triton>=3.2", "numpy"],
)
