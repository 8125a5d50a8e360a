"""End-to-end cost of distillation in a real mmdet training step (issue 15's step benchmark).

For a model pair (a kdops_mmdet distillation config), each in its own process (so the peak
resident memory of one variant does not hide another's):

- ``student``      the student alone: ``train_step`` (forward, losses, backward, SGD step);
- ``teacher_fwd``  the teacher's forward alone, under no_grad (what distillation must pay anyway);
- ``kd``           the DistillDetector step with kdops' kernels: student + teacher + taps + KD losses;
- ``kd_eager``     the same step with every kdops op replaced by its eager PyTorch reference
                   (``KDOPS_BACKEND=reference``): what the losses cost written as authors write them.

- ``kd_noloss``    (on request) the ``kd`` step with the loss entries returning nothing: student,
                   teacher forward and taps in one step, no KD loss: ``kd - kd_noloss`` is what the
                   losses and connectors cost, ``kd_noloss - student - teacher_fwd`` what running the
                   two networks in one step costs.
- ``kd_parts``     the ``kd`` step with its distillation parts timed inside it: the loss entries'
                   forward (tap reads, connectors, kdops losses; wall clock around each entry) and
                   their backward (``autograd.grad`` of the KD terms down to the tapped student
                   tensors and the connectors' weights, the gradient work the KD terms add).

The KD overhead is those parts: the target (issue 15) is that with kdops they add at most 5% to
the step beyond the teacher's forward, i.e. ``(fwd + bwd) / (student + teacher_fwd) <= 5%``. The
subtraction ``kd - student - teacher_fwd`` is shown too; it carries three steps' noise.

    python benchmarks/kd_step.py                      # toy pair (128x128, batch 16) and COCO pair
    python benchmarks/kd_step.py --pairs toy --reps 10
    python benchmarks/kd_step.py --out benchmarks/results/cpu-2core   # committed results (this machine's folder)

Pairs: ``toy`` = integrations/mmdet/configs/pkd/pkd_retinanet_toy.py (RetinaNet R18-style, FPN 32
student / FPN 64 teacher) at 16x3x128x128; ``coco`` = pkd_retinanet_x101_retinanet_r50_2x_coco.py
(RetinaNet X101-64x4d teacher -> R50 student, PKD weight 10 on P3-P6) at 2x3x800x1216; ``head_toy``
= head/head_faster_rcnn_retinanet_toy.py (HEAD: toy Faster R-CNN teacher -> the toy RetinaNet student)
at 16x3x128x128, whose ``kd_parts`` times HEAD's parts against the student's own step (issue 17's
target: at most 25%); ``head_coco`` = the COCO HEAD config (Faster R-CNN R50 -> RetinaNet R18) at
2x3x800x1216. Weights are
random (no checkpoint download): the cost of a step does not depend on them, once subnormal floats
are flushed to zero (the workers do: random weights underflow into them on some steps). Times are medians of
``--reps`` steps after ``--warmup``; the CPU figures come from a shared 2-core VM (noisy: compare
rows of one run).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "integrations", "mmdet", "configs")
PAIRS = {
    "toy": (os.path.join(CONFIGS, "pkd", "pkd_retinanet_toy.py"), 16, (128, 128)),
    "coco": (os.path.join(CONFIGS, "pkd", "pkd_retinanet_x101_retinanet_r50_2x_coco.py"), 2, (800, 1216)),
    "head_toy": (os.path.join(CONFIGS, "head", "head_faster_rcnn_retinanet_toy.py"), 16, (128, 128)),
    "head_coco": (os.path.join(CONFIGS, "head", "head_faster_rcnn_r50_retinanet_r18_1x_coco.py"), 2, (800, 1216)),
}
#: pairs whose distillation is a whole method (HEAD), timed against the student's own step
_HEAD = ("HEAD parts timed in the step: proposals, sampling, assistant R-CNN + GT loss, teacher R-CNN on the RoIs, "
         "AKD, CKD", 25.0)
METHOD_PAIRS = {"head_toy": _HEAD, "head_coco": _HEAD}
VARIANTS = ("student", "teacher_fwd", "kd", "kd_eager", "kd_parts")
#: on request only: the kd step with every loss entry returning nothing (teacher forward and taps, no losses);
#: for HEAD pairs, kd_parts with mmdet's SingleRoIExtractor (mmcv's RoIAlign) instead of kdops.FusedRoIExtractor,
#: and kd_parts with mmdet's assigner, sampler and bbox_loss (sync_free=False) instead of the fixed-shape path
EXTRA_VARIANTS = ("kd_noloss", "kd_parts_mmcv", "kd_parts_mmdet_sampler")


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _no_pretrained(cfg) -> None:
    """Drop every init_cfg that would download weights (timing does not depend on them)."""
    if isinstance(cfg, dict):
        if isinstance(cfg.get("init_cfg"), dict) and cfg["init_cfg"].get("type") == "Pretrained":
            cfg["init_cfg"] = None
        for v in cfg.values():
            _no_pretrained(v)
    elif isinstance(cfg, (list, tuple)):
        for v in cfg:
            _no_pretrained(v)


def worker(pair: str, variant: str, reps: int, warmup: int, threads: int) -> dict:
    import torch
    from mmengine.config import Config
    from mmengine.optim import OptimWrapper
    from mmdet.registry import MODELS
    from mmdet.testing import demo_mm_inputs
    from mmdet.utils import register_all_modules

    torch.set_num_threads(threads)
    # Subnormal floats: with random weights and a tiny learning rate, some steps' gradients underflow
    # into subnormals, which x86 cores compute ~100x slower (COCO student steps of 9 s took 40-50 s
    # on the Xeon VM, two steps in six). Flushed to zero in every variant, so the medians measure the
    # steady cost of the step, not the underflow.
    torch.set_flush_denormal(True)
    register_all_modules(init_default_scope=True)
    import kdops_mmdet  # noqa: F401  (registers kdops.DistillDetector)

    path, batch, (h, w) = PAIRS[pair]
    os.environ.setdefault("KDOPS_TOY_TEACHER_CKPT", "unused")
    cfg = Config.fromfile(path)
    model_cfg = cfg.model
    model_cfg.teacher_ckpt = None
    _no_pretrained(model_cfg)
    torch.manual_seed(0)
    if variant in ("kd_parts_mmcv", "kd_parts_mmdet_sampler"):
        if pair not in METHOD_PAIRS:
            raise ValueError(f"{variant} is for the HEAD pairs")
        if variant == "kd_parts_mmcv":
            model_cfg.fused_roi_align = False
        else:
            model_cfg.sync_free = False
    if variant.startswith("kd"):
        model = MODELS.build(model_cfg)
    else:
        from kdops_mmdet.distiller import model_config

        which = "student" if variant == "student" else "teacher_cfg"
        sub = model_config(model_cfg[which], f"model.{which}")
        _no_pretrained(sub)
        model = MODELS.build(sub)
    num_classes = 80 if pair == "coco" else 4
    data = demo_mm_inputs(batch_size=batch, image_shapes=[(3, h, w)] * batch, num_items=[5] * batch,
                          num_classes=num_classes)
    rss0 = _rss_mib()
    if variant == "teacher_fwd":
        model.eval()

        def step():
            with torch.no_grad():
                d = model.data_preprocessor(data, False)
                model.extract_feat(d["inputs"])
    elif variant in ("kd_parts", "kd_parts_mmcv", "kd_parts_mmdet_sampler"):
        model.train()
        optim = OptimWrapper(torch.optim.SGD(model.parameters(), lr=1e-5))
        parts = _instrument_head(model) if pair in METHOD_PAIRS else _instrument(model)

        def step():
            return parts.step(data, optim)
    else:
        if variant == "kd_noloss":
            from kdops_mmdet.distill_losses import LossEntry

            LossEntry.__call__ = lambda entry, *args: {}  # this worker process only
        model.train()
        optim = OptimWrapper(torch.optim.SGD(model.parameters(), lr=1e-5))

        def step():
            model.train_step(data, optim)
    times, fwd, bwd = [], [], []
    for i in range(warmup + reps):
        t0 = time.perf_counter()
        split = step()
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
            if split:
                fwd.append(split[0])
                bwd.append(split[1])
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    row = {"pair": pair, "variant": variant, "batch": batch, "image": [h, w], "median_ms": statistics.median(times),
           "min_ms": min(times), "iqr_ms": q[2] - q[0], "reps": reps, "threads": threads,
           "peak_rss_mib": _rss_mib(), "rss_after_build_mib": rss0, "backend": os.environ.get("KDOPS_BACKEND", "auto")}
    if fwd:
        row.update(kd_fwd_ms=statistics.median(fwd), kd_bwd_ms=statistics.median(bwd),
                   kd_parts_ms=statistics.median([a + b for a, b in zip(fwd, bwd)]))
    return row


class _instrument:
    """Times the distillation parts of a DistillDetector step inside the step (see the module doc)."""

    def __init__(self, model) -> None:
        import torch

        from kdops_mmdet.distill_losses import LossEntry

        self.model, self.fwd, self.inputs = model, 0.0, []
        call = LossEntry.__call__

        def timed(entry, student_taps, teacher_taps, conn, samples):
            t0 = time.perf_counter()
            out = call(entry, student_taps, teacher_taps, conn, samples)
            self.fwd += time.perf_counter() - t0
            # the student tensors this entry read: KD gradients reach the student through them
            self.inputs += [x for x in _flat(student_taps.get(entry.student_tap)) if x.requires_grad]
            return out

        LossEntry.__call__ = timed  # this worker process only (Python looks __call__ up on the class)
        self.params = [p for p in model.connectors.parameters()] + [p for p in model.distill_losses.parameters()]
        self.torch = torch

    def is_kd(self, key: str) -> bool:
        return key.startswith(tuple(f"loss_{e.name}" for e in self.model.entries))

    def step(self, data, optim):
        """One training step; returns (forward ms of the timed parts, backward ms of the KD terms)."""
        torch, model = self.torch, self.model
        self.fwd, self.inputs = 0.0, []
        d = model.data_preprocessor(data, True)
        losses = model.loss(d["inputs"], d["data_samples"])
        kd = sum(v for k, v in losses.items() if self.is_kd(k))
        targets = [x for x in self.inputs + self.params if x.requires_grad]
        t0 = time.perf_counter()
        torch.autograd.grad(kd, targets, retain_graph=True, allow_unused=True)
        bwd = time.perf_counter() - t0
        loss, _ = model.parse_losses(losses)
        optim.update_params(loss)
        return self.fwd * 1e3, bwd * 1e3


class _instrument_head(_instrument):
    """Times HEAD's parts inside a HEADDistillDetector step: the forward of ``distill_part`` (the
    proposals, the sampler, the assistant's R-CNN forward and GT loss, the teacher's R-CNN on the
    sampled RoIs, AKD and CKD, with all their bookkeeping; wall clock around it), and the backward of the HEAD terms (loss_akd, loss_ckd and the
    assistant's losses) down to the student tensors they read (FPN levels, last cls conv) and the
    assistant's and adapters' weights. Reaching the FPN levels also walks CKD's gradient back through
    the student's cls conv tower, which the real step shares with the student's own backward: an
    upper bound."""

    def __init__(self, model) -> None:
        import torch

        self.model, self.fwd, self.inputs, self.torch = model, 0.0, [], torch

        def timed(fn):
            def wrapper(*a, **k):
                t0 = time.perf_counter()
                out = fn(*a, **k)
                self.fwd += time.perf_counter() - t0
                return out
            return wrapper

        model.distill_part = timed(model.distill_part)
        model.student.neck.register_forward_hook(
            lambda m, i, o: self.inputs.extend(t for t in o if t.requires_grad))
        model.student.bbox_head.cls_convs[-1].register_forward_hook(
            lambda m, i, o: self.inputs.append(o) if o.requires_grad else None)
        self.params = [p for mod in (model.assistant, model.akd, model.ckd) for p in mod.parameters()]

    def is_kd(self, key: str) -> bool:
        return key in ("loss_akd", "loss_ckd") or key.startswith("loss_assist_")


def _flat(x):
    import torch

    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _flat(v)]
    return []


def run(pair: str, variant: str, args) -> dict:
    env = dict(os.environ)
    if variant == "kd_eager":
        env["KDOPS_BACKEND"] = "reference"
    else:
        env.pop("KDOPS_BACKEND", None)
    env["PYTHONWARNINGS"] = "ignore"
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", pair, variant, "--reps", str(args.reps),
           "--warmup", str(args.warmup), "--threads", str(args.threads)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    line = [l for l in out.stdout.splitlines() if l.startswith("{")]
    if out.returncode != 0 or not line:
        raise RuntimeError(f"kd_step worker {pair}/{variant} failed:\n{out.stderr[-3000:]}")
    return json.loads(line[-1])


def table(rows) -> str:
    by = {(r["pair"], r["variant"]): r for r in rows}
    out = ["| pair | step | median ms (IQR) | peak RSS MiB |", "|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['pair']} | {r['variant']} | {r['median_ms']:.1f} ({r['iqr_ms']:.1f}) | {r['peak_rss_mib']:.0f} |")
    full = [p for p in dict.fromkeys(r["pair"] for r in rows) if all((p, v) in by for v in VARIANTS[:4])]
    if full:
        out += ["", "| pair | by subtraction, kd - student - teacher_fwd: kdops | eager losses | "
                    "kdops / kd step | eager / kd_eager step |", "|---|---|---|---|---|"]
    for pair in full:
        s, t, k, e = (by[(pair, v)]["median_ms"] for v in VARIANTS[:4])
        ok, oe = k - s - t, e - s - t
        out.append(f"| {pair} | {ok:.1f} ms | {oe:.1f} ms | {100 * ok / k:.1f}% | {100 * oe / e:.1f}% |")
    split = [p for p in dict.fromkeys(r["pair"] for r in rows)
             if all((p, v) in by for v in ("student", "teacher_fwd", "kd", "kd_noloss"))]
    if split:
        out += ["", "| pair | kd - kd_noloss: losses + connectors | kd_noloss - student - teacher_fwd: two networks "
                    "in one step (taps, no loss) |", "|---|---|---|"]
        for pair in split:
            s_, t_, k_, n_ = (by[(pair, v)]["median_ms"] for v in ("student", "teacher_fwd", "kd", "kd_noloss"))
            out.append(f"| {pair} | {k_ - n_:.1f} ms | {n_ - s_ - t_:.1f} ms |")
    pairs = [p for p in dict.fromkeys(r["pair"] for r in rows) if (p, "kd_parts") in by]
    for pair in [p for p in pairs if p in METHOD_PAIRS]:
        what, target = METHOD_PAIRS[pair]
        base = by[(pair, "student")]["median_ms"] if (pair, "student") in by else None
        out += ["", f"| pair | {what}: forward | backward | total | share of the student's own step "
                    f"(target <= {target:g}%) |", "|---|---|---|---|---|"]
        for variant, name in (("kd_parts", pair), ("kd_parts_mmcv", f"{pair} (mmdet's RoI extractor)"),
                              ("kd_parts_mmdet_sampler", f"{pair} (mmdet's assigner, sampler and bbox_loss)")):
            if (pair, variant) not in by:
                continue
            r = by[(pair, variant)]
            share = f"{100 * r['kd_parts_ms'] / base:.1f}%" if base else "n/a (student not run)"
            out.append(f"| {name} | {r['kd_fwd_ms']:.2f} ms | {r['kd_bwd_ms']:.2f} ms | {r['kd_parts_ms']:.2f} ms | "
                       f"{share} |")
    timed = [(p, by[(p, "kd_parts")]) for p in pairs if p not in METHOD_PAIRS]
    if timed:
        out += ["", "| pair | KD parts timed in the step: forward (taps, connectors, losses) | backward | total | "
                    "share of student + teacher forward (target <= 5%) |", "|---|---|---|---|---|"]
        for pair, r in timed:
            base = sum(by[(pair, v)]["median_ms"] for v in ("student", "teacher_fwd") if (pair, v) in by)
            share = f"{100 * r['kd_parts_ms'] / base:.2f}%" if base else "n/a (student/teacher_fwd not run)"
            out.append(f"| {pair} | {r['kd_fwd_ms']:.2f} ms | {r['kd_bwd_ms']:.2f} ms | {r['kd_parts_ms']:.2f} ms | "
                       f"{share} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", nargs="+", default=["toy", "coco"], choices=sorted(PAIRS))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS + EXTRA_VARIANTS)
    p.add_argument("--reps", type=int, default=5, help="timed steps per variant (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    p.add_argument("--out", default=None, help="folder for NAME.md / NAME.json (default: print only)")
    p.add_argument("--name", default="kd_step", help="file name of the results (default: %(default)s)")
    p.add_argument("--worker", nargs=2, metavar=("PAIR", "VARIANT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.reps, args.warmup, args.threads)))
        return 0
    rows = []
    for pair in args.pairs:
        for variant in args.variants:
            print(f"kd_step: {pair} / {variant} ...", flush=True)
            rows.append(run(pair, variant, args))
            print(f"  {rows[-1]['median_ms']:.1f} ms", flush=True)
    md = table(rows)
    print(md)
    if args.out:
        import torch

        from kdops.bench.report import cpu_model

        os.makedirs(args.out, exist_ok=True)
        env = {"torch": torch.__version__, "cpu": cpu_model(),
               "threads": args.threads, "date": time.strftime("%Y-%m-%d")}
        with open(os.path.join(args.out, args.name + ".md"), "w") as f:
            f.write(f"# KD step cost ({env['date']}, torch {env['torch']}, {args.threads} threads)\n\n{md}\n")
        with open(os.path.join(args.out, args.name + ".json"), "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
