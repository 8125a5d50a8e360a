"""kdops.cache: the offline teacher cache (writer, reader, resumption, integrity, augmentation replay)."""
import hashlib
import json
import logging
import os
import pickle
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from kdops.cache import CacheIntegrityError, TeacherCache, TeacherCacheWriter, canonical_augmentation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FP = "teacher-cfg-weights-3f2a"


def entry(i):
    """UniKD-like stage-2 outputs of image i: deterministic, so any process can rebuild them."""
    g = torch.Generator().manual_seed(i)
    q = 5 + i % 4
    return {"q_ct": torch.randn(q, 16, generator=g) * 30, "ref_ct": torch.rand(q, 2, generator=g),
            "z_ct": torch.randn(q, 16, generator=g, dtype=torch.float64), "pos_mask": torch.rand(q, generator=g) > 0.5,
            "gt_index": torch.randint(-1, 50, (q,), generator=g), "score": torch.tensor(0.25 * i),
            "none": torch.zeros(0, 16)}


def key(i):
    return f"{i:012d}.jpg"


def aug(i, flip=False):
    return {"flip": "horizontal" if flip else None, "scale": [800, 1216 + 32 * (i % 3)], "crop": None}


def write(root, ids, **kw):
    with TeacherCacheWriter(root, fingerprint=FP, **kw) as w:
        for i in ids:
            w.put(key(i), aug(i), entry(i))


def check(cache, ids):
    for i in ids:
        got, want = cache.get(key(i), aug(i)), entry(i)
        assert set(got) == set(want)
        for name, x in want.items():
            y = got[name]
            assert y.shape == x.shape, name
            if x.is_floating_point():  # bitwise x.half()
                assert y.dtype == torch.float16 and torch.equal(y.view(torch.int16), x.half().view(torch.int16)), name
            else:
                assert y.dtype == x.dtype and torch.equal(y, x), name


def manifests(root):
    return {n[:-4] + ".bin": json.load(open(os.path.join(root, n))) for n in sorted(os.listdir(root)) if n.endswith(".idx")}


def shard_of(root, i):
    return next(f for f, m in manifests(root).items() if any(e["key"] == key(i) for e in m["entries"]))


def test_round_trip_bitwise_over_several_shards(tmp_path):
    root = str(tmp_path / "c")
    write(root, range(40), shard_bytes=2048)
    mans = manifests(root)
    assert len(mans) >= 5
    for f, m in mans.items():
        path = os.path.join(root, f)
        assert os.path.getsize(path) == m["bytes"] <= 2048
        assert m["checksum"] == "sha256:" + hashlib.sha256(open(path, "rb").read()).hexdigest()  # sha256sum by hand
        assert all(t["offset"] % 64 == 0 for e in m["entries"] for t in e["tensors"])
    cache = TeacherCache(root, fingerprint=FP, verify="eager")
    assert len(cache) == cache.num_entries == 40 and cache.keys() == [key(i) for i in range(40)]
    assert key(3) in cache and (key(3), aug(3)) in cache and (key(3), aug(3, flip=True)) not in cache
    check(cache, range(40))
    t = cache.get(key(7), aug(7))
    assert all(v.data_ptr() % 64 == 0 for v in t.values() if v.numel())
    # zero-copy views, copy-on-write: an in-place change reaches neither the file nor another get()
    t["q_ct"].zero_()
    check(cache, [7])
    TeacherCache(root, verify="eager")
    owned = cache.get(key(7), aug(7), copy=True)
    assert torch.equal(owned["pos_mask"], entry(7)["pos_mask"])
    stats = cache.bytes_per_image()
    want = {n: np.mean([x.numel() * (2 if x.is_floating_point() else x.element_size()) for x in
                        (entry(i)[n] for i in range(40))]) for n in entry(0)}
    assert stats["tensors"] == pytest.approx(want) and stats["entry"] == pytest.approx(sum(want.values()))
    assert stats["entries"] == 40 and stats["on_disk"] > stats["entry"]
    check(pickle.loads(pickle.dumps(cache)), [0, 39])  # spawned DataLoader workers


