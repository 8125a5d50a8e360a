"""`import kdops` never imports mmdet or the plug-in (runs with or without mmdet installed)."""
import os
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))


def test_import_kdops_imports_no_mmdet():
    code = ("import sys, kdops, kdops.losses\n"
            "bad = sorted(m for m in sys.modules\n"
            "             if m.split('.')[0] in ('mmdet', 'mmengine', 'mmcv', 'kdops_mmdet'))\n"
            "assert not bad, bad\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
