"""Command line: ``kdops info`` and ``kdops bench``."""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}


#: the short backend names `kdops info` prints and README.md's op table uses
CPP, TRITON, CUDA_CPP, TORCH_OPS, REFERENCE = "C++", "Triton", "CUDA C++", "torch ops", "eager reference"


def backends() -> dict:
    """op -> (CPU backend, CUDA backend) as the dispatcher answers with this build (the CUDA one is
    what a GPU would run, also on a machine without one): C++, Triton, CUDA C++, torch ops (no
    custom kernel: tensor ops on the device) or eager reference (no kernel: the fallback)."""
    import kdops
    from kdops.ops import __all__ as op_names
    from kdops.triton import HAS_TRITON

    out = {}
    for name in op_names:
        if not kdops.HAS_C:
            out[name] = (REFERENCE, REFERENCE)
            continue
        cpu = CPP if _has(name, "CPU") else TORCH_OPS
        gpu = _cuda_backend(name) if HAS_TRITON or name == "ms_deform_attn" else REFERENCE
        out[name] = (cpu, gpu)
    return out


def _info() -> int:
    import platform

    import torch

    import kdops
    from kdops._extension import BACKEND, LOAD_ERROR
    from kdops.triton import INTERPRET

    print(f"kdops {kdops.__version__}  python {platform.python_version()}  torch {torch.__version__}"
          f"  (CUDA build {torch.version.cuda})")
    try:
        import triton

        print(f"triton {triton.__version__}{'  (TRITON_INTERPRET=1)' if INTERPRET else ''}")
    except Exception:
        print("triton: not installed")
    print(f"extension kdops._C: {'loaded' if kdops.HAS_C else 'NOT loaded: ' + str(LOAD_ERROR)}")
    print(f"KDOPS_BACKEND: {BACKEND}")
    print(f"CPU threads: {torch.get_num_threads()}")
    cuda = torch.cuda.is_available()
    if cuda:
        for i in range(torch.cuda.device_count()):
            print(f"cuda:{i}: {torch.cuda.get_device_name(i)}")
    else:
        print("CUDA: no GPU visible")
    print("\nbackend per op" + ("" if cuda else " (cuda: what a GPU would run with this build; none visible here)")
          + ":")
    for name, (cpu, gpu) in backends().items():
        print(f"  {name:<24} cpu: {cpu:<16} cuda: {gpu}")
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

        return {"cuda": CUDA_CPP, "triton": TRITON}.get(cuda_backend(), REFERENCE)
    if _has(op, "CUDA"):
        return TRITON
    return TORCH_OPS


DEFAULT_OUT = "bench-results"  # untracked (.gitignore); `--out benchmarks/results` writes the committed folder
QUICK = ("one representative case per op: K=100 boxes for box_ranges (rule fgd), box_pool, box_paint, "
         "box_masks and mask_pool, R=1024 rows for gather_level_features and roi_align, the batch-2 300-query decoder for "
         "ms_deform_attn, both norms of pcc_mse, both BCKD heads, COCO's 2 x 5 groups of 2000 proposals for nms_mask; "
         "torch.compile left out on the CPU (--compile)")


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m} min {s:02d} s" if m else f"{s} s"


