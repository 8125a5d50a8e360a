#!/usr/bin/env bash
# Installs detectron2 0.6 as pure Python into the environment of PYTHON (first argument).
#
# detectron2 publishes no wheels, and its PyPI mirror `pb1-detectron2==0.6` is an sdist of upstream v0.6
# without the C++ sources. It installs once its extension is removed from setup.py and an empty `_C`
# module stands in. What is lost without the C++ ops: deformable convolution (DCN backbones) and the
# rotated-box ops (RRPN, rotated RoIAlign); everything kdops uses (RetinaNet, Faster R-CNN, FPN, RoIAlign
# via torchvision, the COCO evaluator) is pure Python. detectron2 0.6 calls Image.LINEAR: pillow<10.
# ~15 s. The model-zoo YAML files are not in this sdist: kdops_detectron2 builds configs from get_cfg().
set -euo pipefail
PY=${1:-python3}
VERSION=0.6
if "$PY" -c "import detectron2, sys; sys.exit(0 if detectron2.__version__ == '$VERSION' else 1)" 2>/dev/null; then
  echo "== detectron2 $VERSION already installed =="
else
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  "$PY" -m pip install -q "setuptools<81" wheel "numpy<2"
  "$PY" -m pip download -q --no-deps --no-build-isolation "pb1-detectron2==$VERSION" -d "$work"
  tar xzf "$work/pb1-detectron2-$VERSION.tar.gz" -C "$work"
  src="$work/pb1-detectron2-$VERSION"
  sed -i 's/    ext_modules=get_extensions(),/    ext_modules=[],/' "$src/setup.py"
  grep -q 'ext_modules=\[\],' "$src/setup.py" || { echo "install_detectron2.sh: setup.py changed; cannot drop the C++ extension" >&2; exit 1; }
  echo '# kdops: pure-Python install, no compiled ops (see tools/install_detectron2.sh)' > "$src/detectron2/_C.py"
  "$PY" -m pip install -q --no-build-isolation "$src"
fi
"$PY" -m pip install -q "pillow<10" "numpy<2"
"$PY" -c "import detectron2; from detectron2.config import get_cfg; from detectron2.modeling import build_model; print('detectron2', detectron2.__version__)"
