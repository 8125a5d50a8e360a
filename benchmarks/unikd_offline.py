"""UniKD stage 2 online vs offline (issue 18's step target): training from the teacher cache must cost
at most the online step minus the teacher's side (its forward, the AKEs' query generators and
extractors on its maps, the Hungarian positives) plus 10%.

On kdops.toy_data (128x128 images) with the toy pair configs/unikd/unikd_inject_retinanet_toy.py
(RetinaNet teacher FPN 64 -> RetinaNet student FPN 32, 50 + 50 queries), random weights (a step's cost
does not depend on them), the cache written by kdops_mmdet.cache_teacher (fp16). In one process, on the
same batches (CachedFlip), with the repetitions of the three variants interleaved:

- ``online``        UniKDDistillDetector.loss + backward, teacher built;
- ``teacher_side``  the teacher's forward + ``teacher_knowledge`` alone (no grad);
- ``offline``       the same step with ``teacher_cache``: the teacher side read from the cache.

    python benchmarks/unikd_offline.py [--reps 20] [--batch 16] [--out benchmarks/results/cpu-2core]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "integrations", "mmdet"))
CONFIGS = os.path.join(ROOT, "integrations", "mmdet", "configs")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="write unikd_offline.{md,json} here")
    args = ap.parse_args(argv)
    os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    import torch
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmengine.runner import Runner
    from mmdet.utils import register_all_modules

    import kdops_mmdet  # noqa: F401
    from kdops.bench.report import cpu_model
    from kdops.toy_data import generate
    from kdops_mmdet.cache_teacher import cache_teacher
    from kdops_mmdet.registry import MODELS

    if args.threads:
        torch.set_num_threads(args.threads)
    register_all_modules(init_default_scope=False)
    init_default_scope("mmdet")
    tmp = tempfile.mkdtemp(prefix="kdops_unikd_bench_")
    data = generate(os.path.join(tmp, "data"), num_train=args.images, num_val=8, image_size=128, seed=0)
    os.environ["KDOPS_TOY_DATA"] = data["root"]
    torch.manual_seed(0)
    teacher = MODELS.build(Config.fromfile(os.path.join(CONFIGS, "_base_", "retinanet_r18_toy_teacher.py")).model)
    teacher.init_weights()
    torch.save({"state_dict": teacher.state_dict()}, os.path.join(tmp, "teacher.pth"))
    os.environ["KDOPS_TOY_TEACHER_CKPT"] = os.path.join(tmp, "teacher.pth")
    absorb = Config.fromfile(os.path.join(CONFIGS, "unikd", "unikd_absorb_retinanet_toy.py"))
    torch.save({"state_dict": MODELS.build(absorb.model).state_dict()}, os.path.join(tmp, "ake.pth"))
    os.environ["KDOPS_TOY_UNIKD_AKE_CKPT"] = os.path.join(tmp, "ake.pth")
    online_cfg = os.path.join(CONFIGS, "unikd", "unikd_inject_retinanet_toy.py")
    cache_dir = os.path.join(tmp, "cache")
    t0 = time.perf_counter()
    summary = cache_teacher(online_cfg, cache_dir, epochs=1, cfg_options=["train_dataloader.num_workers=0"])
    cache_s = time.perf_counter() - t0
    os.environ["KDOPS_TOY_UNIKD_CACHE"] = cache_dir
    off_cfg = Config.fromfile(os.path.join(CONFIGS, "unikd", "unikd_inject_retinanet_offline_toy.py"))
    torch.manual_seed(0)
    online = MODELS.build(Config.fromfile(online_cfg).model)
    offline = MODELS.build(off_cfg.model)
    offline.student.load_state_dict(online.student.state_dict())
    offline.adaptor.load_state_dict(online.adaptor.state_dict())
    online.train()
    offline.train()
    loader_cfg = dict(off_cfg.train_dataloader)
    loader_cfg.update(batch_size=args.batch, num_workers=0, persistent_workers=False)
    batches = []
    for i, d in enumerate(Runner.build_dataloader(loader_cfg, seed=0)):
        batches.append(offline.data_preprocessor(d, training=True))
        if len(batches) == 4:
            break

    def step(model, b):
        losses = model.loss(b["inputs"], b["data_samples"])
        sum(v for k, v in losses.items() if "loss" in k and torch.is_tensor(v)).backward()
        model.zero_grad(set_to_none=True)

    def teacher_side(b):
        with torch.no_grad():
            t_all = online.teacher.extract_feat(b["inputs"])
            online.teacher_knowledge([t_all[i] for i in online.teacher_levels], b["data_samples"])

    variants = {"online": lambda b: step(online, b), "teacher_side": teacher_side,
                "offline": lambda b: step(offline, b)}
    times = {k: [] for k in variants}
    for i in range(args.warmup + args.reps):
        b = batches[i % len(batches)]
        order = list(variants)[i % 3:] + list(variants)[:i % 3]  # interleaved, rotated
        for name in order:
            t = time.perf_counter()
            variants[name](b)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    iqr = {k: (statistics.quantiles(v, n=4)[2] - statistics.quantiles(v, n=4)[0]) * 1e3 for k, v in times.items()}
    bound = (med["online"] - med["teacher_side"]) * 1.1
    doc = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), host=f"{cpu_model()}, {os.cpu_count()} cores",
               torch=torch.__version__, threads=torch.get_num_threads(), batch=args.batch, reps=args.reps,
               median_ms=med, iqr_ms=iqr, bound_ms=bound, meets=med["offline"] <= bound,
               cache=dict(seconds=round(cache_s, 1), **{k: summary[k] for k in ("images", "entries")},
                          bytes_per_entry=summary["bytes_per_image"]["entry"]))
    lines = [
        "# UniKD stage 2: online vs offline (teacher cache) step",
        "",
        f"{doc['date']} · {doc['host']} · torch {doc['torch']} · {doc['threads']} threads · batch {args.batch} "
        f"x 3x128x128 · `python benchmarks/unikd_offline.py` · medians of {args.reps} interleaved repetitions "
        f"(IQR in brackets); forward + backward of `loss`, no optimiser step",
        "",
        "| variant | ms |",
        "|---|---:|",
    ] + [f"| {k} | {med[k]:.1f} ({iqr[k]:.1f}) |" for k in variants] + [
        "",
        f"Target (issue 18): offline <= (online - teacher_side) x 1.1 = {bound:.1f} ms: "
        f"**{'met' if doc['meets'] else 'missed'}** (offline {med['offline']:.1f} ms, "
        f"{med['offline'] / max(med['online'] - med['teacher_side'], 1e-9):.2f}x of online - teacher_side). "
        f"Cache: {summary['images']} images, {summary['entries']} entries of "
        f"{summary['bytes_per_image']['entry'] / 1024:.1f} KiB (fp16), written in {cache_s:.0f} s.",
        "",
    ]
    print("\n".join(lines))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "unikd_offline.md"), "w") as f:
            f.write("\n".join(lines))
        with open(os.path.join(args.out, "unikd_offline.json"), "w") as f:
            json.dump(doc, f, indent=1, default=str)
    return doc


if __name__ == "__main__":
    main()
