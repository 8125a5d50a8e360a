#!/usr/bin/env bash
# Issue 6 in one device call: build kdops against the machine's own torch, run the test suite with
# the GPU tests (CUDA kernels vs references in every dtype, every op's no-host-sync and determinism
# check, Triton kernels compiled for real), then `kdops bench --device cuda` in fp32 / bf16 / fp16.
# Device time is scarce (15 minutes a session, start-up included; one call at most 600 s), so every
# stage has its own time limit, the whole run keeps within BUDGET_S (default 560 s: a stage that
# would not fit is skipped and said so), a failing stage does not stop the next one, and the results
# are packed after every stage (a call cut short still brings back what was done). Order: what only
# a GPU can tell first (build, GPU tests, Triton kernels for real, fp32 bench, the hostile-input
# fuzz under compute-sanitizer), then the half-precision benches, then the CPU suite.
#
#   device run:  bash benchmarks/gpu_session.sh            (timeout_s 600)
#   stages:      STAGES="build tests bench" (default), e.g. STAGES="build bench" for a re-run
#
# Everything lands in $OUT (default /tmp/kdops-gpu): summary.txt and one gpu_results.tar.gz holding
# the logs and benchmarks/results/<device>/bench_<dtype>_coco.{md,json,png} (the device tool brings
# back at most 8 files). Unpack it in the repo root and commit benchmarks/results/.
set -uo pipefail
OUT=${OUT:-/tmp/kdops-gpu}
STAGES=${STAGES:-build tests bench}
PY=${PY:-python}
mkdir -p "$OUT/logs"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} FORCE_CUDA=1
END=$((SECONDS + ${BUDGET_S:-560}))
summary="$OUT/summary.txt"
: >"$summary"
note() { echo "$*" | tee -a "$summary"; }
pack() { tar czf "$OUT/gpu_results.tar.gz" -C "$OUT" logs summary.txt -C "$PWD" benchmarks/results 2>/dev/null; }
stage() {  # stage NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  local left=$((END - SECONDS - 10))
  if ((left < 30)); then
    note "$(printf '%-16s skipped: %ss of the budget left' "$name" "$((END - SECONDS))")"
    return
  fi
  ((limit > left)) && limit=$left
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/logs/$name.log" 2>&1
  local rc=$?
  note "$(printf '%-16s rc=%-3s %4ss  %s' "$name" "$rc" "$((SECONDS - t0))" "$(tail -n 1 "$OUT/logs/$name.log")")"
  pack
}

note "kdops GPU session $(date -u +%FT%TZ) $(git rev-parse --short HEAD 2>/dev/null)"
note "$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -1)"
note "$($PY -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda)' 2>&1)"

if [[ " $STAGES " == *" build "* ]]; then
  stage build 420 $PY -m pip install -q --no-build-isolation --no-deps -e .
  stage import 60 $PY -c "import kdops, torch; assert kdops.HAS_C; print('kdops', kdops.__version__, torch.cuda.get_device_name())"
fi
if [[ " $STAGES " == *" tests "* ]]; then
  # GPU tests are the ones that skip without CUDA; then the Triton kernels natively
  stage tests-gpu 200 $PY -m pytest -q --maxfail=25 -m "not triton" -k "(cuda or gpu or device or triton or sync) and not sm90" tests
  stage tests-triton 150 $PY -m pytest -q --maxfail=25 -m triton tests
fi
if [[ " $STAGES " == *" bench "* ]]; then
  stage bench-fp32 240 $PY -m kdops.cli bench --device cuda --dtype float32 --full --out benchmarks/results
fi
if [[ " $STAGES " == *" tests "* ]]; then
  # the hostile-input fuzz on CUDA tensors (CUDA C++ and Triton kernels) under compute-sanitizer's
  # memcheck: an out-of-bounds access is reported even where it does not crash. No caching
  # allocator, so a read past a tensor is not hidden inside a pooled block.
  SAN=$(command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}"/bin/compute-sanitizer \
        /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)
  if [[ -n "$SAN" ]]; then
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 stage memcheck 120 "$SAN" --tool memcheck --error-exitcode 7 \
      $PY -m pytest -q -p no:cacheprovider -m "not triton" -k cuda tests/ops/test_raw_ops_fuzz.py
  else
    note "memcheck         skipped: no compute-sanitizer on this machine"
  fi
fi
if [[ " $STAGES " == *" bench "* ]]; then
  for dt in bfloat16 float16; do
    KDOPS_BENCH_NO_COMPILE=1 stage "bench-$dt" 120 $PY -m kdops.cli bench --device cuda --dtype "$dt" --full --out benchmarks/results
  done
fi
if [[ " $STAGES " == *" tests "* ]]; then
  stage tests-all 200 $PY -m pytest -q -m "not triton" tests
fi
note "done in ${SECONDS}s"
pack
echo "packed $OUT/gpu_results.tar.gz"
