r"""An offline teacher cache: the teacher's outputs computed once, stored on disk, read while training.

Methods whose teacher is expensive and frozen (UniKD's stage 2 reads the teacher's knowledge
embeddings z^T, the query embeddings q, reference points and positive masks per image; feature-map
methods read FPN levels) can run the teacher once over the training set, with the augmentations the
training pipeline draws, and train the student from the stored outputs. This module is the storage
layer and nothing else: framework-free, no torch.distributed, tensors and JSON in and out.

What is stored, per (image key, augmentation record): a dict of named tensors, e.g.
``{"q_ct": (Q,C), "ref_ct": (Q,2), "z_ct": (Q,C), "pos_mask": (Q,) bool}`` or ``{"p3": (C,H,W), ...}``.
Floating tensors are stored in the writer's ``dtype`` (float16 by default), bool and integer
tensors as they come. The key is a string (the image file name or id); the augmentation record is
JSON data such as ``{"flip": "horizontal", "scale": [800, 1216], "crop": None}``.

Format (version 1), all in one directory ``root``::

    cache.json                    {"format", "version", "fingerprint"}: claims the directory
    rank003-shard00012.bin        raw tensor bytes, each tensor at a 64-byte aligned offset, zero padding
    rank003-shard00012.idx        the shard's manifest (JSON): fingerprint, size, checksum and its
                                  entries (key, aug, per tensor name/dtype/shape/offset/nbytes)
    index-rank003.json            one rank's sealed shards (file, manifest, bytes, entries, checksum)
    index.json                    every rank's shards, merged by TeacherCacheWriter.merge_indexes
    rank003.lock                  held (flock) by the open writer of rank 3: one writer per rank

The checksum is ``"sha256:<hex>"`` of the whole shard file, computed while writing (no re-read).
SHA-256 rather than CRC32: ``sha256sum rank003-shard00012.bin`` checks a shard by hand with
coreutils, and no corruption or swapped-in file slips through (a 32-bit CRC passes one in 2^32);
at about 1.7 GB/s per core (SHA-NI; CRC32 is about 4) it is faster than most disks deliver a shard,
and a reader pays it once per shard and process, a writer while writing.

Guarantees and what a crash leaves behind:

* A shard is *sealed* in this order: its bytes are flushed and fsync'ed, then its manifest is
  written to ``<name>.idx.tmp``, fsync'ed and renamed over ``<name>.idx`` (``os.replace``, atomic),
  then the rank's index is rewritten the same way. A shard without its manifest is incomplete and
  is never read. Sealed shards are never modified again.
* A crash (kill, OOM, pre-emption) loses only the entries of the shard being written. Reopening a
  writer with the same fingerprint and rank deletes that rank's half-written shard and ``*.tmp``
  files (logged on the ``kdops.cache`` logger), keeps every sealed shard whose size matches its
  manifest, and continues with a new shard; ``writer.done(key, aug)`` is True for the entries of
  sealed shards of *any* rank (so a restart may use another number of processes) and for entries
  put since the open. Checksums are not recomputed on resume (sizes are): run
  ``TeacherCache(root, verify="eager")`` to check every byte.
* A directory claimed by another fingerprint (another teacher, its weights, or other cached-output
  settings) is refused by both the writer and the reader.
* The reader reads only shards listed in an index; a listed shard that is missing, truncated
  (size differs from its manifest) or corrupt (checksum differs) raises :class:`CacheIntegrityError`
  naming the file: all of them on open with ``verify="eager"``, a shard's checksum when it is first
  read with ``verify="lazy"`` (the default; once per process, so each DataLoader worker hashes the
  shards it reads), sizes only with ``verify="none"``.
* Augmentation records compare by canonical JSON: sorted keys, floats rounded to 6 digits, floats
  with an integer value written as integers (``800.0 == 800``), tuples as lists.

Use from a caching run (one process per GPU, ``fingerprint`` the caller's hash of the teacher config,
its weights and the cached-output settings)::

    from kdops.cache import TeacherCache, TeacherCacheWriter

    with TeacherCacheWriter(out, fingerprint=fp, rank=rank, world_size=world) as writer:
        for image, key, aug in loader:                     # aug: the record of the augmentation drawn
            if writer.done(key, aug):                      # sealed before a crash: skip the teacher
                continue
            out_t = teacher(image)
            writer.put(key, aug, {"q_ct": out_t.q, "z_ct": out_t.z, "pos_mask": out_t.pos})
    torch.distributed.barrier()                             # world == 1: close() merges by itself
    if rank == 0:
        TeacherCacheWriter.merge_indexes(out, world_size=world)

and from training (offline mode: replay a recorded augmentation instead of drawing a new one)::

    cache = TeacherCache(out, fingerprint=fp)
    aug = cache.sample_augmentation(key, rng)              # one of the recorded ones
    image = apply_augmentation(load(key), aug)
    t = cache.get(key, aug)                                # {"z_ct": (Q,C) float16 view, ...}
    z_t = t["z_ct"].to(device, non_blocking=True).float()

``get`` returns zero-copy views: each call maps the entry's bytes privately and copy-on-write
(``numpy.memmap`` mode "c"), so pages come straight from the OS page cache, nothing is read before
it is used, and an in-place change to a returned tensor stays in that tensor: it never reaches the
file nor the tensors of another ``get`` (``copy=True`` returns tensors that own their memory). No
shard stays mapped once its tensors are freed; a :class:`TeacherCache` pickles for spawned
DataLoader workers.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
import sys
import threading
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from .ops._validation import check_choice, check_dtype, check_number

__all__ = ["CacheIntegrityError", "TeacherCache", "TeacherCacheWriter", "canonical_augmentation"]

FORMAT = "kdops-teacher-cache"
VERSION = 1
ALIGN = 64
_W = "kdops.cache.TeacherCacheWriter"
_R = "kdops.cache.TeacherCache"
_STORABLE = {str(d)[6:]: d for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool,
                                      torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)}
_ITEMSIZE = {name: torch.empty((), dtype=d).element_size() for name, d in _STORABLE.items()}
_SHARD = re.compile(r"^rank(\d{3,})-shard(\d{5,})\.(bin|idx)$")
_RANK_INDEX = re.compile(r"^index-rank(\d{3,})\.json$")
_log = logging.getLogger(__name__)


class CacheIntegrityError(OSError):
    """A shard or manifest listed in an index is missing, truncated or corrupt; ``path`` names it."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path


