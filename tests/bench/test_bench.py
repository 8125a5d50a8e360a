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
    rows = time_case(case, torch.device("cpu"), reps=4, warmup=1, progress=lambda m: None)
    by = {r.impl: r for r in rows}
    for r in rows:  # every timing with its spread
        assert r.fwd_ms > 0 and r.bwd_ms > 0 and r.fwdbwd_ms > 0
        assert r.fwd_iqr_ms is not None and r.bwd_iqr_ms is not None and r.fwdbwd_iqr_ms is not None
    assert by["kdops"].match == "ok" and by["eager"].match == "ok"
    assert by["wrong"].match.startswith("MISMATCH")
    assert by["kdops"].fwdbwd_ms > 0 and by["kdops"].gbps > 0 and by["eager"].speedup_vs_eager == 1.0


def test_cli_bench_writes_table_json_and_plot(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "kdops.cli", "bench", "--ops", "pcc_mse", "--size", "small", "--reps", "2",
           "--warmup", "1", "--full", "--out", str(tmp_path)]
    # skip torch.compile here (slow to compile on 2 cores); the harness test covers the logic
    env["KDOPS_BENCH_NO_COMPILE"] = "1"
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| pcc_mse |" in out.stdout and "[1/2]" in out.stderr
    # where the results are, then the verdict on the timings as the run's last line
    assert f"table: {next(tmp_path.iterdir())}" in out.stderr
    assert "chart: " in out.stderr or "needs matplotlib" in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("kdops bench: 2 case(s) in ") and ("timings consistent" in last or "look disturbed" in last)
    folder = next(tmp_path.iterdir())
    data = json.loads((folder / "bench_float32_small.json").read_text())
    assert data["environment"]["torch"] == torch.__version__
    assert {r["impl"] for r in data["rows"]} == {"kdops", "eager", "roof"}
    for r in data["rows"]:  # every row's time against the case's roof; the roof row is the roof
        assert r["vs_roof"] > 0
        if r["impl"] == "roof":
            assert r["match"] == "roof" and r["vs_roof"] == 1.0 and r["bwd_ms"] is None and r["extra"]["bound"]
    md = (folder / "bench_float32_small.md").read_text()
    assert "| x roof |" in md and "Roofs (" in md and "pcc_mse: read student and teacher once" in md
    if importlib.util.find_spec("matplotlib") is not None:
        assert (folder / "bench_float32_small.png").stat().st_size > 1000
        assert (folder / "bench_float32_small_roof.png").stat().st_size > 1000
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


def test_quick_selection_has_one_representative_case_per_op_and_full_has_all():
    cpu = torch.device("cpu")
    total_quick = total_full = 0
    for op in available_ops():
        quick = cases_for(op, cpu, torch.float32, "coco", full=False)
        full = cases_for(op, cpu, torch.float32, "coco", full=True)
        assert 1 <= len(quick) <= 2 and {c.label for c in quick} <= {c.label for c in full}, op
        total_quick, total_full = total_quick + len(quick), total_full + len(full)
    assert total_quick < total_full
    with_compile = cases_for("pcc_mse", cpu, torch.float32, "coco", full=False)
    assert any(i.compile for i in with_compile[0].impls)
    assert not any(i.compile for c in cases_for("pcc_mse", cpu, torch.float32, "coco", full=False, compile=False)
                   for i in c.impls)
    label = lambda op: [c.label for c in cases_for(op, cpu, torch.float32, "coco", full=False)]  # noqa: E731
    for op in ("box_pool", "box_paint", "box_masks", "box_ranges", "mask_pool"):
        assert all("K=100" in x for x in label(op)), op
    assert label("gather_level_features") == [x for x in label("gather_level_features") if "R=1024" in x]
    assert all("decoder N=2" in x for x in label("ms_deform_attn"))
    assert len(label("bckd_loc_loss")) == 2 and len(label("bckd_cls_loss")) == 1


