"""engine/_ext.py: which CUDA architectures the extension is built for, and the one-line notice
before a build. Where a build would happen, torch's cpp_extension.load is replaced by a fake that
records its arguments and leaves a .so behind, so nothing is compiled (scripts/check_cuda_build.sh
compiles the CUDA extension for real). One test loads the real, cached CPU extension."""
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

from engine import _ext

REPO = Path(__file__).resolve().parent.parent
# load() without its per-process cache, so that each call goes through the build decision again
load_uncached = _ext.load.__wrapped__


@pytest.mark.parametrize("capabilities, expected", [
    ([(9, 0)], "9.0a"),                      # Hopper: arch-specific, for wgmma
    ([(8, 0)], "8.0"),
    ([(9, 0), (8, 6), (9, 0)], "8.6;9.0a"),  # each kind of visible GPU once, in order
    ([(10, 0), (12, 0)], "10.0;12.0"),       # no other arch-specific feature is used
])
def test_arch_list_from_visible_gpus(capabilities, expected):
    assert _ext.cuda_arch_list(capabilities) == expected


def test_user_arch_list_wins():
    assert _ext.cuda_arch_list([(9, 0)], "8.0;9.0") == "8.0;9.0"
    assert _ext.cuda_arch_list([], "8.0;9.0a") == "8.0;9.0a"  # no GPU needed
    # unset, empty or torch's "native": the visible GPUs
    assert _ext.cuda_arch_list([(9, 0)], "native") == "9.0a"
    assert _ext.cuda_arch_list([(9, 0)], " ") == "9.0a"


def test_no_gpu_and_no_arch_list_is_an_error():
    with pytest.raises(ValueError, match="TORCH_CUDA_ARCH_LIST"):
        _ext.cuda_arch_list([])


def test_nvcc_arch_flags():
    assert _ext.nvcc_arch_flags("8.0;9.0a") == ["-gencode=arch=compute_80,code=sm_80",
                                                "-gencode=arch=compute_90a,code=sm_90a"]
    assert _ext.nvcc_arch_flags("8.6 10.0+PTX") == ["-gencode=arch=compute_86,code=sm_86",
                                                    "-gencode=arch=compute_100,code=sm_100",
                                                    "-gencode=arch=compute_100,code=compute_100"]


@pytest.mark.parametrize("arch_list", ["Hopper", "9", "sm_90", "9.0b", "9.0a+ptx", ";"])
def test_nvcc_arch_flags_rejects_what_it_cannot_read(arch_list):
    with pytest.raises(ValueError, match="TORCH_CUDA_ARCH_LIST"):
        _ext.nvcc_arch_flags(arch_list)


@pytest.fixture
def fake_build(tmp_path, monkeypatch):
    """Builds go to tmp_path/ext; cpp_extension.load is a fake. Yields the list of its calls."""
    calls = []

    def fake_load(name, build_directory, **kwargs):
        calls.append(dict(kwargs, name=name, build_directory=build_directory))
        Path(build_directory, f"{name}.so").touch()
        return name

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.setattr(cpp_extension, "load", fake_load)
    return calls


def _notices(caplog) -> list[str]:
    found = [r.getMessage() for r in caplog.records if r.name == "engine" and "building" in r.getMessage()]
    caplog.clear()
    return found


def test_notice_before_a_build_only(fake_build, tmp_path, monkeypatch, caplog):
    # a copy of csrc/, to change its files
    csrc = tmp_path / "csrc"
    shutil.copytree(_ext.CSRC, csrc)
    monkeypatch.setattr(_ext, "CSRC", str(csrc))
    caplog.set_level(logging.WARNING, logger="engine")

    load_uncached("cpu")
    [notice] = _notices(caplog)
    assert "engine_cpu" in notice and "2.5 minutes" in notice
    assert str(tmp_path / "ext" / "engine_cpu") in notice  # where it is cached
    load_uncached("cpu")
    assert _notices(caplog) == []  # built, unchanged: silent

    (csrc / "common" / "dtypes.h").write_text((csrc / "common" / "dtypes.h").read_text() + "\n")
    load_uncached("cpu")
    assert len(_notices(caplog)) == 1  # a changed header rebuilds
    (csrc / "cuda" / "attention.h").write_text((csrc / "cuda" / "attention.h").read_text() + "\n")
    load_uncached("cpu")
    assert _notices(caplog) == []  # the CPU build includes nothing from csrc/cuda/

    os.remove(tmp_path / "ext" / "engine_cpu" / "engine_cpu.so")
    load_uncached("cpu")
    assert len(_notices(caplog)) == 1
    assert len(fake_build) == 5


