"""Times the issue-3 targets on the CPU (median of repeated runs after a warm-up).

    PYTHONPATH=. python benchmarks/spatial_ops_cpu.py [--threads N] [--reps 7] [--ops box_pool,...]

Uses the cases of kdops/bench/ops/{box_pool,gather_level_features,box_masks}.py (COCO FPN,
N=2, C=256, fp32); prints median [min-max] per implementation. A stop-gap until `kdops bench`.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from kdops.bench import cases_for


def timeit(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), min(ts), max(ts)


def fwd_bwd(impl, inp, grad_inputs):
    def run():
        out = impl.fn(**inp)
        outs = out if isinstance(out, tuple) else (out,)
        req = [t for name in grad_inputs for t in (inp[name] if isinstance(inp[name], list) else [inp[name]])]
        torch.autograd.grad(sum(o.float().sum() for o in outs), req)
    return run


def fwd(impl, inp):
    def run():
        with torch.no_grad():
            impl.fn(**inp)
    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--ops", default="box_pool,box_paint,gather_level_features")
    ap.add_argument("--ref-max", type=int, default=100, help="largest K / R at which the eager reference is timed")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    for op in a.ops.split(","):
        for case in cases_for(op, torch.device("cpu"), torch.float32, "coco"):
            inp = case.make_inputs()
            size = int(case.label.split("=")[-1].split()[0])
            for impl in case.impls[: 1 if size > a.ref_max else 2]:
                if impl.compile:
                    continue  # torch.compile of the references: left to `kdops bench`
                f = timeit(fwd(impl, inp), a.reps)
                line = f"{op:22s} {case.label:36s} {impl.name:32s} fwd {f[0]*1e3:9.2f} ms [{f[1]*1e3:.2f}-{f[2]*1e3:.2f}]"
                if case.backward:
                    fb = timeit(fwd_bwd(impl, inp, case.grad_inputs), a.reps)
                    line += f"  fwd+bwd {fb[0]*1e3:9.2f} ms [{fb[1]*1e3:.2f}-{fb[2]*1e3:.2f}]"
                print(line, flush=True)


if __name__ == "__main__":
    main()
