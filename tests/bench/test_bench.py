"""The bench harness and CLI: cases build, implementations agree, tables and files are written."""
import importlib.util
import json
import os
import subprocess
import sys

import torch

from kdops.bench import available_ops, cases_for
from kdops.bench.harness import time_case
from kdops.bench.registry import Impl

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_every_registered_op_builds_small_cases():
    ops = available_ops()
    assert {"masked_mse", "pcc_mse"} <= set(ops)
    for op in ops:
        for case in cases_for(op, torch.device("cpu"), torch.float32, "small"):
            inputs = case.make_inputs()
            assert case.impls[0].name == "kdops" and inputs


def test_time_case_checks_agreement_and_flags_mismatch():
    case = cases_for("masked_mse", torch.device("cpu"), torch.float32, "small")[0]
    wrong = Impl("wrong", lambda **kw: case.impls[1].fn(**kw) * 1.01)
    case.impls = [case.impls[0], case.impls[1], wrong]
    rows = time_case(case, torch.device("cpu"), reps=2, warmup=1, progress=lambda m: None)
    by = {r.impl: r for r in rows}
    assert by["kdops"].match == "ok" and by["eager"].match == "ok"
    assert by["wrong"].match.startswith("MISMATCH")
    assert by["kdops"].fwdbwd_ms > 0 and by["kdops"].gbps > 0 and by["eager"].speedup_vs_eager == 1.0


def test_cli_bench_writes_table_json_and_plot(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "kdops.cli", "bench", "--ops", "pcc_mse", "--size", "small", "--reps", "2",
           "--warmup", "1", "--out", str(tmp_path)]
    # skip torch.compile here (slow to compile on 2 cores); the harness test covers the logic
    env["KDOPS_BENCH_NO_COMPILE"] = "1"
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| pcc_mse |" in out.stdout and "[1/2]" in out.stderr
    folder = next(tmp_path.iterdir())
    data = json.loads((folder / "bench_float32_small.json").read_text())
    assert data["environment"]["torch"] == torch.__version__
    assert {r["impl"] for r in data["rows"]} == {"kdops", "eager"}
    if importlib.util.find_spec("matplotlib") is not None:
        assert (folder / "bench_float32_small.png").stat().st_size > 1000
        # the chart again from the JSON alone (how results from a machine without matplotlib get theirs)
        png = tmp_path / "again.png"
        again = subprocess.run([sys.executable, "-m", "kdops.cli", "plot", str(folder / "bench_float32_small.json"),
                                "--out", str(png)], capture_output=True, text=True, env=env, timeout=300)
        assert again.returncode == 0, again.stderr[-2000:]
        assert png.stat().st_size > 1000
    else:  # e.g. the lent GPU machines: tables and JSON still written, and the user told why no plot
        assert "--plot needs matplotlib" in out.stderr and not (folder / "bench_float32_small.png").exists()
    assert (folder / "bench_float32_small.md").read_text().startswith("# kdops bench")


def test_cli_info():
    out = subprocess.run([sys.executable, "-m", "kdops.cli", "info"], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=ROOT), timeout=300)
    assert out.returncode == 0, out.stderr
    assert "extension kdops._C: loaded" in out.stdout
    import kdops.ops

    for op in kdops.ops.__all__:  # every public op gets a backend line
        assert f"  {op} " in out.stdout
