"""Feature-map teacher caches: the :mod:`kdops.cache` store serving ``kdops.DistillDetector``'s feature
losses (FitNet, PKD, FGD, DeFeat, ...) offline, as it serves UniKD's query embeddings.

``python -m kdops_mmdet.cache_teacher CONFIG --out DIR`` on a ``kdops.DistillDetector`` config runs its
teacher once over the training set (its own pipeline) and writes, per image and augmentation, every
teacher tap its feature entries read (``neck``: all FPN levels; ``backbone.layer3``: one map), cut to the
image's own region at each level (``ceil(img_shape / stride)``), in float16, plus ``features.json``
(each tap's levels: channels and stride, and the fingerprint). Training with the same config plus
``model.teacher_cache=DIR`` and ``kdops.CachedFlip`` in place of ``RandomFlip`` never builds the teacher:
each step places the cached maps into zeros of the batch's padded size. On a batch whose images all
fill it (the toy set; fixed-size crops) that is the online teacher's output exactly; where padding
is added, the online teacher's features over the padding (convolutions of zeros near the image) are
zeros offline.

``--foreground`` writes only the feature rows whose pixel centre lies in a GT box, with their flat
indices: the storage comparison of UniKD's Table 4 (full vs foreground features vs query embeddings).
Such a cache cannot train the feature losses (they read the background too) and is refused there.
"""
from __future__ import annotations

import hashlib
import json
import math
import os.path as osp
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

FEATURE_META = "features.json"
_OWNER = "kdops.DistillDetector"


def tap_key(tap: str) -> str:
    """The recorded key of a tap (its path, ``()`` for a method), without an index suffix."""
    from .taps import parse_tap

    path, is_call, _ = parse_tap(tap)
    return path + ("()" if is_call else "")


def _levels(value) -> Tuple[List[torch.Tensor], bool]:
    if isinstance(value, torch.Tensor):
        return [value], False
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) and v.dim() == 4 for v in value):
        return list(value), True
    raise ValueError(f"{_OWNER}: a cached teacher tap must record a (N,C,H,W) map or a list of them, got "
                     f"{type(value).__name__}")


def tap_layout(value, input_hw: Sequence[int]) -> dict:
    """What ``features.json`` keeps of one tap: per level its channels and stride (input / map size,
    rounded to a power of two)."""
    feats, seq = _levels(value)
    H = int(input_hw[0])
    levels = []
    for f in feats:
        if f.dim() != 4 or f.shape[-2] == 0:
            raise ValueError(f"{_OWNER}: a cached teacher tap level must be a non-empty (N,C,H,W) map, got "
                             f"{tuple(f.shape)}")
        # a power of two: P6 of an 800-px input has 13 rows (800 / 13 = 61.5), its stride is 64
        levels.append(dict(channels=int(f.shape[1]), stride=float(2 ** round(math.log2(H / int(f.shape[-2]))))))
    return dict(seq=seq, levels=levels)


def region(img_hw: Sequence[int], stride: float, map_hw: Sequence[int]) -> Tuple[int, int]:
    """The rows and columns of a level that cover an image of ``img_hw`` pixels (its own region of
    the padded batch), never more than the map has."""
    return (min(int(map_hw[0]), math.ceil(int(img_hw[0]) / stride - 1e-6)),
            min(int(map_hw[1]), math.ceil(int(img_hw[1]) / stride - 1e-6)))


def foreground_index(boxes, h: int, w: int, stride: float) -> torch.Tensor:
    """Flat indices (row-major in an (h, w) map) of the pixels whose centre ``((x + 0.5) s, (y + 0.5) s)``
    lies in at least one of the (M,4) x1,y1,x2,y2 ``boxes`` (borders included)."""
    b = getattr(boxes, "tensor", boxes)
    b = torch.as_tensor(b, dtype=torch.float32).reshape(-1, 4).cpu()
    if b.shape[0] == 0 or h == 0 or w == 0:
        return torch.zeros(0, dtype=torch.long)
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) * stride
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) * stride
    inside = ((xs.view(1, 1, w) >= b[:, 0].view(-1, 1, 1)) & (xs.view(1, 1, w) <= b[:, 2].view(-1, 1, 1))
              & (ys.view(1, h, 1) >= b[:, 1].view(-1, 1, 1)) & (ys.view(1, h, 1) <= b[:, 3].view(-1, 1, 1)))
    return inside.any(0).reshape(-1).nonzero().squeeze(1)


