#!/usr/bin/env bash
# The C++ CPU kernels' tests (tests/ops, tests/losses, tests/nn; the hostile-input fuzz of
# tests/ops/test_raw_ops_fuzz.py among them) against a build of kdops._C with AddressSanitizer
# and UBSan (signed overflow and float-to-int cast overflow included): any read or write outside
# a tensor, use of a dead temporary, or undefined arithmetic in a kernel aborts the run with a
# stack trace.
#
#   tests/sanitize.sh PYTHON        (make test runs it last; `make sanitize` alone)
#
# The build lives in build/sanitize/ (a copy of setup.py, csrc/, kdops/ and tests/; the normal
# in-place build is untouched) and is incremental: ~4 min cold on 2 cores, seconds warm.
# Only kdops' own code is instrumented (torch and Python are not), so the checks are on our
# kernels' memory accesses. If the sanitizer runtime cannot start on this machine (a kernel whose
# address-space layout the compiler's ASan does not support), the run is skipped with a warning
# saying so, rather than failed: that is the machine, not kdops.
set -euo pipefail

case "${1:?usage: tests/sanitize.sh PYTHON}" in
  /*) PY=$1 ;;
  */*) PY=$PWD/$1 ;;  # a venv's python: keep the path (resolving the symlink would leave the venv)
  *) PY=$(command -v "$1") ;;
esac
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIR=${KDOPS_SANITIZE_DIR:-$ROOT/build/sanitize}
CXX=${CXX:-c++}

mkdir -p "$DIR"
if ! echo 'int main() { return 0; }' | "$CXX" -x c++ -fsanitize=address,undefined - -o "$DIR/probe" 2>"$DIR/probe.log"; then
  echo "WARNING: tests/sanitize.sh skipped: $CXX cannot build with -fsanitize=address,undefined here"
  echo "(install the compiler's sanitizer runtimes, e.g. Debian's libasan8 and libubsan1):"
  head -3 "$DIR/probe.log"
  exit 0
fi
rm -rf "$DIR/kdops" "$DIR/tests"
# tar keeps the sources' modification times, so ninja recompiles only what changed
tar -C "$ROOT" --exclude='*.so' --exclude=__pycache__ --exclude='*.pyc' \
  -cf - setup.py pyproject.toml csrc kdops tests | tar -C "$DIR" -xf -
cd "$DIR"
echo "building the sanitizer build of kdops._C in $DIR"
KDOPS_SANITIZE=1 FORCE_CUDA=0 MAX_JOBS="${MAX_JOBS:-2}" "$PY" setup.py -q build_ext --inplace >build.log 2>&1 || {
  tail -40 build.log
  echo "tests/sanitize.sh: the sanitizer build failed (log: $DIR/build.log)"
  exit 1
}

# libasan first (it must see every allocation); libstdc++ too, or ASan's __cxa_throw interceptor
# finds no real function when a pybind11 module throws during import
ASAN_RT=$("$CXX" -print-file-name=libasan.so)
STDCXX=$("$CXX" -print-file-name=libstdc++.so)
export LD_PRELOAD="$ASAN_RT $STDCXX"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=0:allocator_may_return_null=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1

# (the probe runs no kernel: a report from a kdops kernel must fail the run, never skip it; only
# a sanitizer runtime that cannot start -- its own messages -- skips)
if ! probe=$("$PY" -c "import kdops; assert kdops.HAS_C, 'kdops._C did not load'" 2>&1); then
  if grep -q -i -e "Shadow memory" -e "AddressSanitizer: CHECK failed" -e "ASan runtime" <<<"$probe"; then
    echo "WARNING: tests/sanitize.sh skipped: the sanitizer runtime does not start on this machine:"
    echo "$probe" | grep -v '^\s*#' | head -5
    exit 0
  fi
  echo "$probe" | tail -20
  echo "tests/sanitize.sh: the sanitizer build of kdops does not import"
  exit 1
fi
# --capture=sys: pytest leaves file descriptor 2 alone, so a sanitizer report reaches the log.
# Not the sm_90 compile checks: they compile Triton kernels and run no C++ kernel.
exec "$PY" -m pytest -q -p no:cacheprovider --capture=sys -m "not triton" -k "not sm90" tests/ops tests/losses tests/nn
