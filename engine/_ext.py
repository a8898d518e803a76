"""Builds and loads the C++/CUDA code in csrc/ on first use, cached between runs.

Two extensions come from the same sources:
    engine_cpu   csrc/bindings/*.cpp + csrc/cpu/*.cpp                 (OpenMP, -O3 -march=native)
    engine_cuda  the same, compiled with -DENGINE_WITH_CUDA, + csrc/cuda/*.cu, for the GPU
                 architectures of cuda_arch_list (sm_90a on Hopper, for wgmma)
torch.utils.cpp_extension.load writes a ninja file from the sources and flags and runs ninja, so an
unchanged tree loads the cached build (~0.1 s) and a change rebuilds what it affects. A cold build
takes minutes (BUILD_MINUTES), so it is announced on the `engine` logger first. The cache lives
in TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions).
"""
import contextlib
import functools
import glob
import hashlib
import logging
import os
import re
import sys

# engine/csrc: in the repository a link to the top-level csrc/, in an installed wheel a copy. The
# resolved path keeps compiler messages (and torch's build cache) on the real files.
CSRC = os.path.realpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc"))

logger = logging.getLogger("engine")

# Cold build times measured on a busy 2-core machine (ninja compiles one file per core, so more
# cores take less); the CUDA one for two architectures (8.0;9.0a).
BUILD_MINUTES = {"cpu": 2.5, "cuda": 8}

# Compute capabilities built with their arch-specific features (the "a" of sm_90a). Only the
# wgmma path of csrc/cuda/{forward,backward}_attention.cu uses such features (it is compiled only where
# __CUDA_ARCH_FEAT_SM90_ALL is defined); sm_90a code runs on capability 9.0 alone, which is
# exactly what it is built for here.
ARCH_SPECIFIC = {(9, 0)}

# One entry of a TORCH_CUDA_ARCH_LIST: "8.0", "9.0a", "10.0f", optionally with "+PTX".
_ARCH_ENTRY = re.compile(r"(\d+)\.(\d)([af]?)(\+PTX)?")


class BuildError(RuntimeError):
    """The extension could not be built here; the message carries the compiler's output."""


def sources(kind: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(CSRC, "bindings", "*.cpp")))
    files += sorted(glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))
    if kind == "cuda":
        files += sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
    return files


def cuda_arch_list(capabilities, user_list: str | None = None) -> str:
    """The architectures to build the CUDA extension for, as a TORCH_CUDA_ARCH_LIST string.

    user_list (the user's TORCH_CUDA_ARCH_LIST) wins when set; "native" means the visible GPUs,
    as in torch. Otherwise each distinct (major, minor) capability of the visible GPUs, with the
    arch-specific suffix where ARCH_SPECIFIC says: [(9, 0), (8, 0), (9, 0)] -> "8.0;9.0a"."""
    if user_list and user_list.strip() not in ("", "native"):
        return user_list.strip()
    if not capabilities:
        raise ValueError("no CUDA GPU is visible to build the CUDA extension for; set "
                         "TORCH_CUDA_ARCH_LIST (for example '8.0;9.0a') to build without one")
    return ";".join(f"{major}.{minor}{'a' if (major, minor) in ARCH_SPECIFIC else ''}"
                    for major, minor in sorted(set(capabilities)))


def nvcc_arch_flags(arch_list: str) -> list[str]:
    """nvcc flags for a TORCH_CUDA_ARCH_LIST string ("8.0;9.0a"; ";" or spaces between entries):
    one -gencode per entry, plus one embedding PTX for an entry ending in "+PTX". The -gencode
    form, as torch writes it, rather than -arch=sm_90a: with nvcc 13 the latter also embeds
    compute_90 PTX, and ptxas rejects wgmma there (see NVCC_ARCH in engine/readiness.py).
    Passing these flags ourselves, rather than leaving the list to torch, makes them part of the
    flags torch hashes and writes into its ninja file: a changed list rebuilds."""
    flags = []
    for entry in arch_list.replace(" ", ";").split(";"):
        if not entry:
            continue
        match = _ARCH_ENTRY.fullmatch(entry)
        if not match:
            raise ValueError(f"TORCH_CUDA_ARCH_LIST={arch_list!r}: cannot read {entry!r}; give compute "
                             "capabilities such as '8.0;9.0a' ('a' for arch-specific features, '+PTX' "
                             "to embed PTX too)")
        number = match[1] + match[2] + match[3]
        flags.append(f"-gencode=arch=compute_{number},code=sm_{number}")
        if match[4]:
            flags.append(f"-gencode=arch=compute_{number},code=compute_{number}")
    if not flags:
        raise ValueError(f"TORCH_CUDA_ARCH_LIST={arch_list!r} names no architecture")
    return flags


def build_identity(kind: str, settings) -> str:
    """A hash of what the build of `kind` is made from: the csrc/ files it compiles or includes
    (the cpu build never includes csrc/cuda/), with their paths, and `settings` (the flags and the
    toolchain). The same inputs give the same ninja file, so ninja has nothing to do."""
    digest = hashlib.sha256(repr(settings).encode())
    cuda_dir = os.path.join(CSRC, "cuda", "")
    for path in sorted(glob.glob(os.path.join(CSRC, "**", "*"), recursive=True)):
        if not os.path.isfile(path) or (kind == "cpu" and path.startswith(cuda_dir)):
            continue
        with open(path, "rb") as f:
            digest.update(path.encode() + b"\0" + f.read())
    return digest.hexdigest()