def image_entries(records: Dict[str, Any], layout: Dict[str, dict], img_hws: Sequence[Sequence[int]],
                  gt_boxes: Optional[Sequence[torch.Tensor]] = None) -> List[Dict[str, torch.Tensor]]:
    """Per image of the batch, the tensors to cache: ``"<tap>#<level>"`` -> (C,h,w) maps cut to the
    image's region; with ``gt_boxes`` (foreground only) ``"<tap>#<level>.idx"`` (K,) int32 flat
    indices into the (h,w) region and ``"<tap>#<level>.val"`` (K,C) rows."""
    out: List[Dict[str, torch.Tensor]] = [dict() for _ in img_hws]
    for key, value in records.items():
        feats, _ = _levels(value)
        for lvl, (f, spec) in enumerate(zip(feats, layout[key]["levels"])):
            for n, hw in enumerate(img_hws):
                h, w = region(hw, spec["stride"], f.shape[-2:])
                m = f[n, :, :h, :w]
                name = f"{key}#{lvl}"
                if gt_boxes is None:
                    out[n][name] = m.contiguous()
                    continue
                idx = foreground_index(gt_boxes[n], h, w, spec["stride"]).to(f.device)
                out[n][name + ".idx"] = idx.to(torch.int32)
                out[n][name + ".val"] = m.reshape(m.shape[0], -1)[:, idx].t().contiguous()
    return out


def batch_records(per_image: Sequence[Dict[str, torch.Tensor]], layout: Dict[str, dict], batch_hw: Sequence[int],
                  like: torch.Tensor) -> Dict[str, Any]:
    """The teacher taps' values for a batch, from the cached per-image maps placed into zeros of the
    batch's padded size (the inverse of :func:`image_entries` without ``gt_boxes``)."""
    out: Dict[str, Any] = {}
    N = len(per_image)
    for key, spec in layout.items():
        feats = []
        for lvl, ls in enumerate(spec["levels"]):
            H = math.ceil(int(batch_hw[0]) / ls["stride"] - 1e-6)
            W = math.ceil(int(batch_hw[1]) / ls["stride"] - 1e-6)
            f = like.new_zeros((N, ls["channels"], H, W))
            for n, entry in enumerate(per_image):
                m = entry[f"{key}#{lvl}"]
                h, w = min(m.shape[-2], H), min(m.shape[-1], W)
                f[n, :, :h, :w] = m[:, :h, :w].to(device=like.device, dtype=like.dtype)
            feats.append(f)
        out[key] = feats if spec["seq"] else feats[0]
    return out


class CachedTaps:
    """A stand-in for the teacher's :class:`~kdops_mmdet.taps.TapSet` in offline mode: ``get(tap)``
    answers from the values :meth:`fill` gave for the step."""

    role = "teacher"

    def __init__(self, keys: Sequence[str]) -> None:
        self.keys = list(keys)
        self.paths = {k: (k.rstrip("()"), k.endswith("()")) for k in self.keys}
        self._values: Dict[str, Any] = {}

    def start(self) -> None:
        self._values = {}

    def stop(self) -> None:
        self._values = {}

    def fill(self, values: Dict[str, Any]) -> None:
        self._values = dict(values)

    def get(self, tap: str) -> Any:
        from .taps import parse_tap, select

        _, _, idx = parse_tap(tap)
        key = tap_key(tap)
        if key not in self._values:
            raise RuntimeError(f"{_OWNER}: the teacher cache holds no tap {key!r} (it holds {sorted(self._values)}): "
                               f"re-make it with this config (python -m kdops_mmdet.cache_teacher)")
        return select(self._values[key], idx, tap)

    def remove(self) -> None:
        pass


def feature_fingerprint(teacher_cfg, teacher_ckpt: Optional[str], taps: Sequence[str]) -> str:
    """A hash of what the cached maps depend on: the teacher's config and weights, and the taps."""
    from .distiller import model_config
    from .unikd import _file_digest

    cfg = model_config(teacher_cfg, "model.teacher_cfg")
    doc = dict(teacher=cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg),
               teacher_weights=_file_digest(teacher_ckpt), taps=sorted(set(taps)), kind="features")
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:32]


def read_meta(root: str) -> dict:
    path = osp.join(str(root), FEATURE_META)
    if not osp.isfile(path):
        raise FileNotFoundError(f"{_OWNER}: teacher_cache={root!r} holds no {FEATURE_META}: make it with "
                                f"`python -m kdops_mmdet.cache_teacher CONFIG --out {root}` (CONFIG: this "
                                f"kdops.DistillDetector config, online)")
    with open(path) as f:
        return json.load(f)