def test_stored_dtype_and_argument_checks(tmp_path):
    x = torch.randn(3, 5, dtype=torch.float64)
    for dtype in (torch.float32, torch.bfloat16):
        root = str(tmp_path / str(dtype))
        with TeacherCacheWriter(root, fingerprint=FP, dtype=dtype) as w:
            w.put("a", {}, {"x": x})
        assert torch.equal(TeacherCache(root).get("a", {})["x"], x.to(dtype))
    with pytest.raises(ValueError, match="`rank`"):
        TeacherCacheWriter(str(tmp_path / "r"), fingerprint=FP, rank=2, world_size=2)
    with pytest.raises(TypeError, match=r"`dtype`.*torch.float16, not the string"):
        TeacherCacheWriter(str(tmp_path / "r"), fingerprint=FP, dtype="float16")
    with pytest.raises(ValueError, match="`verify`"):
        TeacherCache(str(tmp_path / "torch.float32"), verify="sometimes")
    with pytest.raises(FileNotFoundError, match="no index"):
        TeacherCache(str(tmp_path))


def test_non_finite_after_fp16_cast_and_duplicates(tmp_path):
    root = str(tmp_path / "c")
    with TeacherCacheWriter(root, fingerprint=FP) as w:
        with pytest.raises(ValueError, match=r"tensor `p3` of key 'a'.*non-finite.*float16.*1e\+06"):
            w.put("a", {}, {"p4": torch.ones(2, 2), "p3": torch.full((2, 2), 1e6)})
        with pytest.raises(ValueError, match=r"`p3`.*NaN/inf already"):
            w.put("a", {}, {"p3": torch.tensor([1.0, float("nan")])})
        assert not w.done("a", {})
        w.put("a", {"s": 1.0}, {"p3": torch.ones(2)})
        with pytest.raises(ValueError, match="already in the cache"):
            w.put("a", {"s": 1}, {"p3": torch.ones(2)})  # 1.0 and 1 are one record
    with TeacherCacheWriter(str(tmp_path / "wide"), fingerprint=FP, dtype=torch.float32) as w:
        w.put("a", {}, {"p3": torch.full((2, 2), 1e6)})
    assert TeacherCache(root).num_entries == 1


def test_resume_after_a_crash_without_manifest(tmp_path, caplog):
    root = str(tmp_path / "c")
    w = TeacherCacheWriter(root, fingerprint=FP, shard_bytes=2048)
    for i in range(20):
        w.put(key(i), aug(i), entry(i))
    lost_stem, lost = w._stem, [int(e["key"][:12]) for e in w._entries]
    with pytest.raises(RuntimeError, match="another writer .* holds rank 0"):
        TeacherCacheWriter(root, fingerprint=FP)
    w._f.flush()
    w._f.close()  # the process dies here: the open shard has no manifest, the OS drops its lock
    w._lock.close()
    del w
    sealed = [i for i in range(20) if i not in lost]
    assert lost and sealed and os.path.exists(os.path.join(root, lost_stem + ".bin"))
    check(TeacherCache(root), sealed)  # the rank index already lists every sealed shard
    with caplog.at_level(logging.WARNING, logger="kdops.cache"):
        w = TeacherCacheWriter(root, fingerprint=FP, shard_bytes=2048)
    assert not os.path.exists(os.path.join(root, lost_stem + ".bin"))
    assert lost_stem in caplog.text and "never sealed" in caplog.text
    assert all(w.done(key(i), aug(i)) for i in sealed) and not any(w.done(key(i), aug(i)) for i in lost)
    with pytest.raises(ValueError, match="already in the cache"):
        w.put(key(sealed[0]), aug(sealed[0]), entry(sealed[0]))
    for i in range(25):
        if not w.done(key(i), aug(i)):
            w.put(key(i), aug(i), entry(i))
    w.close()
    cache = TeacherCache(root, fingerprint=FP, verify="eager")
    assert cache.num_entries == 25
    check(cache, range(25))


