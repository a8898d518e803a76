from setuptools import find_packages, setup

# One top-level import name, `engine`. The repository's kernels/ and csrc/ are reached through the
# links engine/kernels and engine/csrc (setuptools follows them and copies the files), so the wheel
# holds engine/kernels/*.py and engine/csrc/**. bench/ is run from the repository and not installed.
# The C++/CUDA code is built on first use by engine/_ext.py (torch.utils.cpp_extension.load), so
# installing needs no compiler.
setup(
    name="engine",
    version="0.1.0",
    description="A transformer engine whose hot ops are fused Triton and C++/CUDA kernels",
    packages=find_packages(include=["engine", "engine.*"]),
    package_data={"engine": ["csrc/**/*"]},
    # The supported ranges (requirements.txt says why the triton range is what it is).
    python_requires=">=3.10,<3.14",
    install_requires=["torch>=2.11,<2.15", 'triton>=3.6,<3.10; sys_platform == "linux"', "numpy"],
)
