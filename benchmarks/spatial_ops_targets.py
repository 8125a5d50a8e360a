"""The issue-3 CPU targets, timed two ways:

- interleaved: each round runs every variant once, so load from other processes hits all of
  them alike; but each variant then starts from the memory the previous one left, and a
  fresh gradient buffer may have to be faulted in page by page (on these VMs ~1.2 us per
  4 KiB page: ~9 ms for the 31 MB P3 gradient);
- steady: each variant alone, 3 warm-up calls then the timed ones back to back, as in a
  training loop that repeats the same step (the allocator then reuses the same pages).

Prints median and min of each.

    PYTHONPATH=. python benchmarks/spatial_ops_targets.py [--threads 1] [--rounds 11]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import kdops
from kdops import reference
from kdops.bench.ops.box_pool import coco_boxes
from kdops.bench.ops.gather_level_features import random_rows
from kdops.bench.problems import fpn


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=11)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    N, C, levels, strides, image = fpn("coco")
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(N, C, h, w, generator=g).requires_grad_() for h, w in levels]
    boxes = {K: coco_boxes(K, N, image, seed=K) for K in (10, 100, 1000, 5000)}
    idx = random_rows(1024, N, levels, seed=1)

    def fb(fn):
        def run():
            out = fn()
            torch.autograd.grad(out.sum(), feats)
        return run

    def fw(fn):
        def run():
            with torch.no_grad():
                fn()
        return run

    pool = {K: (lambda K=K: kdops.box_pool(feats, *boxes[K], strides)) for K in boxes}
    ref100 = lambda: reference.box_pool(feats, *boxes[100], strides)  # noqa: E731
    gat = lambda: kdops.gather_level_features(feats, idx, validate=False)  # noqa: E731
    gref = lambda: reference.gather_level_features(feats, idx)  # noqa: E731
    variants = {
        "box_pool fwd K=10": fw(pool[10]), "box_pool fwd K=1000": fw(pool[1000]),
        "box_pool fwd+bwd K=10": fb(pool[10]), "box_pool fwd+bwd K=1000": fb(pool[1000]),
        "box_pool fwd K=5000": fw(pool[5000]), "box_pool fwd+bwd K=5000": fb(pool[5000]),
        "box_pool fwd K=100": fw(pool[100]), "eager mask-matmul fwd K=100": fw(ref100),
        "box_pool fwd+bwd K=100": fb(pool[100]), "eager mask-matmul fwd+bwd K=100": fb(ref100),
        "gather fwd+bwd R=1024": fb(gat), "eager per-level loop fwd+bwd R=1024": fb(gref),
        "memset of the level gradients": lambda: [torch.zeros_like(f) for f in feats],
        "one read of the levels (sum)": fw(lambda: [f.sum() for f in feats]),
    }
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, COCO FPN N={N} C={C} fp32")
    ts = {k: [] for k in variants}
    for fn in variants.values():
        fn()
    for _ in range(a.rounds):
        for k, fn in variants.items():
            t = time.perf_counter()
            fn()
            ts[k].append(time.perf_counter() - t)
    steady = {}
    for k, fn in variants.items():
        for _ in range(3):
            fn()
        steady[k] = []
        for _ in range(a.rounds):
            t = time.perf_counter()
            fn()
            steady[k].append(time.perf_counter() - t)
    for title, runs in (("interleaved", ts), ("steady", steady)):
        print(f"-- {title}")
        med = {k: statistics.median(v) * 1e3 for k, v in runs.items()}
        for k, v in runs.items():
            print(f"{k:40s} median {med[k]:8.2f} ms   min {min(v) * 1e3:8.2f} ms")
        ratios(med)


def ratios(med):
    print(f"box_pool fwd in reads of the levels: K=10 {med['box_pool fwd K=10'] / med['one read of the levels (sum)']:.2f}, "
          f"K=100 {med['box_pool fwd K=100'] / med['one read of the levels (sum)']:.2f}, "
          f"K=1000 {med['box_pool fwd K=1000'] / med['one read of the levels (sum)']:.2f}")
    print(f"box_pool K=1000 / K=10: fwd {med['box_pool fwd K=1000'] / med['box_pool fwd K=10']:.2f}x, "
          f"fwd+bwd {med['box_pool fwd+bwd K=1000'] / med['box_pool fwd+bwd K=10']:.2f}x (target <= 1.5); "
          f"K=5000 / K=1000: fwd {med['box_pool fwd K=5000'] / med['box_pool fwd K=1000']:.2f}x")
    print(f"eager / box_pool at K=100: fwd {med['eager mask-matmul fwd K=100'] / med['box_pool fwd K=100']:.2f}x, "
          f"fwd+bwd {med['eager mask-matmul fwd+bwd K=100'] / med['box_pool fwd+bwd K=100']:.2f}x (target >= 10)")
    print(f"eager / gather at R=1024 fwd+bwd: "
          f"{med['eager per-level loop fwd+bwd R=1024'] / med['gather fwd+bwd R=1024']:.2f}x (target >= 20); "
          f"bound for any kernel that returns dense level gradients, eager / memset: "
          f"{med['eager per-level loop fwd+bwd R=1024'] / med['memset of the level gradients']:.2f}x")


if __name__ == "__main__":
    main()
