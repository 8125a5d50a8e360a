"""`kdops` command line and environment switches: help texts list what there is, bad values are
errors naming the valid ones, and the reference backend says why it is in use (issue 21)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args, env_extra=None, **kw):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("KDOPS_BACKEND", None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300, **kw)


def test_bench_help_lists_ops_sizes_selection_and_defaults():
    from kdops.bench import available_ops
    from kdops.bench.problems import SIZES

    out = run(["-m", "kdops.cli", "bench", "--help"])
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())  # argparse wraps lines
    for op in available_ops():
        assert op in text, op
    for size in SIZES:
        assert f"{size}: " in text
    assert "800x1216" in text and "C=256" in text and "192x320" in text  # what the sizes are
    assert "(default: 10)" in text and "(default: 2)" in text  # --reps, --warmup
    assert "(default: float32)" in text and "(default: coco)" in text and "bench-results" in text
    assert "--full" in text and "K=100" in text and "--threads" in text


def test_bench_rejects_unknown_op_and_bad_numbers_naming_the_valid_ones():
    out = run(["-m", "kdops.cli", "bench", "--ops", "pcc_mes"])
    assert out.returncode == 2 and "invalid choice: 'pcc_mes'" in out.stderr and "pcc_mse" in out.stderr
    out = run(["-m", "kdops.cli", "bench", "--reps", "0"])
    assert out.returncode == 2 and "--reps: must be a positive integer" in out.stderr


def test_unknown_kdops_backend_is_an_error_naming_the_valid_values():
    out = run(["-c", "import kdops"], {"KDOPS_BACKEND": "bogus"})
    assert out.returncode != 0
    assert "KDOPS_BACKEND='bogus' is not a kdops backend" in out.stderr
    assert "'auto'" in out.stderr and "'reference'" in out.stderr
    for ok in ("", "auto", "AUTO", "reference"):
        assert run(["-c", "import kdops"], {"KDOPS_BACKEND": ok}).returncode == 0, ok


def test_reference_backend_warning_says_why_not_that_the_extension_is_missing():
    script = ("import warnings, torch\n"
              "with warnings.catch_warnings(record=True) as w:\n"
              "    warnings.simplefilter('always')\n"
              "    import kdops\n"
              "    kdops.pcc_mse(torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3))\n"
              "print([str(x.message) for x in w if 'reference' in str(x.message)][0])\n")
    out = run(["-c", script], {"KDOPS_BACKEND": "reference"})
    assert out.returncode == 0, out.stderr
    assert "KDOPS_BACKEND=reference is set" in out.stdout and "unset KDOPS_BACKEND" in out.stdout
    assert "not loaded" not in out.stdout and "pip install" not in out.stdout
    info = run(["-m", "kdops.cli", "info"], {"KDOPS_BACKEND": "reference"})
    assert "KDOPS_BACKEND: reference" in info.stdout and "cpu: eager reference" in info.stdout


def test_debug_checks_switch_is_validated():
    import kdops._extension as ext

    old = os.environ.get("KDOPS_DEBUG_CHECKS")
    try:
        for value, want in (("", False), ("0", False), ("1", True)):
            os.environ["KDOPS_DEBUG_CHECKS"] = value
            assert ext.debug_checks() is want
        os.environ["KDOPS_DEBUG_CHECKS"] = "yes"
        with pytest.raises(ValueError, match="KDOPS_DEBUG_CHECKS='yes': use '1'"):
            ext.debug_checks()
    finally:
        if old is None:
            os.environ.pop("KDOPS_DEBUG_CHECKS", None)
        else:
            os.environ["KDOPS_DEBUG_CHECKS"] = old


def test_bench_no_compile_switch_is_validated(monkeypatch):
    from kdops.bench.registry import no_compile

    monkeypatch.setenv("KDOPS_BENCH_NO_COMPILE", "true")
    with pytest.raises(ValueError, match="KDOPS_BENCH_NO_COMPILE must be '0' or '1'"):
        no_compile()


def test_dtype_argument_is_checked_at_the_python_boundary():
    import torch

    from kdops.ops._validation import check_dtype

    assert check_dtype("box_masks", "dtype", None) is None
    assert check_dtype("box_masks", "dtype", torch.float16) is torch.float16
    with pytest.raises(TypeError, match=r"`dtype` must be a torch.dtype.*pass torch.float16, not the string"):
        check_dtype("box_masks", "dtype", "float16")
    with pytest.raises(TypeError, match=r"kdops.box_masks: `dtype` must be one of \(float32"):
        check_dtype("box_masks", "dtype", torch.int64)


def test_box_masks_dtype_string_is_a_clear_error():
    import torch

    import kdops

    with pytest.raises(TypeError, match="pass torch.float16, not the string"):
        kdops.box_masks(torch.tensor([[0.0, 0.0, 8.0, 8.0]]), torch.zeros(1, dtype=torch.int64), (1, 4, 4), 4,
                        dtype="float16")
