# Sourced by ./bench and ./test: creates .venv on first use and installs the project into it.
# Re-running is cheap: pip is only called again when requirements.txt or setup.py change.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.installed"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
if [ ! -f "$stamp" ] || [ "$root/requirements.txt" -nt "$stamp" ] || [ "$root/setup.py" -nt "$stamp" ]; then
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$root/requirements.txt"
    "$venv/bin/pip" install --quiet --disable-pip-version-check --no-build-isolation --no-deps -e "$root"
    touch "$stamp"
fi
export PATH="$venv/bin:$PATH"
cd "$root"
