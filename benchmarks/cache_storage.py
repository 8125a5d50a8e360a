"""Teacher-cache storage per image: full FPN features vs foreground-only features vs UniKD's query
embeddings (the comparison of UniKD's Table 4), from a COCO-format annotation file alone.

    python benchmarks/cache_storage.py --ann data/kdops_toy/annotations/instances_train.json \\
        --resize fixed:128x128 --channels 64 --strides 8 16 32 64 --queries 50
    python benchmarks/cache_storage.py --ann coco/annotations/instances_train2017.json \\
        --resize keep:1333x800 --channels 256 --strides 8 16 32 64 128 --queries 200

Per image (fp16, 2 bytes a value), after the training resize:
- full: every level's map cut to the image, ``ceil(h / s) * ceil(w / s) * C * 2``, what
  ``python -m kdops_mmdet.cache_teacher`` stores for a feature-loss config;
- foreground: the rows whose pixel centre lies in a GT box, ``K * C * 2`` plus a 4-byte index each,
  what ``--foreground`` stores (:func:`kdops_mmdet.feature_cache.foreground_index`, the same rule);
- UniKD: Q content + Q positional queries: q and z (Q x C each, per kind), reference points (Q x 2)
  and boxes (Q x 4), two boolean masks (Q) -- independent of the image.
The tests check the first two against real caches of the toy set.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Dict, List, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "integrations", "mmdet"))


def resized(hw: Tuple[int, int], rule: str) -> Tuple[Tuple[int, int], float]:
    """(new h, new w) and the scale factor under 'fixed:WxH' or 'keep:LONGxSHORT' (mmdet's keep_ratio)."""
    kind, size = rule.split(":")
    a, b = (int(v) for v in size.lower().split("x"))
    h, w = hw
    if kind == "fixed":
        return (b, a), b / h
    if kind == "keep":
        scale = min(max(a, b) / max(h, w), min(a, b) / min(h, w))
        return (int(h * scale + 0.5), int(w * scale + 0.5)), scale
    raise ValueError(f"--resize must be fixed:WxH or keep:LONGxSHORT, got {rule!r}")


def unikd_entry_bytes(queries: int, channels: int, value_bytes: int = 2) -> int:
    q = queries
    return value_bytes * (2 * q * channels + q * 2 + 2 * q * channels + q * 4) + 2 * q


def storage(ann: dict, rule: str, channels: int, strides: Sequence[int], queries: int,
            value_bytes: int = 2) -> Dict[str, float]:
    import torch

    from kdops_mmdet.feature_cache import foreground_index

    boxes: Dict[int, List[List[float]]] = {}
    for a in ann["annotations"]:
        if not a.get("iscrowd", 0):
            x, y, w, h = a["bbox"]
            boxes.setdefault(a["image_id"], []).append([x, y, x + w, y + h])
    full = fg = 0.0
    for img in ann["images"]:
        (h, w), scale = resized((img["height"], img["width"]), rule)
        b = torch.tensor(boxes.get(img["id"], []), dtype=torch.float32).reshape(-1, 4)
        if rule.startswith("fixed"):
            b = b * torch.tensor([w / img["width"], h / img["height"]] * 2)
        else:
            b = b * scale
        for s in strides:
            hh, ww = math.ceil(h / s), math.ceil(w / s)
            full += hh * ww * channels * value_bytes
            fg += foreground_index(b, hh, ww, s).numel() * (channels * value_bytes + 4)
    n = max(len(ann["images"]), 1)
    return dict(images=len(ann["images"]), full=full / n, foreground=fg / n,
                unikd=unikd_entry_bytes(queries, channels, value_bytes))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ann", required=True, help="a COCO-format annotation file (boxes and image sizes)")
    ap.add_argument("--resize", default="fixed:128x128", help="fixed:WxH or keep:LONGxSHORT (default %(default)s)")
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--strides", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--queries", type=int, default=50, help="UniKD content (= positional) queries")
    args = ap.parse_args(argv)
    with open(args.ann) as f:
        res = storage(json.load(f), args.resize, args.channels, args.strides, args.queries)
    kb = lambda v: f"{v / 1024:.1f} KiB"  # noqa: E731
    print(json.dumps(res))
    print(f"| full features | foreground features | UniKD entry | full / UniKD | foreground / UniKD |")
    print(f"|---:|---:|---:|---:|---:|")
    print(f"| {kb(res['full'])} | {kb(res['foreground'])} | {kb(res['unikd'])} | {res['full'] / res['unikd']:.1f}x "
          f"| {res['foreground'] / res['unikd']:.1f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