def test_repetitions_are_interleaved_across_implementations():
    case = cases_for("masked_mse", torch.device("cpu"), torch.float32, "small")[0]
    calls = []

    def tracked(name, fn):
        def run(**kw):
            calls.append(name)
            return fn(**kw)
        return run

    case.impls = [Impl("kdops", tracked("a", case.impls[0].fn)), Impl("eager", tracked("b", case.impls[1].fn))]
    time_case(case, torch.device("cpu"), reps=4, warmup=0, progress=lambda m: None)
    timed = calls[2:]  # after one checking run each
    assert timed[:4] == ["a", "b", "b", "a"]  # repetition i rotates the order by i
    assert timed.count("a") == timed.count("b") == 8  # 4 fwd/bwd + 4 fwd+bwd each


def test_disturbed_timings_are_flagged_in_table_and_last_line():
    from kdops.bench.harness import disturbance
    from kdops.bench.report import markdown, summary

    base = dict(op="gather_level_features", case="R=1024", impl="eager", fwd_ms=10.0, bwd_ms=5.0, fwdbwd_ms=15.5,
                fwd_iqr_ms=0.3, bwd_iqr_ms=0.2, fwdbwd_iqr_ms=0.4, speedup_vs_eager=1.0, gbps=None, peak_mib=None,
                match="ok", error="", disturbed="", extra={})
    assert disturbance(base) == ""
    # the run: eager fwd+bwd 9.65 ms below its own forward of 92.9 ms
    bad = dict(base, fwd_ms=92.9, fwdbwd_ms=9.65)
    assert "fwd+bwd 9.65 ms < fwd 92.9 ms" in disturbance(bad)
    noisy = dict(base, fwdbwd_iqr_ms=8.0)  # a row without a canary (older JSON): its own spread decides
    assert "fwd+bwd spread 52%" in disturbance(noisy)
    # with a canary, the op's own spread is reported but does not flag (idle machines vary that much);
    # the canary's spread does
    assert disturbance(dict(noisy, extra={"canary_spread": 0.05})) == ""
    assert disturbance(dict(base, extra={"canary_spread": 3.0})) == "canary spread 300%"
    # sub-millisecond ops: fwd+bwd below fwd by less than CONSISTENCY_MIN_MS is timer noise
    assert disturbance(dict(base, fwd_ms=0.163, bwd_ms=None, fwdbwd_ms=0.0955, extra={"canary_spread": 0.1})) == ""
    assert "timings consistent" in summary([base])
    line = summary([base, bad])
    assert line.startswith("WARNING: 1 of 2 timings look disturbed") and "--threads 1" in line
    rows = [base, dict(bad, impl="kdops")]
    table = markdown(rows, {"torch": "x"}, "t")
    assert "! disturbed: fwd+bwd 9.65 ms < fwd 92.9 ms" in table
    assert table.strip().splitlines()[-1] == summary(rows)


def test_each_case_measures_the_canary_and_its_spread_flags_the_rows(monkeypatch):
    """time_case times the canary after every repetition round and stores its spread in every row; when
    the canary's times vary (here injected: alternately 1 and 5 ms, as under a competing process) every
    row of the case is flagged, and with steady canary times none is."""
    import kdops.bench.harness as H

    case = cases_for("masked_mse", torch.device("cpu"), torch.float32, "small")[0]
    rows = time_case(case, torch.device("cpu"), reps=6, warmup=1, progress=lambda m: None)
    assert all(isinstance(r.extra.get("canary_spread"), float) for r in rows if not r.error)

    def fake(times):
        def tick(self):
            self.samples.append(times[len(self.samples) % len(times)])
        return tick

    monkeypatch.setattr(H._Canary, "tick", fake([1e-3, 5e-3]))
    rows = time_case(case, torch.device("cpu"), reps=6, warmup=1, progress=lambda m: None)
    assert all(r.extra["canary_spread"] > H.CANARY_SPREAD and "canary spread" in r.disturbed for r in rows)
    monkeypatch.setattr(H._Canary, "tick", fake([1e-3, 1.01e-3]))
    rows = time_case(case, torch.device("cpu"), reps=6, warmup=1, progress=lambda m: None)
    assert all("canary" not in r.disturbed for r in rows)


