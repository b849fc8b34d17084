#!/usr/bin/env bash
# Incremental rebuild of xlkernels._C in place (serialised with a lock: several people may share a tree).
set -euo pipefail
cd "$(dirname "$0")/.."
exec flock /tmp/xlkernels-build.lock .venv/bin/python setup.py -q build_ext --inplace
