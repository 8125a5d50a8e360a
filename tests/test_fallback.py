"""Without the compiled extension kdops imports, warns once and runs the eager reference."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import warnings, torch
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    import kdops
    s = torch.randn(2, 3, 5, 6, requires_grad=True); t = torch.randn(2, 3, 5, 6)
    a = kdops.pcc_mse(s, t); b = kdops.pcc_mse(s, t)
    m = kdops.masked_mse(s, t, pixel_weight=torch.rand(2, 5, 6))
    a.backward()
assert not kdops.HAS_C
ref = kdops.reference.pcc_mse(s, t)
assert torch.allclose(a, ref) and s.grad is not None
msgs = [str(x.message) for x in w if "eager PyTorch reference" in str(x.message)]
assert len(msgs) == 2, msgs          # once per op, not once per call
assert "KDOPS_BACKEND=reference is set" in msgs[0] and "pip install" not in msgs[0]  # why, not "build it"
print("OK")
"""


def test_reference_fallback_when_extension_unavailable():
    env = dict(os.environ, PYTHONPATH=ROOT, KDOPS_BACKEND="reference")
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
