#!/usr/bin/env bash
# make pip-check: xlkernels installed the way users install it, with pip's default flags (build isolation on), into
# fresh venvs, then imported from there, _C loaded for the running torch and every compiled op run against the
# reference (scripts/check_pip_install.py). Legs:
#   clone   `pip install .` from a copy of this checkout (tracked and untracked, not ignored, files)
#   sdist   `pip install xlkernels-*.tar.gz` (python -m build --sdist)
#   wheel   `pip install xlkernels-*.whl` (built once from the sdist, installed into two venvs)
#   cuda    the wheel beside the CUDA build of torch 2.14.1: import, and every op has a CUDA kernel (no GPU)
#   guards  a _C built for another torch is not loaded; a torch outside the supported range is refused by name
# Fresh venvs are cheap: each is an empty venv whose .pth file shows it a cached base venv's packages (pip treats
# them as installed, so "default flags" install only xlkernels). Bases, reused while their stamps match:
#   $PIP_BASE_VENV (~/.cache/xlkernels/venv-pip): torch==2.13.0 (CPU) + the runtime dependencies at the tested pins
#   $CUDA_VENV     (~/.cache/xlkernels/venv-cuda): the venv of `make cuda-build` (created here if missing)
# The CPU legs compile _C from scratch (a fresh cache each run; the sdist and wheel legs must then hit that cache,
# which they only do when they carry the same sources). The CUDA leg uses the ordinary cache (~/.cache/xlkernels/
# ext), keyed by torch, CUDA, flags and a hash of the sources, so it recompiles only when those change.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/xlkernels
BASE=${PIP_BASE_VENV:-$CACHE/venv-pip}
CUDA_VENV=${CUDA_VENV:-$CACHE/venv-cuda}
PKGS="torch==2.13.0 setuptools==84.2.1 wheel==0.48.0 build==1.6.1 numpy safetensors transformers tqdm ninja"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/xlk-pip-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
t0=$SECONDS
step() { echo "pip_check: [$((SECONDS - t0)) s] $*"; }
die() { echo "pip_check: FAIL: $*" >&2; exit 1; }
quiet() { grep -v "is ignored: it is neither" || true; }  # pip's notes about this machine's local index directories
purelib() { "$1/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }

# --- base venvs ---------------------------------------------------------------------------------------------------
key=$(printf '%s\n' "$PKGS" "$(cat constraints.txt)" "$("$PY" -VV)" | sha256sum | cut -c1-16)
if [[ -x $BASE/bin/python && $(cat "$BASE/.xlk-pip-deps" 2>/dev/null) == "$key" ]]; then
  step "reusing $BASE"
else
  rm -rf "$BASE"; mkdir -p "$(dirname "$BASE")"
  "$PY" -m venv "$BASE"
  # shellcheck disable=SC2086
  "$BASE/bin/python" -m pip install -q -c constraints.txt pip $PKGS 2>&1 | quiet
  echo "$key" > "$BASE/.xlk-pip-deps"
  step "$BASE built"
fi
(cd / && "$BASE/bin/python" -c "import xlkernels" 2>/dev/null) && die "$BASE must not have xlkernels installed"
CUDA_VENV=$CUDA_VENV CUDA_VENV_ONLY=1 bash scripts/cuda_build.sh

# fresh <dir> <base venv>: an empty venv (no pip of its own) that sees the base venv's packages
fresh() {
  "$PY" -m venv --without-pip "$1"
  purelib "$2" > "$(purelib "$1")/_xlk_base.pth"
}
# check <venv> [--how H]: the installed xlkernels, run from outside any checkout
check() {
  local venv=$1; shift
  [[ ! -e $(purelib "$venv")/torch ]] || die "pip installed a torch of its own into $venv"
  (cd "$WORK" && "$venv/bin/python" "$ROOT/scripts/check_pip_install.py" --site "$(purelib "$venv")" "$@")
}

# --- build the sdist and, from it, the wheel (once) -------------------------------------------------------------
mkdir "$WORK/src"
git ls-files -z --cached --others --exclude-standard |
  tar --null -T - --ignore-failed-read -cf - 2>/dev/null | tar -xf - -C "$WORK/src"
"$BASE/bin/python" -m build -q --outdir "$WORK/dist" "$WORK/src" > "$WORK/build.log" 2>&1 ||
  { cat "$WORK/build.log"; die "python -m build failed"; }
sdist=$(ls "$WORK"/dist/xlkernels-*.tar.gz); wheel=$(ls "$WORK"/dist/xlkernels-*.whl)
step "built $(basename "$sdist") and, from it, $(basename "$wheel")"
[[ $wheel == *-py3-none-any.whl ]] || die "the isolated build made a platform wheel: it compiled against the build environment's torch"
"$BASE/bin/python" - "$sdist" "$wheel" <<'PY' || die "sdist/wheel contents"
import sys, tarfile, zipfile
sdist = tarfile.open(sys.argv[1]).getnames()
wheel = zipfile.ZipFile(sys.argv[2]).namelist()
need_sdist = ["csrc/registration.cpp", "csrc/cuda/common.cuh", "csrc/cpu/glu_kernels.h", "MANIFEST.in", "setup.py"]
need_wheel = ["xlkernels/_csrc/registration.cpp", "xlkernels/_csrc/cuda/common.cuh", "xlkernels/_csrc/cpu/glu_kernels.h",
              "xlkernels/_build.py"]
bad = [n for n in need_sdist if not any(m.endswith("/" + n) for m in sdist)]
bad += [n for n in need_wheel if n not in wheel]
bad += [f"unwanted {m}" for m in sdist + wheel if m.endswith((".so", ".o", "_C_build.json"))]
print("\n".join(f"missing {b}" if not b.startswith("unwanted") else b for b in bad))
sys.exit(1 if bad else 0)
PY

# --- CPU legs: torch 2.13.0+cpu ---------------------------------------------------------------------------------
export XLKERNELS_CACHE=$WORK/cache  # compile from scratch; sdist and wheel legs must reuse it
fresh "$WORK/clone" "$BASE"
(cd "$WORK/src" && "$WORK/clone/bin/python" -m pip install -q . 2>&1 | quiet)
step "clone: pip install . done"
# two processes import at once: one compiles, the other waits on the lock, both load the same _C
check "$WORK/clone" > "$WORK/first.log" 2>&1 & pid=$!
sleep 1; check "$WORK/clone" > "$WORK/second.log" 2>&1 || { cat "$WORK/second.log"; die "clone: second process"; }
wait $pid || { cat "$WORK/first.log"; die "clone: first process"; }
cat "$WORK/first.log"
n=$(cat "$WORK/first.log" "$WORK/second.log" | grep -c "compiling the C++ extension" || true)
[[ $n == 1 ]] || { cat "$WORK/second.log"; die "expected exactly one compile across two processes, saw $n"; }
step "clone: OK (one compile, two processes)"

fresh "$WORK/sdist" "$BASE"
"$WORK/sdist/bin/python" -m pip install -q "$sdist" 2>&1 | quiet
check "$WORK/sdist" --how cached || die "sdist leg"
step "sdist: OK"

fresh "$WORK/wheel" "$BASE"
"$WORK/wheel/bin/python" -m pip install -q "$wheel" 2>&1 | quiet
check "$WORK/wheel" --how cached || die "wheel leg"
step "wheel: OK"
unset XLKERNELS_CACHE

# --- CUDA leg: the same wheel beside torch 2.14.1 (CUDA 13), no GPU -----------------------------------------------
fresh "$WORK/cuda" "$CUDA_VENV"
"$WORK/cuda/bin/python" -m pip install -q --no-deps "$wheel" 2>&1 | quiet  # its other deps are not imported here
(cd "$WORK" && "$WORK/cuda/bin/python" "$ROOT/scripts/check_cuda_build.py" "$(purelib "$WORK/cuda")") ||
  die "cuda leg"
cuda_so=$(cd "$WORK" && "$WORK/cuda/bin/python" -c "import xlkernels; print(xlkernels.ext_info()['path'])")
step "cuda: OK ($cuda_so)"

# --- guards -------------------------------------------------------------------------------------------------------
# A _C built for torch 2.14.1+cu130 dropped into the torch 2.13.0+cpu install, with and without its record.
XLKERNELS_CACHE=$WORK/cache "$WORK/wheel/bin/python" -c "import torch; torch.ops.load_library('$cuda_so')" \
  > "$WORK/direct.log" 2>&1 && die "loading the torch 2.14.1 _C into torch 2.13.0 worked; the guard test proves nothing"
echo "pip_check: as expected, loading it directly fails: $(grep -E 'Error|error' "$WORK/direct.log" | tail -1 | cut -c1-160)"
pkg=$(purelib "$WORK/wheel")/xlkernels
suffix=$("$WORK/wheel/bin/python" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
cp "$cuda_so" "$pkg/_C$suffix"
cp "$(dirname "$cuda_so")/_C_build.json" "$pkg/_C_build.json"
XLKERNELS_CACHE=$WORK/cache check "$WORK/wheel" --how cached > "$WORK/guard.log" 2>&1 ||
  { cat "$WORK/guard.log"; die "a _C built for another torch broke the import"; }
grep -q "was built for torch 2.14.1" "$WORK/guard.log" || { cat "$WORK/guard.log"; die "no word on the foreign _C"; }
rm "$pkg/_C_build.json"
XLKERNELS_CACHE=$WORK/cache check "$WORK/wheel" --how cached > "$WORK/guard.log" 2>&1 ||
  { cat "$WORK/guard.log"; die "a _C without a build record broke the import"; }
grep -q "has no readable build record" "$WORK/guard.log" || { cat "$WORK/guard.log"; die "no word on the unrecorded _C"; }
rm "$pkg/_C$suffix"
step "guards: a _C built for another torch is not loaded (with or without its record)"
for v in 2.10.0 3.0.0; do
  if (cd "$WORK" && "$WORK/wheel/bin/python" -c "import torch; torch.__version__ = '$v'; import xlkernels") \
    > "$WORK/old.log" 2>&1; then die "torch $v was accepted"; fi
  grep -q "UnsupportedTorch: xlkernels supports torch >=2.11,<3; this environment has torch $v" "$WORK/old.log" ||
    { cat "$WORK/old.log"; die "torch $v: no clear error naming the supported range"; }
  ! grep -qiE "segmentation|undefined symbol|core dumped" "$WORK/old.log" || die "torch $v crashed"
done
step "guards: torch 2.10.0 and 3.0.0 are refused, naming >=2.11,<3"
echo "pip_check: all legs OK in $((SECONDS - t0)) s"
