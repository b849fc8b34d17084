#!/usr/bin/env bash
# Create a venv and build xlkernels into it.
# - Where torch is already installed (the GPU machine, no registry): reuse it via --system-site-packages.
# - Elsewhere: the CPU build torch==2.13.0 and the tested set of versions in constraints.txt.
# - LATEST=1 (make test-latest): the newest releases requirements.txt allows instead of the tested set
#   (torch stays the CPU build 2.13.0: a newer torch on PyPI is a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [[ ! -x $VENV/bin/python ]]; then
  if "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m venv --system-site-packages "$VENV"
  else
    "$PY" -m venv "$VENV"
  fi
fi
VPY=$VENV/bin/python
if [[ ${LATEST:-0} == 1 ]]; then
  echo "torch==2.13.0" > "$VENV/.xlk-torch-pin.txt"
  pins=(-c "$VENV/.xlk-torch-pin.txt" --upgrade --upgrade-strategy eager)
else
  pins=(-c constraints.txt)
fi
if ! "$VPY" -c "import torch" 2>/dev/null; then
  "$VPY" -m pip install -q "${pins[@]}" pip
  "$VPY" -m pip install -q "${pins[@]}" torch==2.13.0
fi
if [[ ${XLKERNELS_OFFLINE:-0} != 1 ]] && "$VPY" -m pip download -q --no-deps -d /tmp/xlk-probe pip >/dev/null 2>&1; then
  "$VPY" -m pip install -q "${pins[@]}" -r requirements.txt
fi
"$VPY" -m pip install -q --no-build-isolation --no-deps -e .
[[ ${XLKERNELS_OFFLINE:-0} == 1 ]] || bash scripts/get_corpus.sh "$VENV"   # the default corpus of reproduce / eval
# XLKERNELS_JIT=0: the _C just built, not one compiled on first use
XLKERNELS_JIT=0 "$VPY" -c "import xlkernels, sys; i = xlkernels.ext_info()
sys.exit(0 if i['how'] == 'prebuilt' else f'xlkernels._C (CPU) failed to build or load: {i[\"error\"]}')"
"$VPY" -m pip freeze --exclude-editable > "$VENV/.xlk-versions.txt"
