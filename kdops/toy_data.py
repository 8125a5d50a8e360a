r"""A small synthetic COCO-format detection set: coloured shapes on textured, noisy backgrounds.

Shared by the mmdetection and detectron2 plug-in tests, their ``*_toy.py`` configs and the
efficacy benchmark, so that a whole distillation run (teacher, student, evaluation) fits in
minutes on a CPU. Depends on numpy and the standard library only (PNGs are written with
zlib + struct).

Layout written by :func:`generate`::

    out_dir/train/000000.png ...          RGB, image_size x image_size
    out_dir/val/000000.png ...
    out_dir/annotations/instances_train.json
    out_dir/annotations/instances_val.json
    out_dir/manifest.json                 parameters + content hash (regeneration is skipped
                                          when they match)

Content of each image: a smooth random low-frequency colour field plus a faint random
grating, 1-5 (``min_objects``..``max_objects``) shapes of the classes :data:`CLASSES`
(``circle``, ``square``, ``triangle``, ``cross``; squares, triangles and crosses at random
angles), sizes 12-48 px at 128 px (scaled with ``image_size``), colours drawn independently
of the class, partial overlaps allowed (a shape never hides more than a third of an earlier
one), then Gaussian pixel noise over everything.

Annotations are COCO ``instances``: image ids from 1 (file ``{id-1:06d}.png``), category
ids from 1 in the order of :data:`CLASSES`, ``bbox = [x, y, w, h]`` the tight box (pixel
edges) of the shape's full rasterised mask (pixel centres inside the polygon; the mask lies
inside the image, so the box does too), ``area`` its pixel count, ``segmentation`` the
shape's polygon, ``iscrowd = 0``.

Every image is a pure function of ``(seed, split, index, image_size, min_objects,
max_objects)``: a numpy ``Generator`` seeded by ``SeedSequence(seed, spawn_key=(split,
index))``, so the sizes of the splits never change each other's images.

CLI: ``python -m kdops.toy_data OUT_DIR [--train N] [--val N] [--seed S] [--size PX]``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import struct
import sys
import zlib
from typing import Dict, List, Sequence, Tuple

import numpy as np

__all__ = ["CLASSES", "generate", "render_image", "write_png", "read_png", "main"]

CLASSES: Tuple[str, ...] = ("circle", "square", "triangle", "cross")

FORMAT_VERSION = 1  # bump whenever the images or the annotations of given parameters change
_SPLITS = {"train": 0, "val": 1}
_MIN_SIZE, _MAX_SIZE = 12.0 / 128.0, 48.0 / 128.0  # object diameter as a fraction of the image side
_MAX_HIDDEN = 1.0 / 3.0  # a new shape may cover at most this fraction of an earlier shape's pixels
_PLACEMENT_TRIES = 30
_NOISE_SIGMA = 7.0
_MIN_CONTRAST = 60.0  # mean |object colour - background under it| over RGB
_FILE_RE = re.compile(r"^\d{6}\.png$")


# --------------------------------------------------------------------------------------- PNG

def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(image: np.ndarray, level: int = 6) -> bytes:
    """PNG bytes of an (H,W,3) or (H,W) uint8 array (8-bit RGB or grey, no interlace, filter 0)."""
    img = np.ascontiguousarray(image)
    if img.dtype != np.uint8 or img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] != 3):
        raise ValueError(f"encode_png: `image` must be a uint8 (H,W,3) or (H,W) array, got {img.dtype} {img.shape}")
    h, w = img.shape[:2]
    colour_type = 2 if img.ndim == 3 else 0
    rows = img.reshape(h, -1)
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rows], axis=1).tobytes()  # filter byte 0 per row
    ihdr = struct.pack(">IIBBBBB", w, h, 8, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw, level)) + _chunk(b"IEND", b"")


def write_png(path: str, image: np.ndarray) -> None:
    """Writes an (H,W,3) or (H,W) uint8 array as a PNG file."""
    with open(path, "wb") as f:
        f.write(encode_png(image))


def _unfilter(data: bytes, h: int, stride: int, bpp: int) -> np.ndarray:
    out = np.zeros((h, stride), np.uint8)
    pos = 0
    prev = np.zeros(stride, np.int32)
    for y in range(h):
        ftype = data[pos]
        line = np.frombuffer(data, np.uint8, stride, pos + 1).astype(np.int32)
        pos += stride + 1
        if ftype == 0:
            cur = line
        elif ftype == 2:
            cur = (line + prev) & 0xFF
        elif ftype in (1, 3, 4):  # sequential in x: a short Python loop over the row
            cur = np.zeros(stride, np.int32)
            for x in range(stride):
                a = cur[x - bpp] if x >= bpp else 0
                b = prev[x]
                if ftype == 1:
                    p = a
                elif ftype == 3:
                    p = (a + b) >> 1
                else:
                    c = prev[x - bpp] if x >= bpp else 0
                    pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
                    p = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                cur[x] = (line[x] + p) & 0xFF
        else:
            raise ValueError(f"read_png: unknown PNG filter type {ftype} in row {y}")
        out[y] = cur
        prev = cur
    return out


def read_png(path: str) -> np.ndarray:
    """Decodes an 8-bit, non-interlaced grey / RGB / RGBA PNG to an (H,W[,C]) uint8 array (the
    files :func:`write_png` writes, and most others of those kinds)."""
    with open(path, "rb") as f:
        blob = f.read()
    if blob[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"read_png: {path!r} is not a PNG file")
    pos, idat, hdr = 8, [], None
    while pos < len(blob):
        (n,) = struct.unpack(">I", blob[pos:pos + 4])
        kind, data = blob[pos + 4:pos + 8], blob[pos + 8:pos + 8 + n]
        (crc,) = struct.unpack(">I", blob[pos + 8 + n:pos + 12 + n])
        if zlib.crc32(kind + data) & 0xFFFFFFFF != crc:
            raise ValueError(f"read_png: bad CRC in chunk {kind!r} of {path!r}")
        if kind == b"IHDR":
            hdr = struct.unpack(">IIBBBBB", data)
        elif kind == b"IDAT":
            idat.append(data)
        elif kind == b"IEND":
            break
        pos += 12 + n
    if hdr is None:
        raise ValueError(f"read_png: {path!r} has no IHDR chunk")
    w, h, depth, ctype, _, _, interlace = hdr
    channels = {0: 1, 2: 3, 6: 4}.get(ctype)
    if depth != 8 or channels is None or interlace:
        raise ValueError(f"read_png: only 8-bit non-interlaced grey/RGB/RGBA PNGs are supported, got "
                         f"depth={depth} colour_type={ctype} interlace={interlace}")
    rows = _unfilter(zlib.decompress(b"".join(idat)), h, w * channels, channels)
    return rows.reshape(h, w, channels) if channels > 1 else rows.reshape(h, w)


# ---------------------------------------------------------------------------------- drawing

def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(_SPLITS[split], index))))


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """(S,S,3) float: a bilinearly upsampled random 4x4..6x6 colour grid plus a faint grating."""
    g = int(rng.integers(4, 7))
    grid = rng.uniform(30.0, 225.0, size=(g, g, 3))
    pos = (np.arange(size) + 0.5) / size * (g - 1)  # pixel centres onto the grid
    i0 = np.clip(np.floor(pos).astype(int), 0, g - 2)
    f = pos - i0
    interp = np.zeros((size, g))
    interp[np.arange(size), i0] = 1.0 - f
    interp[np.arange(size), i0 + 1] += f
    bg = np.stack([interp @ grid[:, :, c] @ interp.T for c in range(3)], axis=-1)
    theta, period = rng.uniform(0.0, math.pi), rng.uniform(0.15, 0.5) * size
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    wave = np.sin(2 * math.pi * (xx * math.cos(theta) + yy * math.sin(theta)) / period + rng.uniform(0, 2 * math.pi))
    return bg + wave[..., None] * rng.uniform(5.0, 20.0, size=3)


def _polygon(rng: np.random.Generator, cls: str, cx: float, cy: float, radius: float) -> np.ndarray:
    """(V,2) vertices (x, y), counter-clockwise in image axes, inside the circle (cx, cy, radius)."""
    if cls == "circle":
        t = np.linspace(0.0, 2 * math.pi, 32, endpoint=False)
        pts = np.stack([np.cos(t), np.sin(t)], 1)
    elif cls == "square":
        t = math.pi / 4 + np.arange(4) * math.pi / 2
        pts = np.stack([np.cos(t), np.sin(t)], 1)
    elif cls == "triangle":
        t = -math.pi / 2 + np.arange(3) * 2 * math.pi / 3
        pts = np.stack([np.cos(t), np.sin(t)], 1)
    else:  # cross: arms of half-length a, half-thickness b = a/3, a^2 + b^2 = 1
        a = 1.0 / math.sqrt(1.0 + 1.0 / 9.0)
        b = a / 3.0
        pts = np.array([[b, -a], [b, -b], [a, -b], [a, b], [b, b], [b, a],
                        [-b, a], [-b, b], [-a, b], [-a, -b], [-b, -b], [-b, -a]])
    if cls != "circle":
        ang = rng.uniform(0.0, 2 * math.pi)
        c, s = math.cos(ang), math.sin(ang)
        pts = pts @ np.array([[c, s], [-s, c]])
    return pts * radius + np.array([cx, cy])


def _raster(poly: np.ndarray, size: int) -> np.ndarray:
    """(S,S) bool: pixel centres (x+0.5, y+0.5) inside the polygon (even-odd rule), computed on
    the polygon's bounding window only."""
    x0 = max(int(math.floor(poly[:, 0].min())) - 1, 0)
    x1 = min(int(math.ceil(poly[:, 0].max())) + 1, size)
    y0 = max(int(math.floor(poly[:, 1].min())) - 1, 0)
    y1 = min(int(math.ceil(poly[:, 1].max())) + 1, size)
    px = (np.arange(x0, x1) + 0.5)[None, :]
    py = (np.arange(y0, y1) + 0.5)[:, None]
    inside = np.zeros((y1 - y0, x1 - x0), bool)
    xa, ya = poly[:, 0], poly[:, 1]
    xb, yb = np.roll(xa, -1), np.roll(ya, -1)
    for i in range(len(poly)):
        if ya[i] == yb[i]:
            continue
        crosses = (ya[i] > py) != (yb[i] > py)
        x_at = xa[i] + (py - ya[i]) * (xb[i] - xa[i]) / (yb[i] - ya[i])
        inside ^= crosses & (px < x_at)
    mask = np.zeros((size, size), bool)
    mask[y0:y1, x0:x1] = inside
    return mask


