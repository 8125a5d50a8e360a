#!/usr/bin/env bash
# Installs the real mmdetection 3.x stack into the environment of PYTHON (first argument):
# mmcv 2.1.0 built from its sdist (C++20 patch, CPU ops unless a GPU is visible), mmengine 0.10.7,
# mmdet 3.3.0, pycocotools.
#
# PyPI has no mmcv 2.1.0 wheel for this Python/torch, and its sdist forces -std=c++17, which
# torch >= 2.13 rejects. The build takes ~10 minutes on 2 idle cores (~25 under load), so the built
# wheel is kept in a cache folder keyed by the torch version and the Python version
# ($KDOPS_WHEEL_CACHE, default ~/.cache/kdops/wheels): only the first build on a machine pays it.
# pip's own wheel cache is keyed by the sdist, not by the torch it was built against, hence ours.
set -euo pipefail
PY=${1:-python3}
CACHE=${KDOPS_WHEEL_CACHE:-$HOME/.cache/kdops/wheels}
MMCV_VERSION=2.1.0
key=$("$PY" -c 'import sys, torch; print(f"torch-{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}")')
dir="$CACHE/$key"
mkdir -p "$dir"
wheel=$(ls "$dir"/mmcv-"$MMCV_VERSION"-*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$wheel" ]; then
  echo "== mmcv $MMCV_VERSION: no cached wheel for $key; building it from the sdist (~10 min on 2 idle cores) =="
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  "$PY" -m pip install -q "setuptools<81" wheel ninja "numpy<2"
  "$PY" -m pip download -q --no-deps --no-binary :all: "mmcv==$MMCV_VERSION" -d "$work"
  tar xzf "$work"/mmcv-"$MMCV_VERSION".tar.gz -C "$work"
  # torch >= 2.13 compiles its headers only as C++20 (#error otherwise); mmcv forces C++17.
  sed -i 's/-std=c++17/-std=c++20/g' "$work/mmcv-$MMCV_VERSION/setup.py"
  start=$(date +%s)
  MAX_JOBS=${MAX_JOBS:-2} "$PY" -m pip wheel -q --no-build-isolation --no-deps \
    "$work/mmcv-$MMCV_VERSION" -w "$work/out"
  mv "$work"/out/mmcv-*.whl "$dir"/
  wheel=$(ls "$dir"/mmcv-"$MMCV_VERSION"-*.whl | head -n 1)
  echo "== mmcv $MMCV_VERSION built in $(( $(date +%s) - start )) s, cached as $wheel =="
else
  echo "== mmcv $MMCV_VERSION: cached wheel $wheel =="
fi
"$PY" -m pip install -q --no-deps "$wheel"
"$PY" -m pip install -q "mmcv==$MMCV_VERSION" mmengine==0.10.7 mmdet==3.3.0 pycocotools "numpy<2" "pillow<10"
"$PY" -c "import mmcv, mmcv.ops, mmdet, mmengine; print('mmcv', mmcv.__version__, '| mmengine', mmengine.__version__, '| mmdet', mmdet.__version__)"
