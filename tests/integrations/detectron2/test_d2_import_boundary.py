"""`import kdops` never imports detectron2 or kdops_detectron2 (runs with or without detectron2)."""
import os
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))


def test_import_kdops_imports_no_detectron2():
    code = ("import sys, kdops, kdops.losses\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('detectron2', 'kdops_detectron2'))\n"
            "assert not bad, bad\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
