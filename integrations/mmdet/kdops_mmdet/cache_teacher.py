"""Write a teacher cache: ``python -m kdops_mmdet.cache_teacher CONFIG --out DIR [--epochs 2]``.

CONFIG is a ``kdops.DistillDetector`` config with feature losses (FitNet, PKD, FGD, ...: the teacher's
tapped maps are cached, see :mod:`kdops_mmdet.feature_cache`; ``--foreground`` keeps only the rows in
GT boxes, for the storage comparison) or a UniKD stage-2 config (below).

CONFIG is a UniKD stage-2 config (``kdops.UniKDDistillDetector``, online: its teacher, teacher_ckpt
and ake_ckpt). The teacher and the frozen AKEs run once over the training set, through the config's
own training pipeline, and per image and augmentation the stage-2 inputs on the teacher's side are
written (:data:`kdops_mmdet.unikd.KNOWLEDGE`: queries, reference points/boxes, z^T, positive masks;
floating tensors in float16) to a :mod:`kdops.cache` directory, with ``unikd.json`` (the teacher's
width, classes and levels, and the fingerprint). ``--epochs`` passes over the data record that many
random augmentations per image (2 covers both flips of most images; already-cached pairs are skipped).

Then train offline with the same config plus ``model.teacher_cache=DIR`` and ``kdops.CachedFlip``
in place of ``RandomFlip`` (see ``configs/unikd/*_offline_toy.py``): the teacher is never built.

Several processes: ``RANK=r WORLD_SIZE=w`` each write their share of the images (by file name)
into the same directory; run ``--merge`` once after all of them finished. A killed run continues
where it stopped when started again (sealed shards are kept, the open one is redone).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import os.path as osp
import zlib
from typing import Optional, Sequence


def _parse(argv):
    ap = argparse.ArgumentParser(prog="python -m kdops_mmdet.cache_teacher", description=__doc__.split("\n")[0])
    ap.add_argument("config", help="a kdops.DistillDetector config (feature losses) or a UniKD stage-2 config "
                                   "(kdops.UniKDDistillDetector)")
    ap.add_argument("--out", required=True, help="the cache directory")
    ap.add_argument("--epochs", type=int, default=2, help="passes over the training set (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the config's train batch size")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--foreground", action="store_true",
                    help="DistillDetector configs: keep only the feature rows inside GT boxes (storage comparison; "
                         "such a cache cannot train the feature losses)")
    ap.add_argument("--merge", action="store_true", help="only merge the ranks' indexes (after a multi-process run)")
    ap.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE")
    return ap.parse_args(argv)


def cache_teacher(config: str, out: str, epochs: int = 2, batch_size: Optional[int] = None, dtype: str = "float16",
                  seed: int = 0, cfg_options: Sequence[str] = (), foreground: bool = False) -> dict:
    """Runs the caching pass (see the module docstring); returns a summary (entries written, skipped,
    bytes per image)."""
    import numpy as np
    import torch
    from mmengine.config import Config, DictAction
    from mmengine.registry import init_default_scope
    from mmengine.runner import Runner
    from mmdet.utils import register_all_modules

    import kdops_mmdet  # noqa: F401
    from kdops.cache import TeacherCache, TeacherCacheWriter

    from .registry import MODELS
    from .unikd import META_FILE, augmentation_record, image_key

    os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # mmengine's own checkpoints
    register_all_modules(init_default_scope=False)
    init_default_scope("mmdet")
    cfg = Config.fromfile(config)
    if cfg_options:
        ns = argparse.Namespace()
        DictAction(option_strings=[], dest="o")(None, ns, list(cfg_options))
        cfg.merge_from_dict(ns.o)
    features = cfg.model.get("type") == "kdops.DistillDetector"
    if cfg.model.get("type") != "kdops.UniKDDistillDetector" and not features:
        raise ValueError(f"kdops_mmdet.cache_teacher: {config} is neither a kdops.DistillDetector config nor a UniKD "
                         f"stage-2 config (model.type is {cfg.model.get('type')!r})")
    if foreground and not features:
        raise ValueError("kdops_mmdet.cache_teacher: --foreground applies to kdops.DistillDetector configs")
    if cfg.model.get("teacher_cache"):
        raise ValueError("kdops_mmdet.cache_teacher: give the online config (model.teacher_cache must be unset)")
    if epochs < 1:
        raise ValueError(f"kdops_mmdet.cache_teacher: --epochs must be >= 1, got {epochs}")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    torch.manual_seed(seed + rank)
    model = MODELS.build(cfg.model)
    model.eval()
    fingerprint = model.fingerprint if not features else _feature_fingerprint(model, cfg)
    layout: dict = {}
    loader_cfg = dict(cfg.train_dataloader)
    loader_cfg.update(persistent_workers=False, **({"batch_size": batch_size} if batch_size else {}))
    loader_cfg["sampler"] = dict(type="DefaultSampler", shuffle=False)  # one pass per epoch (not InfiniteSampler)
    loader_cfg.pop("batch_sampler", None)
    written = skipped = 0
    with TeacherCacheWriter(out, fingerprint=fingerprint, rank=rank, world_size=world,
                            dtype=getattr(torch, dtype)) as writer:
        for epoch in range(epochs):
            # the pipeline's random flips draw from numpy's global generator (in the main process with
            # num_workers=0, else per worker from the loader's seed): a re-run draws the same ones
            np.random.seed(seed + 1009 * epoch + rank)
            random.seed(seed + 1009 * epoch + rank)
            loader = Runner.build_dataloader(loader_cfg, seed=seed + 1009 * epoch + rank)
            for data in loader:
                mine = [i for i, s in enumerate(data["data_samples"])
                        if zlib.crc32(image_key(s.metainfo).encode()) % world == rank]
                todo = [i for i in mine if not writer.done(image_key(data["data_samples"][i].metainfo),
                                                           augmentation_record(data["data_samples"][i].metainfo))]
                skipped += len(data["data_samples"]) - len(todo)
                if not todo:
                    continue
                batch = model.data_preprocessor(data, training=True)
                samples = batch["data_samples"]
                if features:
                    per_image = _feature_entries(model, batch, layout, foreground)
                else:
                    with torch.no_grad():
                        t_all = model.teacher.extract_feat(batch["inputs"])
                        know = model.teacher_knowledge([t_all[i] for i in model.teacher_levels], samples)
                    per_image = [{k: v[i] for k, v in know.items()} for i in range(len(samples))]
                for i in todo:
                    meta = samples[i].metainfo
                    key, aug = image_key(meta), augmentation_record(meta)
                    if writer.done(key, aug):  # the same image and flip twice in one batch
                        continue
                    writer.put(key, aug, per_image[i])
                    written += 1
    if rank == 0:
        from .feature_cache import FEATURE_META

        name = FEATURE_META if features else META_FILE
        side = (dict(kind="features", layout=layout, foreground=bool(foreground), fingerprint=fingerprint)
                if features else model.cache_meta())
        if features and not layout and osp.isfile(osp.join(out, name)):  # a re-run that wrote nothing
            with open(osp.join(out, name)) as f:
                layout.update(json.load(f).get("layout", {}))
            side["layout"] = layout
        if features and not layout:
            raise RuntimeError("kdops_mmdet.cache_teacher: no batch was cached, so the taps' layout is unknown: "
                               "run it once without a finished cache (or delete the directory)")
        with open(osp.join(out, name + ".tmp"), "w") as f:
            json.dump(side, f)
        os.replace(osp.join(out, name + ".tmp"), osp.join(out, name))
    summary = dict(written=written, skipped=skipped, rank=rank, world_size=world)
    if world == 1:
        cache = TeacherCache(out, fingerprint=fingerprint, verify="none")
        summary.update(images=len(cache), entries=cache.num_entries, bytes_per_image=cache.bytes_per_image())
    return summary


def _feature_fingerprint(model, cfg) -> str:
    from .feature_cache import feature_fingerprint, tap_key

    bad = [e.name for e in model.entries if e.kind != "feature"]
    if bad:
        raise ValueError(f"kdops_mmdet.cache_teacher: distill_losses {bad} read the teacher's head; a feature cache "
                         f"holds the feature taps only (remove them from the config to cache)")
    if not model.entries:
        raise ValueError("kdops_mmdet.cache_teacher: the config has no distill_losses: nothing to cache")
    return feature_fingerprint(cfg.model.teacher_cfg, cfg.model.get("teacher_ckpt"),
                               [tap_key(t) for e in model.entries for t in e.teacher_taps()])


def _feature_entries(model, batch, layout: dict, foreground: bool):
    """Per image of a preprocessed batch, the teacher taps' maps to cache (their layout recorded in
    ``layout`` on the first batch)."""
    import torch

    from .distiller import _tap_forward
    from .feature_cache import image_entries, tap_layout

    inputs, samples = batch["inputs"], batch["data_samples"]
    model.teacher_taps.start()
    try:
        with torch.no_grad():
            _tap_forward(model.teacher, model._paths(model.teacher_taps), inputs, samples)
        records = {key: model.teacher_taps.get(key) for key in model.teacher_taps.paths}
    finally:
        model.teacher_taps.stop()
    for key, value in records.items():
        spec = tap_layout(value, inputs.shape[-2:])
        if key in layout and layout[key] != spec:
            raise ValueError(f"kdops_mmdet.cache_teacher: tap {key!r} changed its layout between batches "
                             f"({layout[key]} vs {spec}): the strides must not depend on the input size")
        layout[key] = spec
    hws = [s.metainfo["img_shape"][:2] for s in samples]
    gts = [s.gt_instances.bboxes for s in samples] if foreground else None
    return image_entries(records, layout, hws, gts)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parse(argv)
    if args.merge:
        from kdops.cache import TeacherCacheWriter

        print(TeacherCacheWriter.merge_indexes(args.out, world_size=int(os.environ.get("WORLD_SIZE", 1)) or None))
        return 0
    summary = cache_teacher(args.config, args.out, args.epochs, args.batch_size, args.dtype, args.seed,
                            args.cfg_options, foreground=args.foreground)
    print(json.dumps(summary, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
