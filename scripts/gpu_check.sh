#!/usr/bin/env bash
# scripts/gpu_check.sh OUT_DIR: everything a fresh GPU machine can tell us about the engine, in one
# command, in under 9 minutes on one H200.
#
# Runs from this checkout (PYTHONPATH) on the python3 first on PATH, or $PYTHON: no venv, nothing
# installed, no network. Each step has its own timeout, and every timeout is cut to what is left
# of the whole budget (GPU_CHECK_SECONDS, default 540), so no hang can outlast the lease.
#
#   versions   python, torch (+ CUDA), triton, transformers, numpy, pytest, matplotlib, nvcc, driver
#   build      the CUDA extension (engine_cuda) and, alongside, the CPU one that every
#              engine.backends.available() also builds; each timed
#   selftest   python -m engine.selftest --device cuda (every op x triton/cuda/reference x 3 dtypes
#              x fwd/bwd x 2 shapes, dropout reproducibility)
#   tests      pytest on the (cuda, cuda) and (reference, cuda) backend/device pairs of the op tests
#              (tests/conftest.py's backend_device_pairs), then the (triton, cuda) pairs of
#              tests/test_attention.py (masks, head dims, Dv != D, GQA, decode, dropout masks: what
#              the selftest does not cover); one line per test, so a timeout still leaves which ran
#   readiness  python -m engine.readiness: the ahead-of-time compile table (sm80, sm90, gfx942 and
#              nvcc sm_80/sm_90a) with this machine's Triton and nvcc. It runs niced in the
#              background from the build on (it is compile-bound, as the build is, and the
#              build's critical path is one nvcc process), and is waited for before the bench
#   bench      python -m bench --quick --device cuda --ops layer_norm,attention,linear (against
#              F.layer_norm, F.scaled_dot_product_attention, F.linear), last, on a quiet machine
#
# OUT_DIR gets 8 files: summary.log (versions and the summary), build.log, selftest.log,
# selftest.json, tests.log, readiness.log, bench.log, bench-results.json. The summary (each step:
# ok / FAILED / TIMED OUT / skipped, and its seconds) is printed last. Exit status 1 if any step
# failed.
#
# Compiles launched, and the time they should take on one H200 host (16 cores). Per-compile costs
# come from this project's 2-core development VMs: nvcc took 123 s for csrc/cuda/attention.cu (since split into forward_attention.cu and backward_attention.cu)
# (sm_90, on a VM with load average ~10), 46 s for linear.cu, 9 s for layer_norm.cu; Triton
# compiled the readiness table's reports at ~0.4 core-seconds each (660 core-s for ~1700).
#   build      engine_cuda: 10 compile jobs (4 bindings .cpp, 3 csrc/cpu .cpp, 3 csrc/cuda .cu, for
#              the GPU's one arch, sm_90a) + engine_cpu: 7 .cpp; ninja runs them over the cores,
#              so the wall time is the slowest file, attention.cu: ~1.5-2.5 min.
#   selftest   ~280 Triton compiles, counting every autotune candidate: layer-norm family 48 (4
#              variants x 3 dtypes x 2 row widths x fwd/bwd), attention ~57 (causal or not x 3
#              dtypes x 5-7 fwd/dK-dV/dQ/preprocess candidates, plus the GQA specialization of the
#              causal kernels), decode 6, gelu 12, linear ~120 (4 activations x [2 tensor-core
#              dtypes x 12 + fp32 x 6] candidates over fwd/dx/dW), feed-forward ~25, dropout ~10.
#              ~110 core-s of compiles + ~40 s of autotune timing, spread over 8 processes (one op
#              each; the heaviest op has ~30 compiles): ~1-1.5 min with start-up.
#   tests      cuda-cuda and reference-cuda: ~440 tests (as many as cpu-cpu and reference-cpu
#              collect here), tiny problems and no JIT compile: ~0.5-1 min. triton-cuda attention:
#              42 tests, ~150 compiles (31 problems with their own masks, head dims and dtypes):
#              ~1.5 min, cut at 100 s.
#   readiness  ~1100 Triton reports (~440 core-s over 16 niced processes) + 6 nvcc runs
#              (attention.cu for sm_80 and sm_90a ~2 min each, in parallel): ~3-4 min, behind the
#              build, selftest and tests.
#   bench      ~30 Triton compiles, 7 memory-measuring child processes at ~5-10 s each and short
#              timings: ~1.5 min.
# Expected total: ~10 s + 2 + 1.5 + 2 + 1.5 min (readiness overlapped) = ~7.5 min.
set -uo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 OUT_DIR" >&2
    exit 2
fi
PYTHON=${PYTHON:-python3}
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$1"
out="$(cd "$1" && pwd)"
cd "$root"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # Triton must compile for the GPU, not interpret
deadline=$((SECONDS + ${GPU_CHECK_SECONDS:-540}))
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
for name in summary build selftest tests readiness bench; do
    : > "$out/$name.log"
done

summary=()
failed=0

