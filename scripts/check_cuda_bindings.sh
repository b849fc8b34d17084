#!/usr/bin/env bash
# Syntax-check the CUDA bindings (csrc/cuda/*.cpp) against torch's and CUDA's headers on a machine whose torch has
# no CUDA: CPU wheels lack c10/cuda/impl/cuda_cmake_macros.h, so a one-line stand-in is generated.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
NVCC=${NVCC:-nvcc}
cuda_inc=$(dirname "$(dirname "$(readlink -f "$(command -v "$NVCC")")")")/include
[[ -f $cuda_inc/cuda_runtime.h ]] || cuda_inc=$("$NVCC" -v -x cu -E /dev/null 2>&1 | sed -n 's/.*INCLUDES="-I\([^"]*\)".*/\1/p' | head -1)
stub=$(mktemp -d); trap 'rm -rf "$stub"' EXIT
mkdir -p "$stub/c10/cuda/impl"
printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$stub/c10/cuda/impl/cuda_cmake_macros.h"
inc=$("$PY" -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-isystem '+p for p in include_paths()))")
pyinc=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
for f in csrc/cuda/*.cpp; do
  echo "g++ -fsyntax-only $f"
  g++ -std=c++17 -fsyntax-only -Wall -Werror -fopenmp -DAT_PER_OPERATOR_HEADERS -DXLK_WITH_CUDA $inc -isystem "$pyinc" \
    -isystem "$stub" -isystem "$cuda_inc" -Icsrc "$f"
done