def _colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A random RGB colour (any class), redrawn until it stands out from the background under it."""
    best, best_d = None, -1.0
    for _ in range(20):
        c = rng.uniform(0.0, 255.0, size=3)
        d = float(np.abs(c - under).mean())
        if d >= _MIN_CONTRAST:
            return c
        if d > best_d:
            best, best_d = c, d
    return best


def render_image(seed: int, split: str, index: int, image_size: int = 128, min_objects: int = 1,
                 max_objects: int = 5) -> Tuple[np.ndarray, List[dict]]:
    """Image ``index`` of ``split`` ("train" or "val") as :func:`generate` writes it.

    Returns ``(image, objects)``: image (S,S,3) uint8; objects, in drawing order (later ones
    on top), dicts with ``category_id`` (1-based into :data:`CLASSES`), ``mask`` (S,S) bool
    (the shape's full mask, occluded parts included), ``bbox`` [x, y, w, h] (tight box of
    ``mask``, pixel edges), ``area`` (pixels of ``mask``) and ``polygon`` (V,2) (x, y).
    """
    if split not in _SPLITS:
        raise ValueError(f"toy_data.render_image: `split` must be 'train' or 'val', got {split!r}")
    rng = _rng(seed, split, index)
    S = image_size
    img = _background(rng, S)
    count = int(rng.integers(min_objects, max_objects + 1))
    objects: List[dict] = []
    visible = np.zeros((S, S), np.int32)  # 1 + index of the top object at each pixel, 0 = background
    for _ in range(count):
        cls = int(rng.integers(0, len(CLASSES)))
        for _try in range(_PLACEMENT_TRIES):
            diameter = rng.uniform(_MIN_SIZE, _MAX_SIZE) * S
            r = diameter / 2.0
            cx, cy = rng.uniform(r + 1.0, S - r - 1.0, size=2)  # whole circle (any rotation) inside
            poly = _polygon(rng, CLASSES[cls], cx, cy, r)
            mask = _raster(poly, S)
            if not mask.any():
                continue
            ok = True
            for k, o in enumerate(objects):
                still = visible == k + 1
                if (still & mask).sum() > _MAX_HIDDEN * o["area"]:
                    ok = False
                    break
            if ok:
                break
        else:
            continue  # no room left for this one: fewer objects
        ys, xs = np.nonzero(mask)
        x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
        colour = _colour(rng, img[mask].mean(0))
        shade = 1.0 + rng.uniform(-0.15, 0.15) * (xs + 0.5 - cx) / r  # a soft left-right gradient
        img[mask] = np.clip(colour[None, :] * shade[:, None], 0.0, 255.0)  # boolean order = nonzero order
        visible[mask] = len(objects) + 1
        objects.append({"category_id": cls + 1, "mask": mask, "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                        "area": float(mask.sum()), "polygon": poly})
    img = img + rng.normal(0.0, _NOISE_SIGMA, size=img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), objects


# ---------------------------------------------------------------------------------- dataset

def _check_int(name: str, value, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise ValueError(f"toy_data.generate: `{name}` must be an integer >= {lo}, got {value!r}")
    return int(value)


def _params(num_train, num_val, image_size, seed, min_objects, max_objects) -> Dict[str, int]:
    p = {
        "num_train": _check_int("num_train", num_train, 0),
        "num_val": _check_int("num_val", num_val, 0),
        "image_size": _check_int("image_size", image_size, 32),
        "seed": _check_int("seed", seed, 0),
        "min_objects": _check_int("min_objects", min_objects, 0),
        "max_objects": _check_int("max_objects", max_objects, 0),
    }
    if p["max_objects"] < p["min_objects"]:
        raise ValueError(f"toy_data.generate: `max_objects` must be >= `min_objects` ({p['min_objects']}), "
                         f"got {p['max_objects']}")
    if p["max_objects"] > 50:
        raise ValueError(f"toy_data.generate: `max_objects` must be <= 50, got {p['max_objects']}")
    return p


def _paths(root: str) -> Dict[str, str]:
    return {
        "root": root,
        "train_images": os.path.join(root, "train"),
        "val_images": os.path.join(root, "val"),
        "train_ann": os.path.join(root, "annotations", "instances_train.json"),
        "val_ann": os.path.join(root, "annotations", "instances_val.json"),
    }


def _is_complete(paths: Dict[str, str], params: Dict[str, int]) -> bool:
    try:
        with open(os.path.join(paths["root"], "manifest.json")) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return False
    if manifest.get("format_version") != FORMAT_VERSION or manifest.get("params") != params:
        return False
    for split, n in (("train", params["num_train"]), ("val", params["num_val"])):
        folder = paths[f"{split}_images"]
        if not os.path.isfile(paths[f"{split}_ann"]) or not os.path.isdir(folder):
            return False
        if sum(1 for name in os.listdir(folder) if _FILE_RE.match(name)) != n:
            return False
    return True


def _coco(split_images: List[dict], split_anns: List[dict]) -> dict:
    return {
        "info": {"description": "kdops toy shapes (kdops.toy_data)", "version": str(FORMAT_VERSION)},
        "licenses": [],
        "images": split_images,
        "annotations": split_anns,
        "categories": [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASSES)],
    }


def generate(out_dir: str, *, num_train: int = 2000, num_val: int = 300, image_size: int = 128, seed: int = 0,
             min_objects: int = 1, max_objects: int = 5) -> Dict[str, object]:
    """Writes the toy set under ``out_dir`` (see the module docstring) and returns its paths.

    Returns a dict: ``root``, ``train_images`` and ``val_images`` (folders), ``train_ann`` and
    ``val_ann`` (COCO json files), ``classes`` (:data:`CLASSES`). Nothing is rewritten when
    ``out_dir/manifest.json`` records the same parameters and format version and the files are
    there; otherwise this set's files (``NNNNNN.png``, the two json files, the manifest) are
    rewritten and stale ``NNNNNN.png`` beyond the new counts removed. A few ms an image at
    128 px on one CPU core (2300 images: ~10-20 s).
    """
    params = _params(num_train, num_val, image_size, seed, min_objects, max_objects)
    root = os.path.abspath(os.fspath(out_dir))
    paths = _paths(root)
    result = dict(paths, classes=CLASSES)
    if _is_complete(paths, params):
        return result
    manifest_path = os.path.join(root, "manifest.json")
    if os.path.exists(manifest_path):
        os.remove(manifest_path)  # an interrupted rewrite must not look complete
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    digest = hashlib.sha256()
    digest.update(json.dumps(params, sort_keys=True).encode())
    counts = {}
    for split in ("train", "val"):
        n = params[f"num_{split}"]
        folder = paths[f"{split}_images"]
        os.makedirs(folder, exist_ok=True)
        for name in os.listdir(folder):
            if _FILE_RE.match(name) and int(name[:6]) >= n:
                os.remove(os.path.join(folder, name))
        images, anns = [], []
        for i in range(n):
            img, objects = render_image(params["seed"], split, i, params["image_size"], params["min_objects"],
                                        params["max_objects"])
            file_name = f"{i:06d}.png"
            write_png(os.path.join(folder, file_name), img)
            digest.update(img.tobytes())
            images.append({"id": i + 1, "file_name": file_name, "width": params["image_size"],
                           "height": params["image_size"]})
            for o in objects:
                anns.append({
                    "id": len(anns) + 1, "image_id": i + 1, "category_id": o["category_id"], "bbox": o["bbox"],
                    "area": o["area"], "iscrowd": 0,
                    "segmentation": [[round(float(v), 3) for v in o["polygon"].reshape(-1)]],
                })
        text = json.dumps(_coco(images, anns), separators=(",", ":"))
        digest.update(text.encode())
        with open(paths[f"{split}_ann"], "w") as f:
            f.write(text)
        counts[split] = {"images": len(images), "annotations": len(anns)}
    with open(manifest_path, "w") as f:
        json.dump({"format_version": FORMAT_VERSION, "params": params, "content_hash": digest.hexdigest(),
                   "counts": counts, "classes": list(CLASSES)}, f, indent=2, sort_keys=True)
    return result


def main(argv: Sequence[str] = None) -> int:
    """``python -m kdops.toy_data OUT_DIR [--train N] [--val N] [--seed S] [--size PX]``: writes the
    set (or finds it up to date) and prints its paths, one ``key: value`` a line."""
    ap = argparse.ArgumentParser(prog="python -m kdops.toy_data", description=__doc__.split("\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--train", type=int, default=2000, help="training images (default 2000)")
    ap.add_argument("--val", type=int, default=300, help="validation images (default 300)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    ap.add_argument("--min-objects", type=int, default=1)
    ap.add_argument("--max-objects", type=int, default=5)
    a = ap.parse_args(argv)
    try:
        out = generate(a.out_dir, num_train=a.train, num_val=a.val, seed=a.seed, image_size=a.size,
                       min_objects=a.min_objects, max_objects=a.max_objects)
    except ValueError as exc:
        ap.error(str(exc))
    for key, value in out.items():
        print(f"{key}: {','.join(value) if key == 'classes' else value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
