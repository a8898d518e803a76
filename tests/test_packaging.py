"""Packaging: the wheel installs one top-level import name, `engine`, which carries the Triton
kernels (engine/kernels) and the C++/CUDA sources (engine/csrc); and `import engine` works
without triton, with every other backend running."""
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tracked_files(*folders: str) -> list[str]:
    """The files under `folders` that git would commit (tracked, or untracked and not ignored)."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", *folders],
                         cwd=ROOT, check=True, capture_output=True).stdout.decode()
    return [name for name in out.split("\0") if name and os.path.lexists(ROOT / name)]


def copy_checkout(destination: Path, *paths: str) -> None:
    """Copy what git would commit under `paths` (links stay links: engine/kernels, engine/csrc)."""
    for name in tracked_files(*paths):
        path, copy = ROOT / name, destination / name
        copy.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink():
            copy.symlink_to(os.readlink(path))
        else:
            shutil.copy2(path, copy)


def test_wheel_has_only_engine_with_kernels_and_csrc(tmp_path):
    # Built from a copy: setuptools puts whatever build/lib holds into the wheel, so a build/ left
    # by an older layout in the checkout would leak its top-level names into this one.
    source = tmp_path / "source"
    copy_checkout(source, "setup.py", "engine", "kernels", "csrc")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--disable-pip-version-check", "-w", str(tmp_path / "dist"), str(source)],
                   check=True)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())

    top_level = {name.split("/")[0] for name in names}
    assert {name for name in top_level if not name.endswith(".dist-info")} == {"engine"}
    for folder in ("kernels", "csrc"):
        in_repo = {f"engine/{name}" for name in tracked_files(folder)}
        assert in_repo, f"no files under {folder}/"
        assert in_repo <= names, sorted(in_repo - names)


HIDE_TRITON = """
import sys

class HideTriton:  # as if triton were not installed
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError(f"No module named {name!r} (hidden by the test)")

sys.meta_path.insert(0, HideTriton())
"""

WITHOUT_TRITON = HIDE_TRITON + """
import torch
import engine
import engine.functional as EF

x, w, b = torch.randn(4, 32, dtype=torch.float64), torch.randn(32, dtype=torch.float64), torch.randn(32, dtype=torch.float64)
expected = torch.nn.functional.layer_norm(x, (32,), w, b)
for backend in ("cpu", "reference"):
    torch.testing.assert_close(EF.layer_norm(x, (32,), w, b, backend=backend), expected)
state = engine.backends.available()["triton"]
assert not state.available, state
assert "hidden by the test" in state.reason, state.reason
assert not [m for m in sys.modules if m == "triton" or m.startswith(("triton.", "engine.kernels"))]
print("ok:", state.reason)
"""


def test_engine_works_without_triton():
    # TRITON_INTERPRET=1 would make the triton backend available on the CPU: the only reason left
    # for it to be unavailable is the import error.
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(WITHOUT_TRITON)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok: triton does not import" in result.stdout, result.stdout


FIRST_TRITON_USE_WHILE_TRACING = """
import torch
import engine.functional as EF
from engine import backends

assert backends.status.cache_info().currsize == 0  # nothing asked yet: the kernels are not imported

def f(x, w, b):
    y = EF.layer_norm(x, (32,), w, b, backend="reference")  # the registry is read before triton's status
    return EF.layer_norm(y, (32,), w, b, backend="triton")

x, w, b = torch.randn(4, 32), torch.randn(32), torch.randn(32)
torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="aot_eager")(x, w, b), f(x, w, b))
print("ok")
"""


def test_triton_kernels_import_while_tracing():
    """torch.compile traces the backend choice; the Triton kernels may be imported for the first
    time in the middle of that trace, and the graph must still be whole and right."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(FIRST_TRITON_USE_WHILE_TRACING)], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "ok", result.stdout


def test_scripts_run_an_existing_python_as_is(tmp_path):
    """./test.sh on a checkout without .venv and without network: with ENGINE_PYTHON, and with a
    python3 on PATH that has what the tests need, it runs that Python and creates nothing."""
    checkout = tmp_path / "checkout"
    copy_checkout(checkout, "test.sh", "scripts", "requirements.txt", "setup.py", "pytest.ini", "engine", "kernels",
                  "csrc", "tests")
    shims = tmp_path / "bin"  # python3 on PATH: this test's interpreter (a link would lose its venv)
    shims.mkdir()
    (shims / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (shims / "python3").chmod(0o755)
    offline = {"PIP_NO_INDEX": "1", "PATH": f"{shims}:{os.environ['PATH']}"}
    for switch in ({"ENGINE_PYTHON": sys.executable}, {}):
        env = {k: v for k, v in os.environ.items() if k != "ENGINE_PYTHON"} | offline | switch
        result = subprocess.run(["./test.sh", "--collect-only", "tests/test_packaging.py"], cwd=checkout,
                                env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
        python = switch.get("ENGINE_PYTHON", str(shims / "python3"))
        assert f"running {python} as is (no .venv)" in result.stderr, result.stderr
        assert "test_scripts_run_an_existing_python_as_is" in result.stdout, result.stdout
        assert not (checkout / ".venv").exists()