def test_chart_has_one_panel_per_family_distinct_colours_and_legend_outside(tmp_path):
    pytest = __import__("pytest")
    pytest.importorskip("matplotlib")
    from kdops.bench.report import KDOPS_COLOUR, colours, plot

    rows = []
    for op, impls in (("masked_mse", ["kdops", "eager", "compile", "eager (FGD code)"]),
                      ("pcc_mse", ["kdops", "eager", "compile"]),
                      ("box_pool", ["kdops", "eager (per-image mask matmul)", "compile"]),
                      ("mask_pool", ["kdops", "eager (object loop)", "LGD per-image mm", "dense (N,C,K) + pick",
                                     "compile (dense + pick)"]),
                      ("ms_deform_attn", ["kdops", "eager", "compile", "mmcv (CUDA)"])):
        for i, impl in enumerate(impls):
            rows.append(dict(op=op, case=f"{op} case with a long label that goes on and on", impl=impl,
                             fwd_ms=1.0, bwd_ms=1.0, fwdbwd_ms=2.0, fwd_iqr_ms=0.0, bwd_iqr_ms=0.0,
                             fwdbwd_iqr_ms=0.0, speedup_vs_eager=[3.0, 1.0, 0.5, 40.0, 0.02][i], match="ok",
                             error="", disturbed=""))
    cmap = colours(rows)
    assert cmap["kdops"] == KDOPS_COLOUR and list(cmap.values()).count(KDOPS_COLOUR) == 1
    peers = [c for n, c in cmap.items() if n not in ("kdops",)]
    assert len(set(peers)) >= len(peers) - 3  # the eager baselines share grey; every other one its own
    out = tmp_path / "chart.png"
    plot(str(out), rows, {"device": "cpu", "torch": "2", "date": "today"}, "kdops bench")
    from matplotlib import image

    h, w = image.imread(str(out)).shape[:2]
    assert w <= 1200 and 300 <= h <= 2000  # one readable column of panels, not a 5000-px-wide strip