class _KeyError(KeyError):
    def __str__(self) -> str:  # KeyError's str() is the repr of its message
        return str(self.args[0])


# ============================================================================ shared helpers

def _canon(x, where: str):
    if isinstance(x, np.generic):
        x = x.item()
    if x is None or isinstance(x, (bool, str, int)):
        return x
    if isinstance(x, float):
        if not math.isfinite(x):
            raise ValueError(f"{where} must be finite, got {x!r}")
        r = round(x, 6)
        return int(r) if r.is_integer() and abs(r) < 2 ** 53 else r
    if isinstance(x, (list, tuple)):
        return [_canon(v, f"{where}[{i}]") for i, v in enumerate(x)]
    if isinstance(x, dict):
        bad = [k for k in x if not isinstance(k, str)]
        if bad:
            raise TypeError(f"{where} must have string keys, got {bad[0]!r}")
        return {k: _canon(v, f"{where}[{k!r}]") for k, v in x.items()}
    raise TypeError(f"{where} must be JSON data (None, bool, int, float, str, list, dict), got "
                    f"{type(x).__name__} {x!r}")


def canonical_augmentation(aug: dict, *, owner: str = "kdops.cache") -> str:
    """The canonical JSON of an augmentation record: how records are compared and stored."""
    if not isinstance(aug, dict):
        raise TypeError(f"{owner}: `aug` must be a dict (the augmentation record, {{}} for none), got "
                        f"{type(aug).__name__} {aug!r}")
    return json.dumps(_canon(aug, f"{owner}: `aug`"), sort_keys=True, separators=(",", ":"))


def _check_key(owner: str, key) -> str:
    if not isinstance(key, str) or not key:
        raise TypeError(f"{owner}: `key` must be a non-empty string (the image file name or id; str() an "
                        f"integer id), got {type(key).__name__} {key!r}")
    return key


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _shard_stem(rank: int, k: int) -> str:
    return f"rank{rank:03d}-shard{k:05d}"


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json_atomic(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, separators=(",", ":"))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path) or ".")


def _read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _sha256_file(path: str) -> str:
    h, view = hashlib.sha256(), memoryview(bytearray(8 << 20))
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(view)
            if not n:
                return "sha256:" + h.hexdigest()
            h.update(view[:n])


def _mismatch(owner: str, root: str, found: str, wanted: str, where: str) -> ValueError:
    return ValueError(
        f"{owner}: {root} holds a teacher cache made with fingerprint {found!r} ({where}), not {wanted!r}: "
        "it was made with another teacher, teacher weights or cached-output settings. Write to a new "
        f"--out directory, or delete {root} to rebuild it")


