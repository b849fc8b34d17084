#!/usr/bin/env bash
# Build the complete extension (CPU + CUDA kernels, sm_80 and sm_90) against the CUDA build of torch, without a GPU,
# then check in a fresh process that every op has a CUDA kernel (scripts/check_cuda_build.py).
# - Own venv ($CUDA_VENV), reused while its stamp (a hash of the pins and the python) matches. CUDA_VENV_ONLY=1:
#   only that.
# - Built out of tree into build/cuda (ninja, MAX_JOBS=2): the CPU build in .venv and xlkernels/_C*.so are untouched.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# The venv lives outside the checkout by default, so fresh clones (CI) on the same machine reuse it (~5.5 GB).
VENV=${CUDA_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/xlkernels/venv-cuda}
OUT=${CUDA_BUILD_DIR:-build/cuda}
PKGS="torch==2.14.1 setuptools==84.2.1 wheel==0.48.0 ninja==1.13.2 numpy==2.4.6"
NVCC=${NVCC:-nvcc}
t0=$SECONDS

# CUDA_HOME: torch would guess it from nvcc's directory, which may be a wrapper outside the toolkit.
if [[ -z ${CUDA_HOME:-} ]]; then
  CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v "$NVCC")")")")
  [[ -f $CUDA_HOME/include/cuda_runtime.h ]] ||
    CUDA_HOME=$(readlink -f "$("$NVCC" -v -x cu -E /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)")
fi
[[ -f $CUDA_HOME/include/cuda_runtime.h ]] || { echo "cuda_build: no CUDA toolkit found (CUDA_HOME=$CUDA_HOME)" >&2; exit 1; }
export CUDA_HOME

key=$(printf '%s\n' "$PKGS" "$("$PY" -VV)" | sha256sum | cut -c1-16)
stamp=$VENV/.xlk-cuda-deps
if [[ -x $VENV/bin/python && $(cat "$stamp" 2>/dev/null) == "$key" ]] &&
  "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.14.1')" 2>/dev/null; then
  echo "cuda_build: reusing $VENV"
else
  [[ -x $VENV/bin/python ]] || { mkdir -p "$(dirname "$VENV")" && "$PY" -m venv "$VENV"; }
  # shellcheck disable=SC2086
  "$VENV/bin/python" -m pip install -q $PKGS
  echo "$key" > "$stamp"
  echo "cuda_build: $VENV ready ($((SECONDS - t0)) s)"
fi
[[ ${CUDA_VENV_ONLY:-0} == 1 ]] && exit 0  # make pip-check: just the venv

t1=$SECONDS
find "$OUT/lib" -name '*.py' -delete 2>/dev/null || true  # build_py re-copies; no stale modules
# -f: setuptools skips the extension when no .cpp/.cu is newer (headers are not tracked); ninja rebuilds only what changed.
XLKERNELS_BUILD_CUDA=1 XLKERNELS_CUDA_ARCHS="80;90" TORCH_CUDA_ARCH_LIST="8.0;9.0" MAX_JOBS=${MAX_JOBS:-2} \
  "$VENV/bin/python" setup.py -q build --build-base "$OUT" --build-lib "$OUT/lib" --build-temp "$OUT/obj" -f
echo "cuda_build: extension built in $((SECONDS - t1)) s"

# XLKERNELS_JIT=0: the _C built here or nothing (not one compiled on first use)
XLKERNELS_JIT=0 PYTHONPATH=$OUT/lib "$VENV/bin/python" scripts/check_cuda_build.py "$OUT/lib"
echo "cuda_build: done in $((SECONDS - t0)) s"
