#!/usr/bin/env bash
# The main job: set up the environment (first run only), then run the benchmark suite.
# Arguments pass through to `python -m bench` (try --help, --quick, --ops layer_norm).
source "$(dirname "$0")/scripts/env.sh"
exec python -m bench "$@"