@pytest.fixture
def cuda_torch(monkeypatch):
    """torch and cpp_extension as a CUDA build with a toolkit would look, with no GPU visible."""
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", "/nonexistent/cuda")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)


def test_cuda_build_for_the_arch_list(fake_build, cuda_torch, monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="engine")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    load_uncached("cuda")
    assert fake_build[-1]["extra_cuda_cflags"][-2:] == ["-gencode=arch=compute_80,code=sm_80",
                                                        "-gencode=arch=compute_90a,code=sm_90a"]
    [notice] = _notices(caplog)
    assert "engine_cuda" in notice and "8.0;9.0a" in notice and "8 minutes" in notice
    load_uncached("cuda")
    assert _notices(caplog) == []

    # Another arch list is another build: announced, and the flags torch hashes and writes into
    # its ninja file differ, so ninja rebuilds instead of loading the old .so.
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a")
    load_uncached("cuda")
    assert len(_notices(caplog)) == 1
    assert fake_build[-1]["extra_cuda_cflags"][-1:] == ["-gencode=arch=compute_90a,code=sm_90a"]
    assert fake_build[-1]["extra_cuda_cflags"] != fake_build[0]["extra_cuda_cflags"]


def test_cuda_build_for_the_visible_gpus(fake_build, cuda_torch, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: [(9, 0), (8, 0)][i])
    load_uncached("cuda")
    assert fake_build[-1]["extra_cuda_cflags"][-2:] == ["-gencode=arch=compute_80,code=sm_80",
                                                        "-gencode=arch=compute_90a,code=sm_90a"]


def test_cuda_build_without_gpu_or_arch_list_says_why(fake_build, cuda_torch):
    with pytest.raises(_ext.BuildError, match="no CUDA GPU is visible.*TORCH_CUDA_ARCH_LIST"):
        load_uncached("cuda")
    assert fake_build == []


def test_bad_arch_list_is_a_build_error(fake_build, cuda_torch, monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "Hopper")
    with pytest.raises(_ext.BuildError, match="cannot read 'Hopper'"):
        load_uncached("cuda")


def test_cached_cpu_extension_loads_silently():
    # The real extension in fresh processes: the first may build it (cold cache), the second must
    # find it built. This catches a build identity that is not stable across processes, or a
    # build folder or .so name that differs from torch's.
    code = "import logging, engine._ext as e; logging.basicConfig(); e.load('cpu')"
    first = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                           timeout=900)
    assert first.returncode == 0, first.stderr
    second = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert second.returncode == 0, second.stderr
    assert "building" not in second.stderr, second.stderr


def test_a_lock_left_by_a_killed_build_is_removed():
    # torch's build lock ("lock" in the build folder) stays behind when a build is killed, and
    # torch then waits on it forever, even for a cached build. Plant one and load in a fresh process.
    code = "import logging, engine._ext as e; logging.basicConfig(); e.load('cpu')"
    built = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert built.returncode == 0, built.stderr
    stale = os.path.join(cpp_extension._get_build_directory("engine_cpu", verbose=False), "lock")
    open(stale, "w").close()
    try:
        done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    finally:
        if os.path.exists(stale):
            os.remove(stale)
    assert done.returncode == 0, done.stderr
    assert "the lock of a build of engine_cpu that was stopped" in done.stderr, done.stderr