class DiskFull:
    """A shard file whose writes fail half-way once `fail` is set (ENOSPC)."""

    def __init__(self, f):
        self.f, self.fail = f, False

    def write(self, data):
        if self.fail and len(data) > 1:
            self.f.write(bytes(memoryview(data).cast("B")[:len(data) // 2]))
            raise OSError(28, "No space left on device")
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)


def test_a_put_that_fails_while_writing_is_cut_off(tmp_path):
    root = str(tmp_path / "c")
    with TeacherCacheWriter(root, fingerprint=FP) as w:
        w.put(key(0), aug(0), entry(0))
        w._f = DiskFull(w._f)
        w._f.fail = True
        with pytest.raises(OSError, match="No space"):
            w.put(key(1), aug(1), entry(1))
        assert not w.done(key(1), aug(1))
        w.put(key(2), aug(2), entry(2))  # seals the cut shard first, then writes a new one
    cache = TeacherCache(root, verify="eager")
    assert len(manifests(root)) == 2 and (key(1), aug(1)) not in cache
    check(cache, [0, 2])


def test_resume_after_a_crash_during_sealing(tmp_path, caplog):
    root = str(tmp_path / "c")
    write(root, range(12), shard_bytes=2048)
    last = sorted(manifests(root))[-1]
    lost = [int(e["key"][:12]) for e in manifests(root)[last]["entries"]]
    stem = os.path.join(root, last[:-4])
    os.replace(stem + ".idx", stem + ".idx.tmp")  # died between writing the manifest and renaming it
    open(os.path.join(root, "index-rank000.json.tmp"), "w").write("{")
    with caplog.at_level(logging.WARNING, logger="kdops.cache"):
        w = TeacherCacheWriter(root, fingerprint=FP, shard_bytes=2048)
    assert not [n for n in os.listdir(root) if n.endswith(".tmp")] and not os.path.exists(stem + ".bin")
    assert "interrupted write" in caplog.text
    assert not os.path.exists(os.path.join(root, "index.json"))  # stale until merged again
    assert [w.done(key(i), aug(i)) for i in range(12)] == [i not in lost for i in range(12)]
    for i in lost:
        w.put(key(i), aug(i), entry(i))
    w.close()
    check(TeacherCache(root, verify="eager"), range(12))


def test_corrupt_truncated_and_missing_shards(tmp_path):
    root = str(tmp_path / "c")
    write(root, range(12), shard_bytes=2048)
    bad = shard_of(root, 9)
    path = os.path.join(root, bad)
    good = next(i for i in range(12) if shard_of(root, i) != bad)
    data = bytearray(open(path, "rb").read())
    data[100] ^= 0x01
    open(path, "wb").write(data)
    with pytest.raises(CacheIntegrityError, match=rf"{bad}.*checksum mismatch") as err:
        TeacherCache(root, verify="eager")
    assert err.value.path == path
    lazy = TeacherCache(root)  # lazy: nothing hashed on open, a shard when first read
    check(lazy, [good])
    with pytest.raises(CacheIntegrityError, match=rf"{bad}.*checksum mismatch"):
        lazy.get(key(9), aug(9))
    TeacherCache(root, verify="none").get(key(9), aug(9))  # sizes only
    open(path, "wb").write(data[:-10])
    for verify in ("eager", "lazy", "none"):
        with pytest.raises(CacheIntegrityError, match=rf"{bad}.*truncated.*{len(data) - 10} bytes"):
            TeacherCache(root, verify=verify)
    with pytest.raises(CacheIntegrityError, match=rf"{bad}.*truncated"):
        lazy.get(key(9), aug(9))  # cut after the open: caught before it is mapped
    os.remove(path)
    with pytest.raises(CacheIntegrityError, match=rf"{bad}.*missing"):
        TeacherCache(root, verify="none")


def test_fingerprint_mismatch(tmp_path):
    root = str(tmp_path / "c")
    write(root, range(3))
    with pytest.raises(ValueError, match=rf"'{FP}'.*not 'other-teacher'.*another teacher.*new --out.*delete"):
        TeacherCacheWriter(root, fingerprint="other-teacher")
    with pytest.raises(ValueError, match=rf"made with fingerprint '{FP}'.*'other-teacher' was asked.*another teacher"):
        TeacherCache(root, fingerprint="other-teacher")
    os.remove(os.path.join(root, "cache.json"))  # the marker lost: the manifests still tell
    with pytest.raises(ValueError, match=rf"'{FP}' \(manifest rank000-shard00000.idx\), not 'other-teacher'"):
        TeacherCacheWriter(root, fingerprint="other-teacher")
    assert not os.path.exists(os.path.join(root, "cache.json"))


def test_augmentation_replay(tmp_path):
    root = str(tmp_path / "c")
    plain, flipped = {"q": torch.arange(6.0).view(3, 2)}, {"q": torch.arange(6.0).view(3, 2).flip(1)}
    with TeacherCacheWriter(root, fingerprint=FP) as w:
        w.put("img.jpg", {"scale": [800.0, 1216], "flip": None, "crop": None}, plain)
        w.put("img.jpg", {"flip": "horizontal", "scale": (800, 1216), "crop": [0.1 + 0.2, 0, 1, 1]}, flipped)
        w.put("other.jpg", {}, plain)
    cache = TeacherCache(root)
    assert len(cache) == 2 and cache.num_entries == 3
    assert torch.equal(cache.get("img.jpg", {"crop": None, "flip": None, "scale": [800, 1216]})["q"], plain["q"].half())
    flip_aug = {"crop": [0.3, 0, 1, 1], "flip": "horizontal", "scale": [800, 1216]}
    assert torch.equal(cache.get("img.jpg", flip_aug)["q"], flipped["q"].half())
    assert cache.augmentations("img.jpg") == [{"crop": None, "flip": None, "scale": [800, 1216]}, flip_aug]
    with pytest.raises(KeyError, match=r'augmentation \{"flip":"vertical"\}; recorded for it: '
                                       r'\{"crop":null,"flip":null,"scale":\[800,1216\]\}, \{"crop":\[0.3,0,1,1\]'):
        cache.get("img.jpg", {"flip": "vertical"})
    with pytest.raises(KeyError, match="key 'missing.jpg' is not in the cache"):
        cache.augmentations("missing.jpg")
    for rng in (random.Random(0), np.random.default_rng(0), np.random.RandomState(0), torch.Generator().manual_seed(0)):
        drawn = {canonical_augmentation(cache.sample_augmentation("img.jpg", rng)) for _ in range(40)}
        assert drawn == {canonical_augmentation(a) for a in cache.augmentations("img.jpg")}
    assert cache.sample_augmentation("other.jpg") == {}


CHILD = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, sys.argv[1])
    sys.path.insert(0, sys.argv[2])
    from test_teacher_cache import FP, aug, entry, key
    from kdops.cache import TeacherCacheWriter
    rank = int(sys.argv[4])
    with TeacherCacheWriter(sys.argv[3], fingerprint=FP, rank=rank, world_size=2, shard_bytes=2048) as w:
        for i in range(rank, 24, 2):
            w.put(key(i), aug(i), entry(i))
""")


def test_two_processes_write_their_shards_then_merge(tmp_path):
    root = str(tmp_path / "c")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, ROOT, os.path.dirname(__file__), root, str(r)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(2)]
    for p in procs:
        out = p.communicate(timeout=60)[0]
        assert p.returncode == 0, out.decode()
    assert not os.path.exists(os.path.join(root, "index.json"))  # world_size 2: rank 0 merges after a barrier
    with pytest.raises(ValueError, match=r"no index for rank\(s\) \[2\]"):
        TeacherCacheWriter.merge_indexes(root, world_size=3)
    merged = json.load(open(TeacherCacheWriter.merge_indexes(root, world_size=2)))
    assert merged["ranks"] == [0, 1] and merged["entries"] == 24 and merged["fingerprint"] == FP
    assert {s["rank"] for s in merged["shards"]} == {0, 1}
    cache = TeacherCache(root, fingerprint=FP, verify="eager")
    assert cache.num_entries == 24
    check(cache, range(24))