def _identity_file(build_dir: str) -> str:
    return os.path.join(build_dir, "engine_build_identity")


def is_built(build_dir: str, name: str, identity: str) -> bool:
    """Whether build_dir holds the extension `name` built from `identity` (recorded by
    record_build after the last successful load), so that loading it compiles nothing."""
    try:
        with open(_identity_file(build_dir)) as f:
            recorded = f.read().strip()
    except OSError:
        return False
    return recorded == identity and os.path.exists(os.path.join(build_dir, f"{name}.so"))


def record_build(build_dir: str, identity: str):
    with open(_identity_file(build_dir), "w") as f:
        f.write(identity + "\n")


@functools.lru_cache(maxsize=None)
def load(kind: str = "cpu"):
    """The built extension module for `kind` ("cpu" or "cuda"); raises BuildError with the reason."""
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"kind must be 'cpu' or 'cuda', got {kind!r}")
    import torch
    from torch.utils import cpp_extension

    name = f"engine_{kind}"
    cflags = ["-O3", "-march=native", "-fopenmp"]
    cuda_cflags = ["-O3", "-std=c++17"]
    what = f"the C++ extension {name}"
    if kind == "cuda":
        if cpp_extension.CUDA_HOME is None:
            raise BuildError("no CUDA toolkit found (CUDA_HOME is unset and nvcc is not on PATH)")
        if torch.version.cuda is None:
            raise BuildError("this torch build has no CUDA support")
        capabilities = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
        try:
            arch_list = cuda_arch_list(capabilities, os.environ.get("TORCH_CUDA_ARCH_LIST"))
            cuda_cflags += nvcc_arch_flags(arch_list)
        except ValueError as error:
            raise BuildError(str(error)) from error
        cflags.append("-DENGINE_WITH_CUDA")
        what += f" for CUDA architectures {arch_list}"
    ldflags = ["-fopenmp"]

    # torch's own choice of folder (TORCH_EXTENSIONS_DIR, or a per-Python, per-torch-build folder
    # under ~/.cache/torch_extensions), so that the build is found where load() puts it.
    build_dir = cpp_extension._get_build_directory(name, verbose=False)
    identity = build_identity(kind, (cflags, cuda_cflags, ldflags, torch.__version__, torch.__file__,
                                     sys.version, cpp_extension.CUDA_HOME if kind == "cuda" else None,
                                     os.environ.get("CXX")))
    try:
        with _one_build_at_a_time(build_dir):
            if not is_built(build_dir, name, identity):
                logger.warning("engine: building %s (first use, or csrc/ changed): about %s minutes on 2 "
                               "cores; cached in %s", what, BUILD_MINUTES[kind], build_dir)
            module = cpp_extension.load(
                name=name,
                sources=sources(kind),
                extra_include_paths=[CSRC],
                extra_cflags=cflags,
                extra_cuda_cflags=cuda_cflags,
                extra_ldflags=ldflags,
                build_directory=build_dir,
                verbose=False,
            )
    except Exception as error:  # compiler errors arrive as RuntimeError/CalledProcessError/OSError
        message = str(error)
        output = getattr(error, "output", None)
        if output:
            message += "\n" + (output.decode() if isinstance(output, bytes) else str(output))
        raise BuildError(f"building the {kind} extension failed: {_first_errors(message)} "
                         f"(full compiler log: {_write_log(build_dir, message)})") from error
    record_build(build_dir, identity)
    return module


@contextlib.contextmanager
def _one_build_at_a_time(build_dir: str):
    """Holds an flock on build_dir/engine_build.flock around torch's load. torch's own lock, a file
    named "lock" that the building process creates and deletes, outlives a build that was killed
    (Ctrl-C during the first build): every later load, cached or not, then waits on it forever
    without a word (seen: a build check sat 25 minutes on one). The kernel releases an flock when
    its holder dies, so a "lock" file found while this one is held was left by a dead engine build
    and is removed."""
    import fcntl

    os.makedirs(build_dir, exist_ok=True)
    with open(os.path.join(build_dir, "engine_build.flock"), "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        try:
            stale = os.path.join(build_dir, "lock")
            if os.path.exists(stale):
                logger.warning("engine: removing %s, the lock of a build of %s that was stopped before "
                               "it finished", stale, os.path.basename(build_dir))
                os.remove(stale)
            yield
        finally:
            fcntl.flock(guard, fcntl.LOCK_UN)


def _first_errors(log: str, count: int = 3) -> str:
    """The first `count` lines of a compiler log that report an error (else its first lines):
    a whole log is kilobytes, and it would be repeated wherever the reason is shown."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()] or lines
    return " | ".join(errors[:count])


def _write_log(build_dir: str, log: str) -> str:
    path = os.path.join(build_dir, "build_error.log")
    try:
        os.makedirs(build_dir, exist_ok=True)
        with open(path, "w") as f:
            f.write(log)
    except OSError as error:
        return f"not written ({error})"
    return path
