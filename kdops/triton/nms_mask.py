"""Triton kernels of kdops::nms_mask_fwd (the CUDA backend of kdops.nms_mask).

keep[g,i] = valid[g,i] and no j < i has keep[g,j] and IoU(box[g,j], box[g,i]) > iou_threshold.

Two launches, nothing read on the host, no atomics (deterministic):

- ``_iou_mask_kernel``: the suppression bitmask, in parallel. Bit b of int32 word w of row i of
  group g is ``j > i and IoU(i, j) > thr`` for j = 32 w + b (j < K). One program per (group x block
  of BLOCK_I rows, block of BLOCK_W words): a [BLOCK_I, BLOCK_W, 32] tile of float64 IoUs,
  torchvision's CPU formula term for term (its ``std::max(a, b)`` is ``tl.where(a < b, b, a)``
  here, NaN for NaN; IEEE fp64 division; no fused multiply-adds, ``enable_fp_fusion=False``), so
  every bit is the comparison the C++ kernel and the reference make. Bits are packed by a sum of
  distinct powers of two (exact, no carries). Tiles whose words all lie left of their first row's
  diagonal word (j < 32 * (i // 32)) are never read by the scan: those programs exit at once, and
  those words stay unwritten.
- ``_scan_kernel``: one program per group walks the rows in order, 32 (one word) at a time, with
  the ``removed`` bit-words of the group (ceil(K/32) of them, padded to BLOCK_W) held in
  registers. For word c: its removed bits and the rows' valid bits give each of the 32 rows in
  turn (keep_r = valid_r and not removed_r; a kept row ORs its own word c into the running word),
  then the words after c of the kept rows only are loaded and ORed into ``removed``: of a row
  that is not kept only its diagonal word is read (none of an invalid row), and no row's words
  before its diagonal.

The bitmask is G*K*ceil(K/32)*4 bytes (G=10 groups of K=2000: 5 MB; G=2, K=10000: 25 MB), more than
the boxes when K > 128: the one intermediate larger than the inputs, as torchvision's CUDA NMS has.
``removed`` is ~4 words per thread (1 to 8 warps; more words per thread beyond K = 32768), and the
update loads 8 rows at a time: ptxas reports no spills for sm_90 up to K = 65536 (146 registers at
K = 16384, where the bitmask is 32 MiB per group; 512 MiB per group at K = 65536).
"""
from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from . import INTERPRET, device_guard


@triton.jit
def _load_boxes(base, offs, mask):
    """x1, y1, x2, y2 of the boxes at element offsets ``offs`` (4 per box), in float64 (fp16 / bf16
    widen through fp32, Triton's cast: exact, like every float type into fp64); 0 where masked."""
    x1 = tl.load(base + offs, mask=mask, other=0).to(tl.float64)
    y1 = tl.load(base + offs + 1, mask=mask, other=0).to(tl.float64)
    x2 = tl.load(base + offs + 2, mask=mask, other=0).to(tl.float64)
    y2 = tl.load(base + offs + 3, mask=mask, other=0).to(tl.float64)
    return x1, y1, x2, y2


