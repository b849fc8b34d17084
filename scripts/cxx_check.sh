#!/usr/bin/env bash
# Syntax-check C++ files against torch's headers without touching the shared build: scripts/cxx_check.sh FILE...
set -euo pipefail
cd "$(dirname "$0")/.."
inc=$(.venv/bin/python -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-I'+p for p in include_paths()))")
pyinc=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['include'])")
for f in "$@"; do g++ -std=c++17 -fsyntax-only -fopenmp -DAT_PER_OPERATOR_HEADERS $inc -I"$pyinc" -Icsrc "$f"; done