# record NAME STATUS SECONDS: one summary line, and the run's exit status
record() {
    summary+=("$(printf '%-13s %-22s %4ss' "$1" "$2" "$3")")
    case "$2" in ok | skipped*) ;; *) failed=1 ;; esac
}

# verdict EXIT_CODE: ok, TIMED OUT or FAILED
verdict() {
    case "$1" in
        0) echo ok ;;
        124 | 137) echo "TIMED OUT" ;;
        *) echo "FAILED($1)" ;;
    esac
}

# step NAME LIMIT LOG COMMAND...: runs COMMAND under min(LIMIT, time left), output appended to
# OUT_DIR/LOG; prints its last lines and records the verdict.
step() {
    local name=$1 limit=$2 log=$3
    shift 3
    local left=$((deadline - SECONDS))
    if [ "$left" -lt 15 ]; then
        record "$name" "skipped: no time left" 0
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >> "$out/$log" 2>&1
    local code=$?
    tail -n 4 "$out/$log" | sed 's/^/   | /'
    record "$name" "$(verdict $code)" $((SECONDS - start))
}

# ---- versions (into summary.log, which ends with the summary)
"$PYTHON" - > "$out/summary.log" 2>&1 <<'EOF'
import importlib, platform, shutil, subprocess, sys
print("python", platform.python_version(), sys.executable)
for name in ("torch", "triton", "transformers", "numpy", "pytest", "matplotlib"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as error:
        print(name, "MISSING:", type(error).__name__, error)
import torch
print("torch CUDA", torch.version.cuda, "| GPU visible:", torch.cuda.is_available())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i}", p.name, f"capability {p.major}.{p.minor}", f"{p.total_memory / 2**30:.0f} GiB")
from torch.utils import cpp_extension
print("CUDA_HOME", cpp_extension.CUDA_HOME)
for command in (["nvcc", "--version"], ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"]):
    if shutil.which(command[0]):
        print(command[0], subprocess.run(command, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    else:
        print(command[0], "not on PATH")
print("cores", __import__("os").cpu_count())
EOF
cat "$out/summary.log"
record versions "$(verdict $?)" "$SECONDS"

# ---- readiness, in the background (waited for before the bench)
# it must end 150 s before the deadline, which leaves the bench its time
readiness_limit=$((deadline - SECONDS - 150))
[ "$readiness_limit" -lt 15 ] && readiness_limit=15
echo "== readiness (background, niced, limit ${readiness_limit}s): $PYTHON -m engine.readiness"
readiness_start=$SECONDS
(
    timeout --kill-after=10 "$readiness_limit" nice -n 10 "$PYTHON" -m engine.readiness > "$out/readiness.log" 2>&1
    echo "$? $SECONDS" > "$scratch/readiness.end"  # its exit code and when it ended
) &
readiness_pid=$!

# ---- the extensions: CUDA and CPU at once
cat > "$scratch/build_extensions.py" <<'EOF'
import subprocess, sys, time
start = time.perf_counter()
jobs = {kind: subprocess.Popen([sys.executable, "-c", f"from engine import _ext; _ext.load({kind!r})"])
        for kind in ("cpu", "cuda")}
for kind, job in jobs.items():  # the CPU build ends first: each time printed is its build time
    print(f"engine_{kind}: exit {job.wait()} after {time.perf_counter() - start:.0f}s", flush=True)
sys.exit(max(job.returncode for job in jobs.values()))
EOF
step build 270 build.log "$PYTHON" "$scratch/build_extensions.py"

# ---- selftest
step selftest 180 selftest.log "$PYTHON" -m engine.selftest --device cuda --json "$out/selftest.json"

# ---- tests
if "$PYTHON" -c "import pytest" 2> /dev/null; then
    pytest=("$PYTHON" -m pytest -vv -p no:cacheprovider)  # -vv against pytest.ini's -q: a line per test
    step tests-cuda 90 tests.log "${pytest[@]}" tests/test_layer_norm.py tests/test_attention.py \
        tests/test_linear.py -k "cuda-cuda or reference-cuda"
    step tests-triton 100 tests.log "${pytest[@]}" tests/test_attention.py -k "triton-cuda"
else
    echo "pytest is not installed: no tests" | tee -a "$out/tests.log"
    record tests "skipped: no pytest" 0
fi

# ---- readiness: wait for it
wait "$readiness_pid"
read -r code ended < "$scratch/readiness.end"
echo "== readiness ended"
tail -n 3 "$out/readiness.log" | sed 's/^/   | /'
record readiness "$(verdict "$code")" $((ended - readiness_start))

# ---- bench, last
step bench 150 bench.log "$PYTHON" -m bench --quick --device cuda --ops layer_norm,attention,linear \
    --out "$scratch/bench"
[ -f "$scratch/bench/results.json" ] && cp "$scratch/bench/results.json" "$out/bench-results.json"

{
    echo
    echo "gpu_check summary ($out, ${SECONDS}s in all):"
    printf '  %s\n' "${summary[@]}"
} | tee -a "$out/summary.log"
exit $failed