def _bench(args) -> int:
    import time

    import torch

    from kdops.bench import cases_for
    from kdops.bench.harness import default_progress, time_case
    from kdops.bench.report import device_slug, environment, markdown, summary, write_json

    started = time.perf_counter()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("kdops bench: --device cuda asked for but no GPU is visible", file=sys.stderr)
        return 2
    dtype = getattr(torch, DTYPES[args.dtype])
    ops = args.ops or _bench_ops()
    env = environment(device)
    if device.type == "cpu":
        from kdops.bench.memory import configure_allocator, page_fault_us

        env["page_fault_us_per_4k"] = round(page_fault_us(), 2)  # before the allocator changes anything
        env["allocator"] = configure_allocator(args.allocator)
    selection = "full" if args.full else "quick"
    # torch.compile of the references costs 15-40 s per case on 2 CPU cores (inductor compiles C++):
    # the quick selection leaves it out unless asked for, --full includes it unless told not to
    compile_refs = args.compile if args.compile is not None else (args.full or device.type == "cuda")
    env.update({"dtype": str(dtype).replace("torch.", ""), "size": args.size, "selection": selection,
                "compile": compile_refs,
                "reps": args.reps, "warmup": args.warmup})
    print(f"kdops bench on {env['device']}, {env['dtype']}, size={args.size}, {selection} selection"
          f"{'' if args.full else ' (--full for every case)'}, torch.compile "
          f"{'included' if compile_refs else 'left out (--compile to include it)'}; ops: {', '.join(ops)}",
          file=sys.stderr)
    title = f"kdops bench ({env['dtype']}, {args.size}, {selection})"
    out_md, out_json, out_png = args.markdown, args.json, args.plot
    if args.out:
        folder = os.path.join(args.out, device_slug(device))
        os.makedirs(folder, exist_ok=True)
        # a full run is what benchmarks/results/ commits; a quick run never overwrites it
        stem = os.path.join(folder, f"bench_{env['dtype']}_{args.size}{'' if args.full else '_quick'}")
        out_md, out_json, out_png = out_md or stem + ".md", out_json or stem + ".json", out_png or stem + ".png"

    def save(rows):  # after every case: a run cut short (a time limit) keeps what it measured
        if out_md:
            with open(out_md, "w") as f:
                f.write(markdown(rows, env, title))
        if out_json:
            write_json(out_json, rows, env)

    rows = []
    all_cases = [(op, c) for op in ops for c in cases_for(op, device, dtype, args.size, full=args.full,
                                                          compile=compile_refs)]
    for i, (op, case) in enumerate(all_cases, 1):
        print(f"[{i}/{len(all_cases)}] {op}: {case.label}", file=sys.stderr, flush=True)
        for r in time_case(case, device, args.reps, args.warmup, default_progress):
            rows.append(r.as_dict())
        save(rows)
    if not all_cases:
        save(rows)
    print(markdown(rows, env, title))
    out_roof = None
    if out_png:
        try:
            out_png, out_roof = _charts(out_png, rows, env, title)
        except ImportError:
            print("kdops bench: --plot needs matplotlib (pip install matplotlib); the JSON can be plotted "
                  "later, elsewhere, with `kdops plot <json>`", file=sys.stderr)
            out_png = None
    for what, p in (("table", out_md), ("data ", out_json), ("chart", out_png), ("roof chart", out_roof)):
        if p:
            print(f"{what}: {p}", file=sys.stderr)
    bad = [r for r in rows if r["match"].startswith("MISMATCH") and r["impl"] in ("kdops", "eager")]
    if bad:
        print(f"kdops bench: {len(bad)} result(s) of kdops or eager do not match (see the check column)",
              file=sys.stderr)
    print(f"kdops bench: {len(all_cases)} case(s) in {_duration(time.perf_counter() - started)}; {summary(rows)}",
          file=sys.stderr)
    return 1 if bad else 0


def _charts(out_png: str, rows, env, title: str):
    """The speed-up chart at ``out_png`` and, where the cases have roofs, the time-against-roof chart next
    to it (``*_roof.png``); returns the paths written (None for a chart with nothing to draw)."""
    from kdops.bench.report import plot, plot_roof

    written = []
    for fn, path in ((plot, out_png), (plot_roof, os.path.splitext(out_png)[0] + "_roof.png")):
        try:
            fn(path, rows, env, title)
            written.append(path)
        except ValueError as e:  # nothing timed (every implementation failed), or no roofs
            print(f"kdops: no chart {path}: {e}", file=sys.stderr)
            written.append(None)
    return tuple(written)


def _plot(args) -> int:
    import json

    with open(args.json) as f:
        data = json.load(f)
    env, rows = data["environment"], data["rows"]
    out = args.out or os.path.splitext(args.json)[0] + ".png"
    try:
        sel = f", {env['selection']}" if env.get("selection") else ""
        written = _charts(out, rows, env, f"kdops bench ({env.get('dtype', '?')}, {env.get('size', '?')}{sel})")
    except ImportError:
        print("kdops plot: needs matplotlib (pip install matplotlib)", file=sys.stderr)
        return 2
    for p in written:
        if p:
            print(f"wrote {p}", file=sys.stderr)
    return 0 if any(written) else 1


def _bench_ops() -> List[str]:
    from kdops.bench import available_ops

    return available_ops()