def _load_manifests(root: str, owner: str, fingerprint: str):
    """Every sealed shard in root whose .bin has its manifest's size: {rank: {k: manifest}}; and the
    shards that are not (stem -> reason)."""
    names = os.listdir(root)
    sealed, broken = {}, {}
    for name in sorted(names):
        m = _SHARD.match(name)
        if not m or m.group(3) != "idx":
            continue
        stem, path = name[:-4], os.path.join(root, name)
        try:
            man = _read_json(path)
        except (OSError, ValueError) as e:
            broken[stem] = f"unreadable manifest ({e})"
            continue
        if man.get("fingerprint") != fingerprint:
            raise _mismatch(owner, root, man.get("fingerprint"), fingerprint, f"manifest {name}")
        bin_path = os.path.join(root, stem + ".bin")
        try:
            size = os.path.getsize(bin_path)
        except OSError:  # missing (or being deleted by its own rank's writer)
            size = None
        if size != man.get("bytes"):
            broken[stem] = "its shard file is missing" if size is None else \
                f"its shard file has {size} bytes, the manifest says {man.get('bytes')}"
            continue
        sealed.setdefault(int(m.group(1)), {})[int(m.group(2))] = man
    return sealed, broken


def _shard_record(man: dict) -> dict:
    return {"file": man["file"], "manifest": man["file"][:-4] + ".idx", "rank": man["rank"], "bytes": man["bytes"],
            "entries": len(man["entries"]), "checksum": man["checksum"]}


# ============================================================================ writer

