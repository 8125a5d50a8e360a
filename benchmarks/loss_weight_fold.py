"""A feature loss's forward+backward in the KD step, ``total_loss.backward()``, with its loss weight
multiplied onto the result or folded into the op (``scale=``), against the case's roof.

    python benchmarks/loss_weight_fold.py [--reps 25] [--out benchmarks/results/<machine>]

On the CPU, when only the student learns, ``kdops.pcc_mse`` and ``kdops.masked_mse`` write the
student's gradient in the forward pass; backward scales it by its incoming gradient -- one more
read and write of the gradient, unless that gradient is exactly 1. ``kdops bench`` gives every
loss an upstream ramp (0.5 for a 0-d loss), so its rows always include that pass: ~5 units of
traffic against the roof's 3 (read student and teacher, write the gradient). In training the
incoming gradient of a loss term is its weight; folded into the op (as ``kdops.losses.PKDLoss``
does) it is 1, and the step moves the roof's bytes plus the statistics pass of a normalised loss.

Same problem as ``kdops bench`` (COCO FPN P3-P7, batch 2, C=256, fp32), each implementation's best
time of ``--reps`` interleaved rounds (min: the least disturbed run on a shared machine), with the
glibc heap kept warm as ``kdops bench --allocator warm`` does (no page faults after warm-up).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Callable, Dict, List

import torch

import kdops
from kdops.bench.memory import configure_allocator
from kdops.bench.problems import fpn, roof_feature_pass
from kdops.bench.report import cpu_model

WEIGHT = 3.0  # a loss weight (PKD's RetinaNet configs use 6 on the loss/2 the op returns)


def cases(S: List[torch.Tensor], T: List[torch.Tensor]) -> Dict[str, Dict[str, Callable[[], None]]]:
    def pcc(norm: str, folded: bool) -> Callable[[], None]:
        if folded:
            return lambda: kdops.pcc_mse(S, T, norm=norm, scale=WEIGHT).sum().backward()
        return lambda: (kdops.pcc_mse(S, T, norm=norm).sum() * WEIGHT).backward()

    def mse(folded: bool) -> Callable[[], None]:
        if folded:
            return lambda: kdops.masked_mse(S, T, reduction="mean", scale=WEIGHT).sum().backward()
        return lambda: (kdops.masked_mse(S, T, reduction="mean").sum() * WEIGHT).backward()

    def roof() -> None:
        with torch.no_grad():
            roof_feature_pass(S, T)

    return {
        "pcc_mse channel (PKD)": {"weight multiplied": pcc("channel", False), "weight folded": pcc("channel", True),
                                  "roof": roof},
        "pcc_mse instance (LGD)": {"weight multiplied": pcc("instance", False),
                                   "weight folded": pcc("instance", True), "roof": roof},
        "masked_mse no weights (FitNet, HEAD mimic)": {"weight multiplied": mse(False), "weight folded": mse(True),
                                                       "roof": roof},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=25)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="folder for loss_weight_fold.{md,json} (default: print only)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    allocator = configure_allocator("warm")
    N, C, levels, _, _ = fpn("coco")
    g = torch.Generator().manual_seed(0)
    S = [torch.randn(N, C, h, w, generator=g).requires_grad_() for h, w in levels]
    T = [torch.randn(N, C, h, w, generator=g) for h, w in levels]
    results = {}
    for name, impls in cases(S, T).items():
        best = {k: float("inf") for k in impls}
        for r in range(args.reps + 2):  # two untimed warm-up rounds
            for k, fn in impls.items():
                for s in S:
                    s.grad = None
                t0 = time.perf_counter()
                fn()
                dt = time.perf_counter() - t0
                if r >= 2:
                    best[k] = min(best[k], dt)
        results[name] = {k: {"ms": v * 1e3, "x_roof": v / best["roof"]} for k, v in best.items()}
    head = (f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} · {cpu_model()} · "
            f"torch {torch.__version__} · {torch.get_num_threads()} threads · allocator {allocator} · "
            f"best of {args.reps}")
    lines = ["# Loss weight multiplied vs folded into the op (`total_loss.backward()`, fp32, COCO FPN N=2 C=256)", "",
             head, "", "| loss | weight multiplied ms (x roof) | weight folded ms (x roof) | roof ms |", "|---|---:|---:|---:|"]
    for name, r in results.items():
        m, f = r["weight multiplied"], r["weight folded"]
        lines.append(f"| {name} | {m['ms']:.2f} ({m['x_roof']:.2f}) | {f['ms']:.2f} ({f['x_roof']:.2f}) | "
                     f"{r['roof']['ms']:.2f} |")
    lines += ["", "roof: read student and teacher once, write the student's gradient once into a fresh tensor "
              "(torch.sub per level), as `kdops bench`."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "loss_weight_fold.md"), "w") as f:
            f.write(text)
        with open(os.path.join(args.out, "loss_weight_fold.json"), "w") as f:
            json.dump({"header": head, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
