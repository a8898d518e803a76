#!/usr/bin/env bash
# The whole test suite under the GPU image's versions, on this CPU machine: Python 3.12, torch
# 2.11.0 (PyPI's CUDA build, which also runs on a CPU), triton 3.6.0, transformers 5.17.x and the
# rest of requirements.txt. Run it before you stop when you have touched kernels or dependencies.
# Creates .venv-compat on first use (several GB of downloads), then runs python -m pytest from the
# repository root; arguments pass through to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv-compat"
stamp="$venv/.installed"
cd "$root"

if [ ! -x "$venv/bin/python" ]; then
    # pyenv's 3.12.1 where pyenv manages Pythons (PYENV_VERSION is ignored elsewhere)
    PYENV_VERSION=3.12.1 python3.12 -m venv "$venv"
fi
if [ ! -f "$stamp" ] || [ requirements.txt -nt "$stamp" ]; then
    # setuptools: Python 3.12's venv has none, and the packaging test builds a wheel without
    # build isolation
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r requirements.txt \
        torch==2.11.0 triton==3.6.0 "transformers==5.17.*" setuptools
    touch "$stamp"
fi
"$venv/bin/python" - <<'EOF'
import sys, torch, triton, transformers
print(f"compat: python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}, "
      f"transformers {transformers.__version__}")
EOF
exec "$venv/bin/python" -m pytest "$@"
