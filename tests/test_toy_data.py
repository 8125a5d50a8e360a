"""kdops.toy_data: determinism, tight boxes, COCO validity, readable PNGs, the CLI."""
import collections
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from kdops import toy_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(num_train=24, num_val=8, image_size=96, seed=3)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    return toy_data.generate(str(out), **SMALL)


def _tree(root):
    files = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, root)] = f.read()
    return files


def test_layout_and_api(toy):
    assert set(toy) == {"root", "train_images", "val_images", "train_ann", "val_ann", "classes"}
    assert toy["classes"] == toy_data.CLASSES == ("circle", "square", "triangle", "cross")
    root = toy["root"]
    assert toy["train_images"] == os.path.join(root, "train")
    assert toy["val_ann"] == os.path.join(root, "annotations", "instances_val.json")
    assert sorted(os.listdir(toy["train_images"])) == [f"{i:06d}.png" for i in range(SMALL["num_train"])]
    assert sorted(os.listdir(toy["val_images"])) == [f"{i:06d}.png" for i in range(SMALL["num_val"])]
    manifest = json.load(open(os.path.join(root, "manifest.json")))
    assert manifest["params"]["num_train"] == SMALL["num_train"] and len(manifest["content_hash"]) == 64


def test_deterministic_byte_identical(toy, tmp_path):
    again = toy_data.generate(str(tmp_path / "again"), **SMALL)
    a, b = _tree(toy["root"]), _tree(again["root"])
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    other = toy_data.generate(str(tmp_path / "other"), **dict(SMALL, seed=4))
    assert _tree(other["root"])["train/000000.png"] != a["train/000000.png"]


def test_split_sizes_do_not_change_images(toy, tmp_path):
    more = toy_data.generate(str(tmp_path / "more"), **dict(SMALL, num_train=30, num_val=3))
    a, b = _tree(toy["root"]), _tree(more["root"])
    for i in range(SMALL["num_train"]):
        assert a[f"train/{i:06d}.png"] == b[f"train/{i:06d}.png"]
    for i in range(3):
        assert a[f"val/{i:06d}.png"] == b[f"val/{i:06d}.png"]


def test_regeneration_skips_and_rewrites(tmp_path):
    out = str(tmp_path / "t")
    toy_data.generate(out, num_train=4, num_val=2, image_size=64)
    png = os.path.join(out, "train", "000000.png")
    stamp = os.stat(png).st_mtime_ns
    os.utime(png, ns=(stamp - 10**9, stamp - 10**9))  # a rewrite would bump it again
    toy_data.generate(out, num_train=4, num_val=2, image_size=64)
    assert os.stat(png).st_mtime_ns == stamp - 10**9
    toy_data.generate(out, num_train=2, num_val=2, image_size=64)  # new parameters: rewritten, stale files gone
    assert sorted(os.listdir(os.path.join(out, "train"))) == ["000000.png", "000001.png"]
    assert json.load(open(os.path.join(out, "manifest.json")))["params"]["num_train"] == 2


def test_png_readable_and_matches_render(toy):
    for split in ("train", "val"):
        for i in (0, 5):
            img = toy_data.read_png(os.path.join(toy[f"{split}_images"], f"{i:06d}.png"))
            ref, _ = toy_data.render_image(SMALL["seed"], split, i, SMALL["image_size"])
            assert img.dtype == np.uint8 and img.shape == (96, 96, 3)
            np.testing.assert_array_equal(img, ref)
            assert img.std() > 10  # textured, not flat


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torchvision 0.29 deprecates its image io
def test_png_decodes_with_torchvision(toy, tmp_path):
    torch = pytest.importorskip("torch")
    io = pytest.importorskip("torchvision.io")
    path = os.path.join(toy["train_images"], "000001.png")
    data = torch.frombuffer(bytearray(open(path, "rb").read()), dtype=torch.uint8)
    img = io.decode_png(data)  # (3,H,W)
    np.testing.assert_array_equal(img.permute(1, 2, 0).numpy(), toy_data.read_png(path))
    # and read_png decodes libpng's output, whose adaptive filtering uses all five row filters
    other = tmp_path / "libpng.png"
    other.write_bytes(io.encode_png(img, compression_level=6).numpy().tobytes())
    np.testing.assert_array_equal(toy_data.read_png(str(other)), img.permute(1, 2, 0).numpy())


