#!/usr/bin/env bash
# Set up the environment (first run only), then run the whole test suite.
# Arguments pass through to pytest (for example: ./test.sh tests/test_layer_norm.py -k triton).
# ENGINE_PYTHON=python3 ./test.sh runs an existing Python as is (see scripts/env.sh).
source "$(dirname "$0")/scripts/env.sh"
exec "$ENGINE_PYTHON" -m pytest "$@"