def test_cli_bench_default_output_is_the_untracked_folder(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("KDOPS_BENCH_NO_COMPILE", None)
    cmd = [sys.executable, "-m", "kdops.cli", "bench", "--ops", "box_ranges", "--size", "small", "--reps", "2",
           "--warmup", "0"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "quick selection" in out.stderr and "torch.compile left out (--compile to include it)" in out.stderr
    written = sorted(p.name for p in (tmp_path / "bench-results").glob("*/*"))
    assert "bench_float32_small_quick.md" in written and "bench_float32_small_quick.json" in written
    ignored = subprocess.run(["git", "check-ignore", "-q", "bench-results/x/bench_float32_coco_quick.md"],
                             cwd=ROOT, capture_output=True)
    assert ignored.returncode == 0, "bench-results/ must be git-ignored"
    import kdops.cli

    assert kdops.cli.DEFAULT_OUT == "bench-results"
    with open(os.path.join(ROOT, "Makefile")) as f:
        make = f.read()
    assert "BENCH_OUT ?= bench-results" in make and "--out $(BENCH_OUT)" in make


def test_make_bench_compiles_no_cuda_without_a_gpu():
    import shutil

    if shutil.which("make") is None:
        return

    def recipe(**var):
        args = ["make", "-n", "-B", ".stamp-build-bench", "SYSTEM_PYTHON=1"] + [f"{k}={v}" for k, v in var.items()]
        out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout

    assert "FORCE_CUDA=0 " in recipe(BENCH_GPU=0, FORCE_CUDA=1)  # a toolkit, but no GPU: C++ only
    assert "FORCE_CUDA=1 " in recipe(BENCH_GPU=1, FORCE_CUDA=1)
    # `make test`'s build (and its stamp) is reused while it is up to date, never rewritten by bench
    text = recipe(BENCH_GPU=0)
    assert "reusing the build of make test" in text and "touch .stamp-build-bench" in text
    assert "touch .stamp-build\n" not in text


def test_every_case_but_box_ranges_has_a_roof_with_its_bound():
    """Issue 20: every memory- or compute-bound case is timed against the machine's own limit
    (box_ranges writes K x levels x 4 integers: latency-bound, no roof)."""
    for op in available_ops():
        for case in cases_for(op, torch.device("cpu"), torch.float32, "small", compile=False):
            roofs = [i for i in case.impls if i.roof]
            if op == "box_ranges":
                assert not roofs
                continue
            assert len(roofs) == 1 and case.bound, (op, case.label)
            with torch.no_grad():  # the roof runs on the case's inputs
                assert roofs[0].fn(**case.make_inputs())


def test_roof_row_is_timed_not_compared_and_the_backward_gets_a_ramp():
    from kdops.bench.harness import _backward

    x = torch.randn(3, 4, requires_grad=True)
    (g,) = _backward(x * 2.0, [x])  # the timed backward's upstream gradient: a 0.5..1.5 ramp
    torch.testing.assert_close(g, 2.0 * torch.linspace(0.5, 1.5, 12).reshape(3, 4))
    case = cases_for("pcc_mse", torch.device("cpu"), torch.float32, "small", compile=False)[0]
    rows = {r.impl: r for r in time_case(case, torch.device("cpu"), reps=4, warmup=1, progress=lambda m: None)}
    assert rows["roof"].match == "roof" and rows["roof"].bwd_ms is None and rows["roof"].vs_roof == 1.0
    assert rows["kdops"].vs_roof == rows["kdops"].fwdbwd_ms / rows["roof"].fwdbwd_ms
    case.impls = [case.impls[-1]] + case.impls[:-1]
    import pytest

    from kdops.bench import registry

    registry._REGISTRY["_roof_first"] = lambda d, t, s: [case]
    try:
        with pytest.raises(ValueError, match="roof must come after kdops"):
            cases_for("_roof_first", torch.device("cpu"), torch.float32, "small")
    finally:
        del registry._REGISTRY["_roof_first"]


def test_allocator_modes_and_page_fault_probe():
    """--allocator: 'warm' makes glibc keep freed memory (in a fresh process: it cannot be undone),
    'system' leaves it; an unknown mode is refused; the page-fault probe gives a positive cost."""
    import pytest

    from kdops.bench.memory import configure_allocator, page_fault_us

    with pytest.raises(ValueError, match="--allocator must be one of warm, system"):
        configure_allocator("cached")
    assert configure_allocator("system").startswith("system")
    assert page_fault_us(n_bytes=4 << 20, reps=3) > 0
    code = ("from kdops.bench.memory import configure_allocator as c; import sys; w = c('warm'); print(w)\n"
            "try:\n    c('system')\nexcept ValueError as e:\n    print('refused:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.strip().splitlines()
    import platform

    if platform.libc_ver()[0] == "glibc":
        assert first.startswith("warm (") and second.startswith("refused: ")
    else:
        assert first.startswith("system (warm asked for")


def test_loss_weight_fold_script_gives_the_same_gradients_both_ways():
    # benchmarks/loss_weight_fold.py times the weight multiplied onto a loss against folded into
    # the op: both must give the student the same gradient (small maps here, two levels)
    spec = importlib.util.spec_from_file_location("kdops_fold_bench",
                                                  os.path.join(ROOT, "benchmarks", "loss_weight_fold.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    g = torch.Generator().manual_seed(0)
    S = [torch.randn(2, 4, h, w, generator=g).requires_grad_() for h, w in ((6, 5), (3, 3))]
    T = [torch.randn(2, 4, h, w, generator=g) for h, w in ((6, 5), (3, 3))]
    for name, impls in mod.cases(S, T).items():
        grads = []
        for k in ("weight multiplied", "weight folded"):
            for s in S:
                s.grad = None
            impls[k]()
            grads.append([s.grad.clone() for s in S])
        impls["roof"]()
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, msg=name)
            assert a.abs().sum() > 0
