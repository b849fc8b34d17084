#!/usr/bin/env bash
# make gpu-check: everything a GPU machine can tell us, in one call of at most 9 minutes, for a machine with a GPU
# and a preinstalled CUDA torch (no registry needed). Builds with CUDA for this GPU's arch, runs the whole suite
# (gpu-marked tests included), compute-sanitizer memcheck + racecheck on the CUDA C++ kernels, and the benchmarks;
# logs and results go to bench/results/gpu-check-<date>/ (and to $OUT where the device tool sets it); a one-screen
# summary ends the output.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RES=bench/results/gpu-check-$(date -u +%Y-%m-%d-%H%M)
mkdir -p "$RES"
touch "$RES/.start"
SUMMARY=()
t0=$SECONDS
step() {  # step NAME SECONDS CMD...: run with a time limit, log to $RES/NAME.log, keep one summary line
  local name=$1 limit=$2; shift 2
  local s=$SECONDS
  timeout "$limit" "$@" > "$RES/$name.log" 2>&1
  local rc=$?
  local tail_line
  tail_line=$(grep -E "passed|failed|ERROR SUMMARY|gpu_sanitize|cuda build|ok, .* failed" "$RES/$name.log" | tail -1)
  [[ $rc == 124 ]] && tail_line="TIMED OUT after ${limit}s; $tail_line"
  SUMMARY+=("$(printf '%-10s rc=%-3s %4ss  %s' "$name" "$rc" "$((SECONDS - s))" "${tail_line:0:90}")")
  return $rc
}

{ nvidia-smi -L; "$PY" -c "import torch, triton, transformers, sys; print('python', sys.version.split()[0], 'torch',
torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__);
print(torch.cuda.get_device_name(), 'capability', torch.cuda.get_device_capability())"; git log -1 --format='%H %s' 2>/dev/null
} > "$RES/env.txt" 2>&1
ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo 9.0)

step build 170 env XLKERNELS_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$(nproc)" \
  bash -c "'$PY' setup.py -q build_ext --inplace && '$PY' -c \"import xlkernels; i = xlkernels.ext_info(); \
print('cuda build', i); raise SystemExit(0 if i['cuda'] else 1)\""
built=$?
if [[ $built == 0 ]]; then
  # the whole suite on the GPU (gpu-marked tests included); the embedded-model tests need gguf, absent there
  step tests 180 "$PY" -m pytest -q -p no:cacheprovider -m "not model" -n 8 --junitxml="$RES/tests.xml"
  if command -v compute-sanitizer >/dev/null; then
    step memcheck 40 compute-sanitizer --tool memcheck --error-exitcode 9 "$PY" scripts/gpu_sanitize.py
    step racecheck 40 compute-sanitizer --tool racecheck --racecheck-report all --error-exitcode 9 \
      "$PY" scripts/gpu_sanitize.py
  else
    SUMMARY+=("sanitizer  compute-sanitizer not found")
  fi
  step bench 90 "$PY" -m bench.run_all --quick --only attention head_steer neuron_stats
  step model 50 "$PY" -m bench.bench_model --quick --model llama --device cuda
fi
find bench/results -maxdepth 1 -name '*.json' -newer "$RES/.start" -exec mv {} "$RES/" \;
[[ -n ${OUT:-} ]] && cp -r "$RES" "$OUT/"

echo "=================== gpu-check summary ($((SECONDS - t0)) s; $RES)"
head -3 "$RES/env.txt"
printf '%s\n' "${SUMMARY[@]}"
grep -hE "MISS|target|x plain" "$RES"/bench.log "$RES"/model.log 2>/dev/null | head -12
grep -hE "^(FAILED|ERROR) " "$RES"/tests.log 2>/dev/null | head -8
[[ $built == 0 ]] && ! grep -q "rc=[1-9]" <<<"${SUMMARY[*]}"
