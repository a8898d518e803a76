# Sourced by ./bench.sh and ./test.sh: chooses the Python they run and exports it as ENGINE_PYTHON.
#   ENGINE_PYTHON=python3 ./test.sh   runs that interpreter as is: nothing is created, installed or
#                                     downloaded (a machine without network whose python3 already
#                                     has torch and triton); the repository goes on PYTHONPATH.
#   no .venv, and python3 already has torch, triton, numpy and pytest in the supported ranges
#   (scripts/has_requirements.py): python3 as is, the same way.
#   otherwise: .venv, created on first use, with requirements.txt (pinned by
#   scripts/dev-constraints.txt) and the project installed into it. Re-running is cheap: pip is
#   only called again when one of those files or setup.py changes.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.installed"
if [ -z "${ENGINE_PYTHON:-}" ] && [ ! -e "$venv" ] && command -v python3 >/dev/null \
        && python3 "$root/scripts/has_requirements.py" 2>/dev/null; then
    ENGINE_PYTHON=python3
fi
if [ -n "${ENGINE_PYTHON:-}" ]; then
    ENGINE_PYTHON="$(command -v "$ENGINE_PYTHON")" \
        || { echo "scripts/env.sh: ENGINE_PYTHON=$ENGINE_PYTHON: no such command" >&2; exit 1; }
    export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
    echo "scripts/env.sh: running $ENGINE_PYTHON as is (no .venv)" >&2
else
    if [ ! -x "$venv/bin/python" ]; then
        python3 -m venv "$venv"
    fi
    if [ ! -f "$stamp" ] || [ "$root/requirements.txt" -nt "$stamp" ] || [ "$root/setup.py" -nt "$stamp" ] \
            || [ "$root/scripts/dev-constraints.txt" -nt "$stamp" ]; then
        "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$root/requirements.txt" \
            -c "$root/scripts/dev-constraints.txt"
        "$venv/bin/pip" install --quiet --disable-pip-version-check --no-build-isolation --no-deps -e "$root"
        touch "$stamp"
    fi
    ENGINE_PYTHON="$venv/bin/python"
    export PATH="$venv/bin:$PATH"
fi
export ENGINE_PYTHON
cd "$root"