class TeacherCacheWriter:
    """Writes one rank's shards of a teacher cache (the format and guarantees: :mod:`kdops.cache`).

    Args:
        root: the cache directory (created if needed); every rank writes into the same one.
        fingerprint: the caller's hash of the teacher config, its weights and the cached-output
            settings; stored in every manifest and index, and checked when a cache is reopened.
        rank, world_size: this process's rank and the number of writing processes.
        shard_bytes: a shard is sealed before an entry would take it past this size (an entry
            larger than it gets a shard of its own; entries never span shards). 256 MiB.
        dtype: the dtype floating tensors are stored in (float16; bfloat16, float32, float64).

    Not thread-safe. One writer per (root, rank) at a time: a second one is refused while the first
    holds the rank's lock file (``rank003.lock``, flock; not on Windows). Use it as a context manager or call
    :meth:`close`: entries of a shard that is never sealed are lost (and redone on resume).
    """

    def __init__(self, root, *, fingerprint: str, rank: int = 0, world_size: int = 1,
                 shard_bytes: int = 256 << 20, dtype: torch.dtype = torch.float16) -> None:
        if not isinstance(root, (str, os.PathLike)):
            raise TypeError(f"{_W}: `root` must be a path, got {type(root).__name__} {root!r}")
        if not isinstance(fingerprint, str) or not fingerprint:
            raise TypeError(f"{_W}: `fingerprint` must be a non-empty string (a hash of the teacher config, "
                            f"weights and cached-output settings), got {fingerprint!r}")
        self.world_size = check_number(_W, "world_size", world_size, low=1, integer=True)
        self.rank = check_number(_W, "rank", rank, low=0, high=world_size - 1, integer=True)
        self.shard_bytes = check_number(_W, "shard_bytes", shard_bytes, low=1, integer=True)
        self.dtype = check_dtype(_W, "dtype", dtype, allow_none=False)
        self.root, self.fingerprint = os.fspath(root), fingerprint
        os.makedirs(self.root, exist_ok=True)
        self._f, self._closed, self._lock = None, False, None
        self._lock_rank()
        try:
            self._claim()
            self._resume()
        except BaseException:
            self._unlock()
            raise

    # ---------------------------------------------------------------- opening
    def _lock_rank(self) -> None:
        """An advisory lock per (root, rank), held until close() or the process ends: a second writer
        for the same rank would delete the first one's open shard as half-written."""
        try:
            import fcntl
        except ImportError:  # Windows: no lock, the caller keeps one writer per rank
            return
        self._lock = open(os.path.join(self.root, f"rank{self.rank:03d}.lock"), "a")
        try:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            self._lock = None
            raise RuntimeError(f"{_W}: another writer (this or another process) holds rank {self.rank} of "
                               f"{self.root}; close it first, or give this one another rank or root") from None

    def _unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the file releases the flock
            self._lock = None

    def _claim(self) -> None:
        """Creates cache.json (first writer wins, atomically: link() never replaces) or checks it."""
        path = os.path.join(self.root, "cache.json")
        if not os.path.exists(path):
            _load_manifests(self.root, _W, self.fingerprint)  # shards of another fingerprint: refuse before claiming
            tmp = f"{path}.{self.rank}.{os.getpid()}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"format": FORMAT, "version": VERSION, "fingerprint": self.fingerprint}, f)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
            except OSError:  # no hard links on this file system: rename (a race here is harmless, same content)
                if not os.path.exists(path):
                    os.replace(tmp, path)
            if os.path.exists(tmp):
                os.remove(tmp)
            _fsync_dir(self.root)
        meta = _read_json(path)
        if meta.get("format") != FORMAT:
            raise ValueError(f"{_W}: {path} is not a kdops teacher cache marker; choose another `root`")
        if meta.get("fingerprint") != self.fingerprint:
            raise _mismatch(_W, self.root, meta.get("fingerprint"), self.fingerprint, "cache.json")

    def _resume(self) -> None:
        mine = f"rank{self.rank:03d}-"
        own_tmp = (mine, f"index-rank{self.rank:03d}.json.", f"cache.json.{self.rank}.") + (
            ("index.json.",) if self.rank == 0 else ())
        for name in sorted(os.listdir(self.root)):
            if name.endswith(".tmp") and name.startswith(own_tmp):
                _log.warning("%s: deleting %s, left by an interrupted write", _W, os.path.join(self.root, name))
                os.remove(os.path.join(self.root, name))
        sealed, broken = _load_manifests(self.root, _W, self.fingerprint)
        for stem, why in broken.items():
            if stem.startswith(mine):
                _log.warning("%s: deleting shard %s (%s); its entries will be written again", _W,
                             os.path.join(self.root, stem + ".bin"), why)
                for ext in (".bin", ".idx"):
                    if os.path.exists(os.path.join(self.root, stem + ext)):
                        os.remove(os.path.join(self.root, stem + ext))
        for name in sorted(os.listdir(self.root)):
            m = _SHARD.match(name)
            if m and m.group(3) == "bin" and int(m.group(1)) == self.rank and \
                    int(m.group(2)) not in sealed.get(self.rank, {}):
                _log.warning("%s: deleting %s, a shard that was never sealed (the writer stopped before "
                             "close()); its entries will be written again", _W, os.path.join(self.root, name))
                os.remove(os.path.join(self.root, name))
        self._done = set()
        for shards in sealed.values():
            for man in shards.values():
                self._done.update((e["key"], canonical_augmentation(e["aug"])) for e in man["entries"])
        own = sealed.get(self.rank, {})
        self._sealed = [_shard_record(own[k]) for k in sorted(own)]
        self._next = max(own, default=-1) + 1
        merged = os.path.join(self.root, "index.json")
        if os.path.exists(merged):  # stale as soon as a writer may add shards; merge_indexes rewrites it
            _log.info("%s: removing %s until the ranks are merged again", _W, merged)
            os.remove(merged)
        self._write_rank_index()
        if self._sealed:
            _log.info("%s: resuming rank %d after %d sealed shard(s) (%d entries done in %s)", _W, self.rank,
                      len(self._sealed), len(self._done), self.root)

    def _write_rank_index(self) -> None:
        _write_json_atomic(os.path.join(self.root, f"index-rank{self.rank:03d}.json"),
                           {"format": FORMAT, "version": VERSION, "fingerprint": self.fingerprint, "rank": self.rank,
                            "world_size": self.world_size, "shards": self._sealed})

    # ---------------------------------------------------------------- writing
    def done(self, key: str, aug: dict) -> bool:
        """True when (key, aug) is sealed in the cache (by any rank) or was put by this writer."""
        return (_check_key(_W, key), canonical_augmentation(aug, owner=_W)) in self._done

    def __len__(self) -> int:
        return len(self._done)

    def put(self, key: str, aug: dict, tensors: Dict[str, torch.Tensor]) -> None:
        """Stores one (key, aug) entry: floating tensors cast to ``dtype``, others as they are, copied
        to the CPU. Raises ValueError for a (key, aug) already stored or a non-finite value after the cast."""
        if self._closed:
            raise RuntimeError(f"{_W}.put: the writer is closed; open a new one to add entries")
        if self._f is not None and self._dirty:  # the last put failed while writing: seal what is whole
            self._seal()
        key = _check_key(f"{_W}.put", key)
        canon = canonical_augmentation(aug, owner=f"{_W}.put")
        if (key, canon) in self._done:
            raise ValueError(f"{_W}.put: key {key!r} with augmentation {canon} is already in the cache; check "
                             "writer.done(key, aug) before running the teacher")
        if not isinstance(tensors, dict) or not tensors:
            raise TypeError(f"{_W}.put: `tensors` must be a non-empty dict of name -> tensor, got {tensors!r:.80}")
        parts = []
        for name, t in tensors.items():
            if not isinstance(name, str) or not name:
                raise TypeError(f"{_W}.put: tensor names must be non-empty strings, got {name!r} (key {key!r})")
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{_W}.put: `tensors[{name!r}]` must be a tensor, got {type(t).__name__} "
                                f"(key {key!r})")
            if str(t.dtype)[6:] not in _STORABLE:
                raise TypeError(f"{_W}.put: `tensors[{name!r}]` has dtype {t.dtype}; storable: "
                                f"{', '.join(_STORABLE)} (key {key!r})")
            t = t.detach()
            c = t.to("cpu", self.dtype if t.is_floating_point() else t.dtype).contiguous()
            if c.is_floating_point() and c.numel() and not bool(torch.isfinite(c).all()):
                bad = int((~torch.isfinite(c)).sum())
                why = (f"NaN/inf already in the teacher's output" if not bool(torch.isfinite(t).all()) else
                       f"max |x| = {float(t.abs().max()):.6g} overflows {c.dtype} (largest finite: "
                       f"{torch.finfo(c.dtype).max:.6g}); rescale it or store in a wider dtype "
                       f"(dtype=torch.bfloat16 or torch.float32)")
                raise ValueError(f"{_W}.put: tensor `{name}` of key {key!r} has {bad} non-finite value(s) after "
                                 f"the cast to {c.dtype}: {why}")
            parts.append((name, c))
        end = self._layout(parts, self._size if self._f is not None else 0)[1]
        if self._f is not None and self._size > 0 and end > self.shard_bytes:
            self._seal()
        if self._f is None:
            self._open_shard()
        offsets, _ = self._layout(parts, self._size)
        self._dirty = True
        metas = []
        for (name, c), off in zip(parts, offsets):
            self._write(bytes(off - self._size))
            self._write(c.reshape(-1).view(torch.uint8).numpy())
            metas.append({"name": name, "dtype": str(c.dtype)[6:], "shape": list(c.shape), "offset": off,
                          "nbytes": c.numel() * c.element_size()})
        self._dirty, self._good = False, self._size
        self._entries.append({"key": key, "aug": json.loads(canon), "tensors": metas})
        self._done.add((key, canon))

    @staticmethod
    def _layout(parts, start: int) -> Tuple[List[int], int]:
        offsets, pos = [], start
        for _, c in parts:
            pos = _align(pos)
            offsets.append(pos)
            pos += c.numel() * c.element_size()
        return offsets, pos

    def _write(self, data) -> None:
        if len(data):
            self._f.write(data)
            self._hash.update(data)
            self._size += len(data) if isinstance(data, bytes) else data.nbytes

    def _open_shard(self) -> None:
        self._stem = _shard_stem(self.rank, self._next)
        self._next += 1
        self._f = open(os.path.join(self.root, self._stem + ".bin"), "wb", buffering=1 << 20)
        self._hash, self._size, self._good, self._dirty, self._entries = hashlib.sha256(), 0, 0, False, []

    def _seal(self) -> None:
        """Flush + fsync the shard, then its manifest (temp, fsync, rename), then the rank index."""
        if self._f is None:
            return
        path = os.path.join(self.root, self._stem + ".bin")
        f, self._f = self._f, None
        if self._dirty:  # an entry failed half-way: cut it off and hash what stays
            try:
                f.close()
            except OSError:
                pass
            with open(path, "r+b") as g:
                g.truncate(self._good)
            self._size, checksum = self._good, _sha256_file(path)
        else:
            f.flush()
            os.fsync(f.fileno())
            f.close()
            checksum = "sha256:" + self._hash.hexdigest()
        if not self._entries:
            os.remove(path)
            return
        man = {"format": FORMAT, "version": VERSION, "fingerprint": self.fingerprint, "rank": self.rank,
               "file": self._stem + ".bin", "bytes": self._size, "alignment": ALIGN, "checksum": checksum,
               "entries": self._entries}
        _write_json_atomic(os.path.join(self.root, self._stem + ".idx"), man)
        self._sealed.append(_shard_record(man))
        self._write_rank_index()

    def close(self) -> None:
        """Seals the last shard and rewrites this rank's index; with world_size 1 also merges
        ``index.json`` (otherwise rank 0 calls :meth:`merge_indexes` after a barrier). Idempotent."""
        if self._closed:
            return
        try:
            self._seal()  # the rank index is rewritten at every seal (and on open)
        finally:
            self._closed = True
            self._unlock()
        if self.world_size == 1:
            self.merge_indexes(self.root, world_size=1)

    def __enter__(self) -> "TeacherCacheWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()  # every entry put so far is whole (a half-written one is cut off), so seal it

    # ---------------------------------------------------------------- merging
    @staticmethod
    def merge_indexes(root, *, world_size: Optional[int] = None) -> str:
        """Merges every ``index-rank*.json`` in root into ``index.json`` (atomically) and returns its
        path. Call it on rank 0 once every rank's writer is closed (after a barrier). With
        ``world_size``, ranks 0..world_size-1 must all have an index. Checks fingerprints, that every
        listed shard exists with its size, and that no (key, aug) is stored twice."""
        root = os.fspath(root)
        owner = f"{_W}.merge_indexes"
        marker = os.path.join(root, "cache.json")
        if not os.path.exists(marker):
            raise FileNotFoundError(f"{owner}: {marker} is missing: {root} is not a teacher cache (no writer opened it)")
        fp = _read_json(marker)["fingerprint"]
        ranks = {}
        for name in sorted(os.listdir(root)):
            m = _RANK_INDEX.match(name)
            if m:
                idx = _read_json(os.path.join(root, name))
                if idx.get("fingerprint") != fp:
                    raise _mismatch(owner, root, idx.get("fingerprint"), fp, name)
                ranks[int(m.group(1))] = idx
        if world_size is not None:
            missing = [r for r in range(check_number(owner, "world_size", world_size, low=1, integer=True))
                       if r not in ranks]
            if missing:
                raise ValueError(f"{owner}: no index for rank(s) {missing} in {root}; did every rank open a writer "
                                 "and close() it before the barrier?")
        shards = [s for r in sorted(ranks) for s in ranks[r]["shards"]]
        seen = {}
        for s in shards:
            man = _check_listed(owner, root, s, fp)
            for e in man["entries"]:
                k = (e["key"], canonical_augmentation(e["aug"]))
                if k in seen:
                    raise ValueError(f"{owner}: key {k[0]!r} with augmentation {k[1]} is stored twice, in "
                                     f"{seen[k]} and {s['file']}; the ranks' data must not overlap")
                seen[k] = s["file"]
        listed = {s["file"] for s in shards}
        extra = [n for n in sorted(os.listdir(root)) if n.endswith(".bin") and n not in listed]
        if extra:
            _log.warning("%s: %d shard file(s) in %s are in no index and will not be read: %s", owner, len(extra),
                         root, ", ".join(extra[:5]) + (" ..." if len(extra) > 5 else ""))
        path = os.path.join(root, "index.json")
        _write_json_atomic(path, {"format": FORMAT, "version": VERSION, "fingerprint": fp, "ranks": sorted(ranks),
                                  "entries": len(seen), "shards": shards})
        return path


