"""Command line: ``kdops info`` and ``kdops bench``."""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}


def _info() -> int:
    import platform

    import torch

    import kdops
    from kdops._extension import LOAD_ERROR
    from kdops.ops import __all__ as op_names
    from kdops.triton import HAS_TRITON, INTERPRET

    print(f"kdops {kdops.__version__}  python {platform.python_version()}  torch {torch.__version__}"
          f"  (CUDA build {torch.version.cuda})")
    try:
        import triton

        print(f"triton {triton.__version__}{'  (TRITON_INTERPRET=1)' if INTERPRET else ''}")
    except Exception:
        print("triton: not installed")
    print(f"extension kdops._C: {'loaded' if kdops.HAS_C else 'NOT loaded: ' + str(LOAD_ERROR)}")
    print(f"CPU threads: {torch.get_num_threads()}")
    cuda = torch.cuda.is_available()
    if cuda:
        for i in range(torch.cuda.device_count()):
            print(f"cuda:{i}: {torch.cuda.get_device_name(i)}")
    else:
        print("CUDA: no GPU visible")
    print("\nbackend per op:")
    for name in op_names:
        if not kdops.HAS_C:
            cpu = "eager reference (extension missing)"
        elif _has(name, "CPU"):
            cpu = "C++ kernel"
        else:
            cpu = "torch ops (no custom kernel)"
        if not cuda:
            gpu = "- (no GPU)"
        elif kdops.HAS_C and HAS_TRITON:
            gpu = _cuda_backend(name)
        else:
            gpu = "eager reference"
        print(f"  {name:<24} cpu: {cpu:<30} cuda: {gpu}")
    return 0


def _has(op: str, key: str) -> bool:
    """Whether a kdops schema of this op (<op>_fwd, or without a "_loss" suffix) has a kernel for key."""
    import torch

    for schema in (f"{op}_fwd", f"{op[:-5]}_fwd" if op.endswith("_loss") else None):
        if schema and hasattr(torch.ops.kdops, schema):
            return torch._C._dispatch_has_kernel_for_dispatch_key(f"kdops::{schema}", key)
    return False


def _cuda_backend(op: str) -> str:
    """Which kernel serves op on CUDA: ms_deform_attn has CUDA C++ and Triton, the others Triton."""
    if op == "ms_deform_attn":
        from kdops.ops.ms_deform_attn import cuda_backend

        return {"cuda": "CUDA C++", "triton": "Triton"}.get(cuda_backend(), "eager reference")
    if _has(op, "CUDA"):
        return "Triton"
    return "torch ops (no custom kernel)"


def _bench(args) -> int:
    import torch

    from kdops.bench import available_ops, cases_for
    from kdops.bench.harness import default_progress, time_case
    from kdops.bench.report import device_slug, environment, markdown, plot, write_json

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("kdops bench: --device cuda asked for but no GPU is visible", file=sys.stderr)
        return 2
    dtype = getattr(torch, DTYPES[args.dtype])
    ops = args.ops or available_ops()
    env = environment(device)
    env.update({"dtype": str(dtype).replace("torch.", ""), "size": args.size})
    print(f"kdops bench on {env['device']}, {env['dtype']}, size={args.size}, ops: {', '.join(ops)}",
          file=sys.stderr)
    title = f"kdops bench ({env['dtype']}, {args.size})"
    out_md, out_json, out_png = args.markdown, args.json, args.plot
    if args.out:
        folder = os.path.join(args.out, device_slug(device))
        os.makedirs(folder, exist_ok=True)
        stem = os.path.join(folder, f"bench_{env['dtype']}_{args.size}")
        out_md, out_json, out_png = out_md or stem + ".md", out_json or stem + ".json", out_png or stem + ".png"

    def save(rows):  # after every case: a run cut short (a time limit) keeps what it measured
        if out_md:
            with open(out_md, "w") as f:
                f.write(markdown(rows, env, title))
        if out_json:
            write_json(out_json, rows, env)

    rows = []
    all_cases = [(op, c) for op in ops for c in cases_for(op, device, dtype, args.size)]
    for i, (op, case) in enumerate(all_cases, 1):
        print(f"[{i}/{len(all_cases)}] {op}: {case.label}", file=sys.stderr, flush=True)
        for r in time_case(case, device, args.reps, args.warmup, default_progress):
            rows.append(r.as_dict())
        save(rows)
    if not all_cases:
        save(rows)
    print(markdown(rows, env, title))
    if out_png:
        try:
            plot(out_png, rows, env, title)
        except ImportError:
            print("kdops bench: --plot needs matplotlib (pip install matplotlib); the JSON can be plotted "
                  "later, elsewhere, with `kdops plot <json>`", file=sys.stderr)
            out_png = None
    for p in (out_md, out_json, out_png):
        if p:
            print(f"wrote {p}", file=sys.stderr)
    bad = [r for r in rows if r["match"].startswith("MISMATCH") and r["impl"] in ("kdops", "eager")]
    return 1 if bad else 0


def _plot(args) -> int:
    import json

    from kdops.bench.report import plot

    with open(args.json) as f:
        data = json.load(f)
    env, rows = data["environment"], data["rows"]
    out = args.out or os.path.splitext(args.json)[0] + ".png"
    try:
        plot(out, rows, env, f"kdops bench ({env.get('dtype', '?')}, {env.get('size', '?')})")
    except ImportError:
        print("kdops plot: needs matplotlib (pip install matplotlib)", file=sys.stderr)
        return 2
    print(f"wrote {out}", file=sys.stderr)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="kdops", description="kdops: fused kernels for detection KD")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions, devices and the backend each op uses")
    b = sub.add_parser("bench", help="speed, memory and exactness of each op vs eager and torch.compile")
    b.add_argument("--ops", nargs="+", help="bench entries (default: all)")
    b.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when a GPU is visible, else cpu")
    b.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    b.add_argument("--size", default="coco", choices=["coco", "small"])
    b.add_argument("--reps", type=int, default=10)
    b.add_argument("--warmup", type=int, default=2)
    b.add_argument("--json", help="write rows + environment as JSON")
    b.add_argument("--plot", help="write a PNG bar chart")
    b.add_argument("--markdown", help="write the markdown table")
    b.add_argument("--out", help="results folder: writes <out>/<device>/bench_<dtype>_<size>.{md,json,png}")
    pl = sub.add_parser("plot", help="the PNG bar chart of a `kdops bench` JSON (e.g. one from a machine "
                                      "without matplotlib)")
    pl.add_argument("json", help="a JSON written by kdops bench")
    pl.add_argument("--out", help="PNG path (default: the JSON's, with .png)")
    args = p.parse_args(argv)
    if args.cmd == "info":
        return _info()
    if args.cmd == "plot":
        return _plot(args)
    return _bench(args)


if __name__ == "__main__":
    sys.exit(main())
