"""Builds and loads the C++/CUDA code in csrc/ on first use, cached between runs.

Two extensions come from the same sources:
    engine_cpu   csrc/bindings/*.cpp + csrc/cpu/*.cpp                 (OpenMP, -O3 -march=native)
    engine_cuda  the same, compiled with -DENGINE_WITH_CUDA, + csrc/cuda/*.cu
torch.utils.cpp_extension.load hashes the sources and flags, so an unchanged tree loads the
cached build (~0.1 s) and a change rebuilds it (~20 s). The cache lives in TORCH_EXTENSIONS_DIR
(default ~/.cache/torch_extensions).
"""
import functools
import glob
import os

# engine/csrc: in the repository a link to the top-level csrc/, in an installed wheel a copy. The
# resolved path keeps compiler messages (and torch's build cache) on the real files.
CSRC = os.path.realpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc"))


class BuildError(RuntimeError):
    """The extension could not be built here; the message carries the compiler's output."""


def sources(kind: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(CSRC, "bindings", "*.cpp")))
    files += sorted(glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))
    if kind == "cuda":
        files += sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
    return files


@functools.lru_cache(maxsize=None)
def load(kind: str = "cpu"):
    """The built extension module for `kind` ("cpu" or "cuda"); raises BuildError with the reason."""
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"kind must be 'cpu' or 'cuda', got {kind!r}")
    import torch
    from torch.utils import cpp_extension

    if kind == "cuda" and cpp_extension.CUDA_HOME is None:
        raise BuildError("no CUDA toolkit found (CUDA_HOME is unset and nvcc is not on PATH)")
    if kind == "cuda" and torch.version.cuda is None:
        raise BuildError("this torch build has no CUDA support")
    cflags = ["-O3", "-march=native", "-fopenmp"]
    if kind == "cuda":
        cflags.append("-DENGINE_WITH_CUDA")
    try:
        return cpp_extension.load(
            name=f"engine_{kind}",
            sources=sources(kind),
            extra_include_paths=[CSRC],
            extra_cflags=cflags,
            extra_cuda_cflags=["-O3", "-std=c++17"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as error:  # compiler errors arrive as RuntimeError/CalledProcessError/OSError
        message = str(error)
        output = getattr(error, "output", None)
        if output:
            message += "\n" + (output.decode() if isinstance(output, bytes) else str(output))
        raise BuildError(f"building the {kind} extension failed: {message}") from error