def _check_listed(owner: str, root: str, shard: dict, fingerprint: str) -> dict:
    """The manifest of a shard listed in an index, after checking it and the shard's size."""
    man_path, bin_path = os.path.join(root, shard["manifest"]), os.path.join(root, shard["file"])
    if not os.path.exists(man_path):
        raise CacheIntegrityError(man_path, f"the manifest of a listed shard is missing ({owner})")
    man = _read_json(man_path)
    if man.get("fingerprint") != fingerprint:
        raise _mismatch(owner, root, man.get("fingerprint"), fingerprint, f"manifest {shard['manifest']}")
    if man.get("checksum") != shard["checksum"] or man.get("bytes") != shard["bytes"]:
        raise CacheIntegrityError(man_path, f"the manifest does not match the index ({owner}): rewritten after "
                                            "the index was made")
    _check_size(bin_path, man["bytes"], owner)
    return man


def _check_size(path: str, want: int, owner: str) -> None:
    if not os.path.exists(path):
        raise CacheIntegrityError(path, f"the shard file is missing ({owner}); restore it or rebuild the cache")
    size = os.path.getsize(path)
    if size != want:
        raise CacheIntegrityError(path, f"the shard is truncated or overwritten ({owner}): {size} bytes on disk, "
                                        f"the manifest says {want}")


