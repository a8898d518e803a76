#!/usr/bin/env bash
# The main job: set up the environment (first run only), then run the benchmark suite.
# Arguments pass through to `python -m bench` (try --help, --quick, --ops layer_norm).
# ENGINE_PYTHON=python3 ./bench.sh runs an existing Python as is (see scripts/env.sh).
source "$(dirname "$0")/scripts/env.sh"
exec "$ENGINE_PYTHON" -m bench "$@"