def test_boxes_tight_inside_and_match_json(toy):
    S = SMALL["image_size"]
    for split in ("train", "val"):
        coco = json.load(open(toy[f"{split}_ann"]))
        by_image = collections.defaultdict(list)
        for a in coco["annotations"]:
            by_image[a["image_id"]].append(a)
        for im in coco["images"]:
            index = int(im["file_name"][:6])
            assert im["id"] == index + 1
            _, objects = toy_data.render_image(SMALL["seed"], split, index, S)
            anns = by_image[im["id"]]
            assert len(anns) == len(objects) and 1 <= len(anns) <= 5
            for a, o in zip(anns, objects):
                x, y, w, h = a["bbox"]
                assert [x, y, w, h] == o["bbox"] and a["category_id"] == o["category_id"]
                assert 0 <= x and 0 <= y and x + w <= S and y + h <= S and w > 0 and h > 0
                x0, y0, x1, y1 = int(x), int(y), int(x + w), int(y + h)
                m = o["mask"]
                assert m[y0:y1, x0:x1].sum() == m.sum() == a["area"]  # every pixel inside the box
                # ... and the mask touches all four edges
                assert m[y0, x0:x1].any() and m[y1 - 1, x0:x1].any() and m[y0:y1, x0].any() and m[y0:y1, x1 - 1].any()
                poly = np.asarray(a["segmentation"][0]).reshape(-1, 2)
                assert len(poly) >= 3
                # the polygon hugs the box (a sharp tip may reach ~2 px past the last pixel centre)
                assert poly[:, 0].min() > x - 2.5 and poly[:, 0].max() < x + w + 2.5
                assert poly[:, 1].min() > y - 2.5 and poly[:, 1].max() < y + h + 2.5


def test_objects_stand_out_from_background(toy):
    # the topmost object's visible pixels differ from the same pixels with no objects drawn
    img = toy_data.read_png(os.path.join(toy["train_images"], "000002.png")).astype(float)
    _, objects = toy_data.render_image(SMALL["seed"], "train", 2, SMALL["image_size"])
    top = objects[-1]["mask"]
    inside = img[top].mean(0)
    ring = np.zeros_like(top)
    x, y, w, h = map(int, objects[-1]["bbox"])
    ring[max(y - 3, 0):y + h + 3, max(x - 3, 0):x + w + 3] = True
    ring &= ~np.any([o["mask"] for o in objects], axis=0)
    if ring.any():
        assert np.abs(inside - img[ring].mean(0)).mean() > 15


def test_coco_schema_and_classes(toy):
    for split in ("train", "val"):
        coco = json.load(open(toy[f"{split}_ann"]))
        assert [c["id"] for c in coco["categories"]] == [1, 2, 3, 4]
        assert [c["name"] for c in coco["categories"]] == list(toy_data.CLASSES)
        assert [im["id"] for im in coco["images"]] == list(range(1, len(coco["images"]) + 1))
        for im in coco["images"]:
            assert set(im) >= {"id", "file_name", "width", "height"} and im["width"] == im["height"] == 96
            assert os.path.isfile(os.path.join(toy[f"{split}_images"], im["file_name"]))
        ids = [a["id"] for a in coco["annotations"]]
        assert ids == list(range(1, len(ids) + 1))
        for a in coco["annotations"]:
            assert set(a) >= {"id", "image_id", "category_id", "bbox", "area", "iscrowd", "segmentation"}
            assert a["iscrowd"] == 0 and 1 <= a["category_id"] <= 4 and 1 <= a["image_id"] <= len(coco["images"])
            assert all(isinstance(v, float) for v in a["bbox"]) and a["area"] > 0
            assert isinstance(a["segmentation"], list) and len(a["segmentation"][0]) % 2 == 0


def test_class_distribution_covers_all(toy):
    coco = json.load(open(toy["train_ann"]))
    counts = collections.Counter(a["category_id"] for a in coco["annotations"])
    assert set(counts) == {1, 2, 3, 4}
    per_image = collections.Counter(a["image_id"] for a in coco["annotations"])
    assert len(per_image) == SMALL["num_train"] and len(set(per_image.values())) > 1


def test_pycocotools(toy):
    pytest.importorskip("pycocotools")
    from pycocotools.coco import COCO

    coco = COCO(toy["train_ann"])
    assert sorted(coco.getCatIds()) == [1, 2, 3, 4]
    ann = coco.loadAnns(coco.getAnnIds(imgIds=[1]))[0]
    m = coco.annToMask(ann).astype(bool)
    _, objects = toy_data.render_image(SMALL["seed"], "train", 0, SMALL["image_size"])
    ref = objects[0]["mask"]
    assert (m & ref).sum() / (m | ref).sum() > 0.8  # its polygon rasteriser, ours: boundary pixels differ


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="num_train"):
        toy_data.generate(str(tmp_path), num_train=-1)
    with pytest.raises(ValueError, match="image_size"):
        toy_data.generate(str(tmp_path), image_size=8)
    with pytest.raises(ValueError, match="max_objects"):
        toy_data.generate(str(tmp_path), min_objects=3, max_objects=2)
    with pytest.raises(ValueError, match="split"):
        toy_data.render_image(0, "test", 0)


def test_cli(tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "kdops.toy_data", str(out), "--train", "3", "--val", "2", "--seed", "1", "--size", "64"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    lines = dict(line.split(": ", 1) for line in res.stdout.strip().splitlines())
    assert lines["train_ann"] == str(out / "annotations" / "instances_train.json")
    assert len(os.listdir(lines["train_images"])) == 3 and len(os.listdir(lines["val_images"])) == 2
    assert toy_data.read_png(os.path.join(lines["val_images"], "000001.png")).shape == (64, 64, 3)
