#!/usr/bin/env bash
# Checks, without a GPU, that the CUDA extension builds: engine._ext.load("cuda") compiles and links
# csrc/ (bindings, cpu and cuda) against a CUDA build of torch for TORCH_CUDA_ARCH_LIST="8.0;9.0a",
# and the .so it makes holds sm_80 code with mma (HMMA) and sm_90a code with wgmma (HGMMA).
# Too heavy for every CI run (on 2 busy cores: 4 minutes to install a ~5 GB side environment on
# first use, 8 to 11 to build; under a minute when csrc/ is unchanged): run it when csrc/ changes.
# Exits non-zero on any failure; prints a summary last.
#
#   scripts/check_cuda_build.sh
#
# Environment: CUDA_HOME, a CUDA 13 toolkit with bin/nvcc (default /usr/local/cuda); PYTHON, the
# interpreter that creates the side environment .venv-cuda (default python3).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv-cuda"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export TORCH_CUDA_ARCH_LIST="8.0;9.0a"
# A cache of its own, apart from the CPU extension's; a rerun rebuilds only what csrc/ changes touch.
export TORCH_EXTENSIONS_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/torch_extensions/cuda-build-check"

fail() {
    echo "check_cuda_build: FAILED: $*" >&2
    exit 1
}
[ -x "$CUDA_HOME/bin/nvcc" ] || fail "no nvcc in $CUDA_HOME/bin: set CUDA_HOME to a CUDA 13 toolkit"

# 1. The side environment. The registry's torch 2.13.0 for Linux x86_64 is a CUDA 13.0 build;
#    "===" matches the version string exactly, so pip cannot take a local 2.13.0+cpu wheel instead.
start=$SECONDS
has_cuda_torch() {
    "$venv/bin/python" -c "import sys, torch; sys.exit(torch.version.cuda is None)" 2>/dev/null
}
if ! has_cuda_torch; then
    "${PYTHON:-python3}" -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "torch===2.13.0" ninja numpy
    has_cuda_torch || fail "$venv has no CUDA build of torch after installing torch===2.13.0"
fi
setup_s=$((SECONDS - start))
torch_version=$("$venv/bin/python" -c "import torch; print(torch.__version__)")
site=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")

# 2. The build. torch's headers include CUDA library headers (cuBLAS, cuSPARSE, ...) that a bare
#    toolkit may lack; the environment's nvidia wheels carry them all.
export CPATH="$site/nvidia/cu13/include${CPATH:+:$CPATH}"
start=$SECONDS
# engine/_ext.py needs only torch. Loading it without the engine package keeps this check on the
# C++/CUDA build, whichever triton this torch brings.
so=$("$venv/bin/python" - "$root/engine/_ext.py" <<'EOF'
import importlib.util
import sys

spec = importlib.util.spec_from_file_location("engine_ext", sys.argv[1])
ext = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ext)
print(ext.load("cuda").__file__)
EOF
) || fail "engine._ext.load('cuda') did not build (compiler output above)"
build_s=$((SECONDS - start))

# 3. What the .so holds: one cubin per architecture, and the tensor-core instructions of each.
start=$SECONDS
cuobjdump="$site/triton/backends/nvidia/bin/cuobjdump"  # triton's wheel ships one
[ -x "$cuobjdump" ] || cuobjdump="$CUDA_HOME/bin/cuobjdump"
[ -x "$cuobjdump" ] || fail "no cuobjdump in triton's wheel nor in $CUDA_HOME/bin"
cubins=$("$cuobjdump" -lelf "$so" | grep -o 'sm_[0-9]*[af]\?' | sort -u | paste -sd' ')
count() {  # count ARCH REGEX: instructions matching REGEX in the SASS of the ARCH cubin
    local sass
    sass=$("$cuobjdump" -sass -arch "$1" "$so") || fail "cuobjdump -sass -arch $1 $so failed"
    grep -cE "$2" <<<"$sass" || true  # grep -c exits 1 when it counts 0: the checks below say why
}
wgmma=$(count sm_90a '\b[HIQB]GMMA\b')
mma80=$(count sm_80 '\b[HID]MMA\b')
inspect_s=$((SECONDS - start))

nvcc_version=$("$CUDA_HOME/bin/nvcc" --version | grep -o 'release [0-9.]*' | cut -d' ' -f2)
echo "check_cuda_build: torch $torch_version, nvcc $nvcc_version, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
echo "  $so ($(du -h "$so" | cut -f1)): cubins $cubins"
echo "  sm_90a: $wgmma wgmma (*GMMA) instructions; sm_80: $mma80 mma.sync (*MMA) instructions"
echo "  times: environment ${setup_s}s, build ${build_s}s, inspection ${inspect_s}s"
[[ " $cubins " == *" sm_80 "* ]] || fail "no sm_80 cubin in $so"
[[ " $cubins " == *" sm_90a "* ]] || fail "no sm_90a cubin in $so"
[ "$wgmma" -gt 0 ] || fail "the sm_90a cubin has no wgmma (*GMMA): the wgmma path was compiled out"
[ "$mma80" -gt 0 ] || fail "the sm_80 cubin has no mma.sync (*MMA)"
echo "check_cuda_build: OK"