# ============================================================================ reader

class TeacherCache:
    """Reads a teacher cache (the format and guarantees: :mod:`kdops.cache`).

    Args:
        root: the cache directory.
        fingerprint: when given, must be the cache's (ValueError naming both otherwise).
        verify: "lazy" (a shard's checksum when it is first read in this process), "eager" (every
            shard on open) or "none" (sizes only).

    ``len(cache)`` and ``keys()`` count images; ``num_entries`` counts (key, aug) entries;
    ``key in cache`` and ``(key, aug) in cache`` both work.
    """

    def __init__(self, root, *, fingerprint: Optional[str] = None, verify: str = "lazy") -> None:
        self.verify_mode = check_choice(_R, "verify", verify, ("lazy", "eager", "none"))
        if fingerprint is not None and (not isinstance(fingerprint, str) or not fingerprint):
            raise TypeError(f"{_R}: `fingerprint` must be None or a non-empty string, got {fingerprint!r}")
        self.root = os.fspath(root)
        merged = os.path.join(self.root, "index.json")
        if os.path.exists(merged):
            indexes = {"index.json": _read_json(merged)}
        else:
            indexes = {n: _read_json(os.path.join(self.root, n)) for n in sorted(os.listdir(self.root))
                       if _RANK_INDEX.match(n)} if os.path.isdir(self.root) else {}
        if not indexes:
            raise FileNotFoundError(f"{_R}: {self.root} has no index.json and no index-rank*.json: no shard was "
                                    "sealed there (is it the output directory of a caching run?)")
        fps = {idx.get("fingerprint") for idx in indexes.values()}
        if len(fps) != 1:
            raise ValueError(f"{_R}: the indexes in {self.root} disagree on the fingerprint ({sorted(map(str, fps))})"
                             "; the directory mixes two caches")
        self.fingerprint = fps.pop()
        if fingerprint is not None and fingerprint != self.fingerprint:
            raise ValueError(f"{_R}: {self.root} was made with fingerprint {self.fingerprint!r}, but "
                             f"{fingerprint!r} was asked for: the cache was made with another teacher, teacher "
                             "weights or cached-output settings; rebuild it for this configuration")
        self._shards, self._entries, self._keys_order = [], {}, []
        for idx in indexes.values():
            for s in idx["shards"]:
                self._add_shard(s, _check_listed(_R, self.root, s, self.fingerprint))
        self._verified, self._lock = set(), threading.Lock()
        if self.verify_mode == "eager":
            self.verify()

    def _add_shard(self, s: dict, man: dict) -> None:
        sid, size = len(self._shards), man["bytes"]
        self._shards.append({"path": os.path.join(self.root, s["file"]), "bytes": size, "checksum": s["checksum"]})
        for e in man["entries"]:
            metas = []
            for t in e["tensors"]:
                dt = _STORABLE.get(t["dtype"])
                if dt is None or t["offset"] % ALIGN or t["offset"] + t["nbytes"] > size or \
                        math.prod(t["shape"]) * _ITEMSIZE[t["dtype"]] != t["nbytes"]:
                    raise CacheIntegrityError(os.path.join(self.root, s["manifest"]),
                                              f"entry {e['key']!r} tensor {t['name']!r} is not a valid record: {t}")
                metas.append((sys.intern(t["name"]), dt, tuple(t["shape"]), t["offset"], t["nbytes"]))
            lo = min((m[3] for m in metas), default=0)
            hi = max((m[3] + m[4] for m in metas), default=0)
            canon = canonical_augmentation(e["aug"])
            augs = self._entries.get(e["key"])
            if augs is None:
                augs = self._entries[e["key"]] = {}
                self._keys_order.append(e["key"])
            if canon in augs:
                raise ValueError(f"{_R}: key {e['key']!r} with augmentation {canon} is stored twice (in "
                                 f"{self._shards[augs[canon][0]]['path']} and {s['file']})")
            augs[canon] = (sid, lo, hi, tuple(metas))

    # ---------------------------------------------------------------- integrity
    def verify(self) -> int:
        """Checks every shard's checksum now; returns how many shards were checked."""
        for sid in range(len(self._shards)):
            self._verify(sid)
        return len(self._shards)

    def _verify(self, sid: int) -> None:
        s = self._shards[sid]
        with self._lock:
            if sid in self._verified:
                return
            _check_size(s["path"], s["bytes"], _R)
            got = _sha256_file(s["path"])
            if got != s["checksum"]:
                raise CacheIntegrityError(s["path"], f"checksum mismatch: the file hashes to {got}, its manifest "
                                                     f"says {s['checksum']}; the shard is corrupt, rebuild it")
            self._verified.add(sid)

    def _map(self, sid: int, lo: int, hi: int) -> np.ndarray:
        """A private copy-on-write map of bytes [lo, hi) of a shard: its pages come from the page cache
        until written, writes never reach the file nor another get()'s tensors, and torch gets a
        writable array (no warning). One map per get: no shard stays mapped after its tensors die."""
        s = self._shards[sid]
        if self.verify_mode == "lazy":
            self._verify(sid)
        _check_size(s["path"], s["bytes"], _R)  # also when verified: a file cut since would SIGBUS
        return np.memmap(s["path"], dtype=np.uint8, mode="c", offset=lo, shape=(hi - lo,)) if hi > lo else \
            np.zeros(0, np.uint8)

    # ---------------------------------------------------------------- lookups
    def _augs(self, key) -> dict:
        augs = self._entries.get(_check_key(_R, key))
        if augs is None:
            some = ", ".join(repr(k) for k in self._keys_order[:3])
            raise _KeyError(f"{_R}: key {key!r} is not in the cache ({len(self._entries)} keys, e.g. {some})")
        return augs

    def get(self, key: str, aug: dict, *, copy: bool = False) -> Dict[str, torch.Tensor]:
        """The tensors of (key, aug), as stored (floating ones in the cache's dtype): zero-copy
        copy-on-write views of the shard's memory map, or owned tensors with ``copy=True``."""
        augs, canon = self._augs(key), canonical_augmentation(aug, owner=f"{_R}.get")
        hit = augs.get(canon)
        if hit is None:
            raise _KeyError(f"{_R}.get: key {key!r} has no entry for augmentation {canon}; recorded for it: "
                            f"{', '.join(augs)}. In offline mode replay a recorded augmentation "
                            "(cache.sample_augmentation(key, rng)) instead of drawing a new one")
        sid, lo, hi, metas = hit
        buf = self._map(sid, lo, hi)
        out = {}
        for name, dt, shape, off, nbytes in metas:
            t = torch.from_numpy(buf[off - lo:off - lo + nbytes]).view(dt).view(shape)
            out[name] = t.clone() if copy else t
        return out

    def augmentations(self, key: str) -> List[dict]:
        """The augmentation records stored for key (canonical form, in writing order)."""
        return [json.loads(c) for c in self._augs(key)]

    def sample_augmentation(self, key: str, rng=None) -> dict:
        """One of key's recorded augmentations, uniformly: rng is None (the ``random`` module),
        a ``random.Random``, a ``numpy.random.Generator`` / ``RandomState`` or a ``torch.Generator``."""
        augs = list(self._augs(key))
        n = len(augs)
        if rng is None:
            i = random.randrange(n)
        elif isinstance(rng, torch.Generator):
            i = int(torch.randint(n, (1,), generator=rng))
        elif hasattr(rng, "integers"):
            i = int(rng.integers(n))
        elif hasattr(rng, "randrange"):
            i = rng.randrange(n)
        elif hasattr(rng, "randint"):
            i = int(rng.randint(n))
        else:
            raise TypeError(f"{_R}.sample_augmentation: `rng` must be None, random.Random, a numpy Generator/"
                            f"RandomState or a torch.Generator, got {type(rng).__name__}")
        return json.loads(augs[i])

    def __contains__(self, item) -> bool:
        if isinstance(item, str):
            return item in self._entries
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], dict):
            return canonical_augmentation(item[1]) in self._entries.get(item[0], {})
        return False

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> List[str]:
        """The image keys, in the order their first entry was indexed."""
        return list(self._keys_order)

    def entries(self) -> Iterator[Tuple[str, dict]]:
        """Every (key, aug) entry."""
        for key in self._keys_order:
            for canon in self._entries[key]:
                yield key, json.loads(canon)

    @property
    def num_entries(self) -> int:
        """The number of (key, aug) entries."""
        return sum(len(a) for a in self._entries.values())

    def bytes_per_image(self) -> Dict[str, object]:
        """Mean stored bytes per (key, aug) entry: ``{"entry": payload bytes, "tensors": {name: bytes},
        "on_disk": shard bytes incl. alignment padding, "entries": count}``. A name's value is its total
        over all entries divided by the number of entries, so the names add up to ``"entry"``."""
        n, per = self.num_entries, {}
        for augs in self._entries.values():
            for _, _, _, metas in augs.values():
                for name, _, _, _, nbytes in metas:
                    per[name] = per.get(name, 0) + nbytes
        d = max(n, 1)
        return {"entry": sum(per.values()) / d, "tensors": {k: v / d for k, v in per.items()},
                "on_disk": sum(s["bytes"] for s in self._shards) / d, "entries": n}

    def __getstate__(self):  # picklable for spawned DataLoader workers (a lock is not)
        state = dict(self.__dict__)
        state["_lock"] = None
        return state

    def __setstate__(self, state) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (f"TeacherCache({self.root!r}, {len(self)} keys, {self.num_entries} entries, {len(self._shards)} "
                f"shards, fingerprint={self.fingerprint!r}, verify={self.verify_mode!r})")
