"""A machine whose C++ compiler is broken: the automatic choice falls back to the reference backend
with one concise warning and a correct result, and an explicit backend="cpu" raises BackendError
carrying the compiler's first error. Runs in a subprocess with an empty extension folder and a
failing compiler (CXX), so the real build cache is never touched."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent("""
    import logging, torch, torch.nn.functional as F
    import engine.functional as EF
    from engine import backends
    logging.basicConfig(level=logging.WARNING, format="WARNING %(message)s")
    x, w = torch.randn(4, 8), torch.randn(3, 8)
    torch.testing.assert_close(EF.layer_norm(x, (8,)), F.layer_norm(x, (8,)))
    torch.testing.assert_close(EF.linear(x, w, None, "gelu"), F.gelu(F.linear(x, w)))
    torch.testing.assert_close(EF.gelu(x), F.gelu(x))
    q = torch.randn(1, 2, 5, 8)
    torch.testing.assert_close(EF.scaled_dot_product_attention(q, q, q), F.scaled_dot_product_attention(q, q, q))
    try:
        EF.layer_norm(x, (8,), backend="cpu")
    except backends.BackendError as error:
        print("EXPLICIT", error)
""")


def test_a_broken_compiler_falls_back_with_one_concise_warning(tmp_path):
    compiler = tmp_path / "broken-c++"
    compiler.write_text("#!/bin/sh\necho 'broken-c++: error: this compiler is broken on purpose' >&2\nexit 1\n")
    compiler.chmod(0o755)
    env = {**os.environ, "CXX": str(compiler), "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions"),
           "PYTHONPATH": str(REPO), "ENGINE_BACKEND": ""}
    run = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    warnings = [line for line in run.stderr.splitlines() if line.startswith("WARNING") and "unavailable" in line]
    assert len(warnings) == 1, run.stderr[-3000:]
    assert "the cpu backend is unavailable" in warnings[0] and "broken on purpose" in warnings[0]
    assert len(warnings[0]) < 1000 and "build_error.log" in warnings[0]
    explicit = [line for line in run.stdout.splitlines() if line.startswith("EXPLICIT")]
    assert len(explicit) == 1 and "backend 'cpu' cannot run layer_norm" in explicit[0]
    assert "broken on purpose" in explicit[0]