def _bench_parser(sub) -> None:
    from kdops.bench.problems import SIZES

    ops = _bench_ops()
    epilog = "\n".join([
        "ops (one bench entry per op, same name):",
        *_wrap(", ".join(ops)),
        "",
        "sizes (--size):",
        *[line for name, text in SIZES.items() for line in _wrap(f"{name}: {text}")],
        "",
        "selection (--full):",
        *_wrap("default: " + QUICK + "; --full: every case (the K and R sweeps, both box_ranges rules, the "
               "MSDA encoder and batch 8 on CUDA, nms_mask at HEAD's toy scale)"),
        "",
        f"output: the table is printed; with --out DIR (default: {DEFAULT_OUT}/, untracked) the table, JSON and",
        "chart go to DIR/<device>/bench_<dtype>_<size>[_quick].{md,json,png}. `--full --out benchmarks/results`",
        "writes the committed results. KDOPS_BENCH_NO_COMPILE=1 skips torch.compile (slow to compile on few cores).",
        "Timings whose spread or internal consistency says the machine was disturbed are marked `!`.",
    ])
    b = sub.add_parser(
        "bench", help="speed, memory and exactness of each op vs eager and torch.compile",
        description="Checks that kdops, the eager reference, torch.compile(reference) and installed peers agree, "
                    "then times forward, backward and forward+backward with the implementations' repetitions "
                    "interleaved.",
        epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--efficacy", action="store_true",
                   help="the KD efficacy benchmark instead (benchmarks/efficacy.py: teacher + students with and "
                        "without KD on kdops.toy_data, mmdet); the other arguments go to it, see "
                        "`kdops bench --efficacy --help`")
    b.add_argument("--ops", nargs="+", choices=ops, metavar="OP", help="bench entries (default: all; listed below)")
    b.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when a GPU is visible, else cpu")
    b.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="(default: %(default)s)")
    b.add_argument("--size", default="coco", choices=list(SIZES), help="problem size, described below (default: "
                   "%(default)s)")
    b.add_argument("--full", action="store_true", help="every case of every op (default: the quick selection "
                   "below)")
    c = b.add_mutually_exclusive_group()
    c.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="include torch.compile(reference) (default: with --full, or on CUDA; it costs 15-40 s of "
                        "compilation per case on 2 CPU cores)")
    c.add_argument("--no-compile", dest="compile", action="store_false", help="leave torch.compile out")
    b.add_argument("--reps", type=_positive, default=10, help="timed repetitions per measurement, at most: an "
                   "implementation slower than 0.4 s per run gets fewer, never under 5 (default: %(default)s)")
    b.add_argument("--warmup", type=_non_negative, default=2, help="untimed runs per implementation before timing; "
                   "the results of the last one are checked (default: %(default)s)")
    b.add_argument("--allocator", default="warm", choices=["warm", "system"],
                   help="CPU memory: 'warm' (default) keeps freed memory in glibc's heap, so after the warm-up no "
                        "implementation pays page faults (as on a GPU, whose caching allocator keeps blocks); "
                        "'system' keeps glibc's defaults, where a fresh large gradient pays ~1 us per 4 KiB page "
                        "(the table's header gives the measured cost)")
    b.add_argument("--threads", type=_positive, help="CPU threads (torch.set_num_threads; default: torch's, "
                   "all cores). 1 gives steadier timings on a busy machine")
    b.add_argument("--out", default=DEFAULT_OUT, help="results folder (default: %(default)s, untracked): writes "
                   "<out>/<device>/bench_<dtype>_<size>[_quick].{md,json,png}; '' writes nothing")
    b.add_argument("--json", help="also write rows + environment as JSON here")
    b.add_argument("--plot", help="also write the PNG chart here")
    b.add_argument("--markdown", help="also write the markdown table here")


def _wrap(text: str, width: int = 100) -> List[str]:
    import textwrap

    return textwrap.wrap(text, width, initial_indent="  ", subsequent_indent="    ")


def _int_at_least(low: int):
    """An argparse type: an integer >= low, with an error naming what was expected."""
    want = "a positive integer" if low == 1 else f"an integer >= {low}"

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {want}, got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"must be {want}, got {text!r}")
        return v

    return parse


_positive, _non_negative = _int_at_least(1), _int_at_least(0)


def _efficacy(rest: List[str]) -> int:
    """`kdops bench --efficacy [ARGS]`: benchmarks/efficacy.py of the source tree, its own arguments."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "efficacy.py")
    if not os.path.isfile(path):
        print(f"kdops bench --efficacy: needs the source tree (no {path}); run benchmarks/efficacy.py there",
              file=sys.stderr)
        return 2
    spec = importlib.util.spec_from_file_location("kdops_efficacy_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(rest)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"] and "--efficacy" in argv[1:]:
        rest = argv[1:]
        rest.remove("--efficacy")
        return _efficacy(rest)
    p = argparse.ArgumentParser(prog="kdops", description="kdops: fused kernels for detection KD")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions, devices and the backend each op uses")
    _bench_parser(sub)
    pl = sub.add_parser("plot", help="the PNG chart of a `kdops bench` JSON (e.g. one from a machine "
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