@triton.jit
def _iou_mask_kernel(box_ptr, thr_bits, mask_ptr, K, W, n_row_blocks, BLOCK_I: tl.constexpr, BLOCK_W: tl.constexpr):
    pid = tl.program_id(0)
    g = (pid // n_row_blocks).to(tl.int64)
    i0 = (pid % n_row_blocks) * BLOCK_I
    w0 = tl.program_id(1) * BLOCK_W
    # the scan reads row i's words from i // 32 on: a tile left of its first row's word is never read
    if (w0 + BLOCK_W) * 32 > i0:
        thr = tl.cast(thr_bits, tl.int64).to(tl.float64, bitcast=True)  # the threshold's exact float64
        base = box_ptr + g * K * 4
        rows = i0 + tl.arange(0, BLOCK_I)
        rm = rows < K
        ri = rows.to(tl.int64) * 4
        ix1, iy1, ix2, iy2 = _load_boxes(base, ri, rm)
        words = w0 + tl.arange(0, BLOCK_W)
        lanes = tl.arange(0, 32)
        cols = words[:, None] * 32 + lanes[None, :]  # [BLOCK_W, 32]: candidate j of each bit
        cm = cols < K
        cj = cols.to(tl.int64) * 4
        jx1, jy1, jx2, jy2 = _load_boxes(base, cj, cm)
        iarea = ((ix2 - ix1) * (iy2 - iy1))[:, None, None]
        jarea = ((jx2 - jx1) * (jy2 - jy1))[None, :, :]
        ix1, iy1, ix2, iy2 = ix1[:, None, None], iy1[:, None, None], ix2[:, None, None], iy2[:, None, None]
        jx1, jy1, jx2, jy2 = jx1[None, :, :], jy1[None, :, :], jx2[None, :, :], jy2[None, :, :]
        # torchvision: xx1 = std::max(ix1, x1[j]), xx2 = std::min(ix2, x2[j]), w = std::max(0, xx2 - xx1)
        xx1 = tl.where(ix1 < jx1, jx1, ix1)
        yy1 = tl.where(iy1 < jy1, jy1, iy1)
        xx2 = tl.where(jx2 < ix2, jx2, ix2)
        yy2 = tl.where(jy2 < iy2, jy2, iy2)
        dw = xx2 - xx1
        dh = yy2 - yy1
        w = tl.where(0.0 < dw, dw, 0.0)
        h = tl.where(0.0 < dh, dh, 0.0)
        inter = w * h
        iou = inter / (iarea + jarea - inter)
        hit = (iou > thr) & (cols[None, :, :] > rows[:, None, None]) & cm[None, :, :]
        bit = tl.full([32], 1, tl.int32) << lanes
        packed = tl.sum(tl.where(hit, bit[None, None, :], 0), axis=2)  # [BLOCK_I, BLOCK_W] int32
        out = mask_ptr + g * K * W + rows.to(tl.int64)[:, None] * W + words[None, :]
        tl.store(out, packed, mask=rm[:, None] & (words < W)[None, :])


@triton.jit
def _scan_kernel(mask_ptr, valid_ptr, keep_ptr, K, W, BLOCK_W: tl.constexpr, ROWS: tl.constexpr):
    g = tl.program_id(0).to(tl.int64)
    words = tl.arange(0, BLOCK_W)
    lanes = tl.arange(0, 32)
    bit = tl.full([32], 1, tl.int32) << lanes
    removed = tl.zeros([BLOCK_W], dtype=tl.int32)
    group = mask_ptr + g * K * W
    for c in range(0, W):
        r0 = tl.cast(c, tl.int64) * 32
        rows = r0 + lanes
        rm = rows < K
        cur = tl.sum(tl.where(words == c, removed, 0), axis=0)  # the removed bits of rows r0 .. r0+31
        v = tl.load(valid_ptr + g * K + rows, mask=rm, other=0)
        vbits = tl.sum(tl.where(v != 0, bit, 0), axis=0)
        kept = cur * 0
        for r in tl.static_range(32):
            # row r0 + r's own word c: the later rows of this word it suppresses (read when the row is
            # valid, kept or not: independent of the chain, so the 32 loads are issued up front)
            d = tl.load(group + (r0 + r) * W + c, mask=(r0 + r < K) & (((vbits >> r) & 1) != 0), other=0)
            k = (vbits >> r) & ((cur >> r) ^ 1) & 1  # valid and not removed
            cur = cur | (d & (0 - k))
            kept = kept | (k << r)
        tl.store(keep_ptr + g * K + rows, ((kept >> lanes) & 1).to(tl.uint8), mask=rm)
        later = (words > c) & (words < W)
        # the kept rows' words after c (other rows are not read), ROWS loads in flight at a time:
        # all 32 at once would hold 32 row slices in registers
        for q in range(0, 32, ROWS):
            for r in tl.static_range(ROWS):
                row = tl.load(group + (r0 + q + r) * W + words, mask=later & (((kept >> (q + r)) & 1) != 0),
                              other=0)
                removed = removed | row


def _mask_blocks(K: int):
    """(BLOCK_I, BLOCK_W, num_warps) of the bitmask kernel: 512 IoUs per program on a GPU (fp64
    temporaries stay in registers); big tiles under the interpreter (~5 ms per program there)."""
    if INTERPRET:
        return 64, 4, 4
    return 16, 1, 4


def _scan_warps(block_w: int) -> int:
    """Warps of the scan: ~4 words of ``removed`` per thread (8 loads of 4 in flight: 32 registers,
    no spills at K = 16384 on sm_90), up to 8 warps (K > 32768: more words per thread)."""
    return max(1, min(8, block_w // 128))


def _check(boxes, valid):
    """The C++ kernel's argument checks (shapes, dtypes, devices: metadata only, nothing read on the
    host): the kernels index valid and keep by the boxes' (G,K)."""
    op = "kdops::nms_mask_fwd"
    if boxes.dim() != 3 or boxes.shape[2] != 4:
        raise RuntimeError(f"{op}: boxes must be (G,K,4) x1, y1, x2, y2, got {list(boxes.shape)}")
    if not boxes.is_floating_point():
        raise RuntimeError(f"{op}: boxes must be floating, got {boxes.dtype}")
    G, K = boxes.shape[0], boxes.shape[1]
    if valid.shape != (G, K) or valid.dtype != torch.bool:
        raise RuntimeError(f"{op}: valid must be (G,K) = ({G},{K}) bool, got {list(valid.shape)} {valid.dtype}")
    if valid.device != boxes.device:
        raise RuntimeError(f"{op}: valid is on {valid.device} but boxes on {boxes.device}")


def nms_mask_fwd(boxes, valid, iou_threshold):
    """Same contract as the kdops::nms_mask_fwd schema (csrc/ops.cpp)."""
    _check(boxes, valid)
    G, K = boxes.shape[0], boxes.shape[1]
    keep = torch.empty((G, K), dtype=torch.bool, device=boxes.device)
    if G * K == 0:
        return keep
    W = triton.cdiv(K, 32)
    b = boxes.contiguous()
    v = valid.contiguous().view(torch.uint8)
    # the float64 threshold as its bit pattern (Triton passes Python floats as float32): exact, and no
    # host-to-device copy
    thr_bits = struct.unpack("<q", struct.pack("<d", float(iou_threshold)))[0]
    mask = torch.empty((G, K, W), dtype=torch.int32, device=boxes.device)
    BLOCK_I, BLOCK_WM, warps = _mask_blocks(K)
    n_row_blocks = triton.cdiv(K, BLOCK_I)
    block_w = max(triton.next_power_of_2(W), 2)
    with device_guard(boxes):
        _iou_mask_kernel[(G * n_row_blocks, triton.cdiv(W, BLOCK_WM))](
            b, thr_bits, mask, K, W, n_row_blocks, BLOCK_I=BLOCK_I, BLOCK_W=BLOCK_WM,
            num_warps=warps, enable_fp_fusion=False)
        _scan_kernel[(G,)](mask, v, keep.view(torch.uint8), K, W, BLOCK_W=block_w, ROWS=8,
                           num_warps=_scan_warps(block_w))
    return keep
