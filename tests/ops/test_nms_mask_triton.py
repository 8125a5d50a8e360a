"""The Triton kernels of kdops::nms_mask_fwd (kdops/triton/nms_mask.py) against the eager reference
(kdops/reference/nms_mask.py), torchvision's nms and hand-computed masks.

Run under TRITON_INTERPRET=1 on the CPU (make test) or on a GPU. The launcher is called directly
(not kdops.nms_mask, whose CPU kernel may not be built). Shapes are small (K up to 300): the
interpreter costs about a millisecond per program instance and the scan walks its rows one by one.
"""
from __future__ import annotations

import math

import pytest
import torch
from box_helpers import clustered_boxes, random_valid, torchvision_keep
from helpers import deterministic_algorithms, triton_device

from kdops.reference.nms_mask import nms_mask as reference

# NaN / inf boxes: numpy warns about its inf / NaN arithmetic under the interpreter
pytestmark = [pytest.mark.triton, pytest.mark.filterwarnings("ignore::RuntimeWarning")]

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def run(boxes, thr, valid=None):
    from kdops.triton.nms_mask import nms_mask_fwd

    dev = triton_device()
    G, K = boxes.shape[:2]
    valid = torch.ones(G, K, dtype=torch.bool) if valid is None else valid
    return nms_mask_fwd(boxes.to(dev), valid.to(dev), thr).cpu()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("G,K", [(3, 37), (2, 64), (1, 97)])
def test_matches_reference_and_torchvision(dtype, G, K):
    boxes = clustered_boxes(G, K, seed=K, dtype=dtype)
    valid = random_valid(G, K, seed=K + 1)
    for thr in (0.0, 0.5, 0.7, 1.0):
        got = run(boxes, thr, valid)
        assert got.shape == (G, K) and got.dtype == torch.bool
        assert torch.equal(got, reference(boxes, thr, valid)), thr
        assert torch.equal(got, torchvision_keep(boxes.double(), thr, valid)), thr


def test_gpu_tiles_and_several_words_per_row(monkeypatch):
    # the GPU's bitmask tiles (16 rows x 1 word: most tiles left of the diagonal are skipped) and
    # the interpreter's (64 x 4), on K = 300 (10 words per row, 3 word blocks): the same mask
    from kdops.triton import nms_mask as mod

    boxes = clustered_boxes(2, 300, seed=7, dtype=torch.float32, spread=6.0)
    valid = random_valid(2, 300, seed=8)
    want = reference(boxes, 0.6, valid)
    assert torch.equal(run(boxes, 0.6, valid), want)
    monkeypatch.setattr(mod, "_mask_blocks", lambda K: (16, 1, 4))
    assert torch.equal(run(boxes, 0.6, valid), want)
    assert 0.2 < want[valid].float().mean() < 0.9


def test_unwritten_bitmask_words_are_never_read(monkeypatch):
    # the words the bitmask kernel skips are left as torch.empty gives them: fill them with ones
    # (every bit "suppress") and the result must not change
    from kdops.triton import nms_mask as mod

    real_empty = torch.empty

    def ones_empty(*shape, dtype=None, device=None, **kw):
        t = real_empty(*shape, dtype=dtype, device=device, **kw)
        return t.fill_(-1) if dtype == torch.int32 else t

    boxes = clustered_boxes(2, 200, seed=9)
    want = reference(boxes, 0.5)
    monkeypatch.setattr(mod.torch, "empty", ones_empty)
    monkeypatch.setattr(mod, "_mask_blocks", lambda K: (16, 1, 4))
    assert torch.equal(run(boxes, 0.5), want)


def test_duplicates_ties_and_degenerate_boxes():
    A, B, C = [0.0, 0.0, 4.0, 1.0], [0.0, 0.0, 3.0, 1.0], [0.0, 0.0, 2.0, 1.0]  # IoU(A,B) = 3/4, IoU(A,C) = 1/2
    boxes = torch.tensor([[A, B, A, C], [[5.0, 5.0, 3.0, 8.0], [2.0, 2.0, 2.0, 2.0], [2.0, 2.0, 2.0, 2.0], A]])
    cases = {0.75: [[True, True, False, True], [True] * 4], 0.5: [[True, False, False, True], [True] * 4],
             0.4: [[True, False, False, False], [True] * 4], 1.0: [[True] * 4, [True] * 4]}
    for thr, want in cases.items():
        assert run(boxes, thr).tolist() == want, thr
    valid = torch.tensor([[False, True, True, True], [True, True, True, True]])
    assert run(boxes, 0.7, valid)[0].tolist() == [False, True, False, True]


def test_threshold_and_iou_are_float64():
    # IoU(A, B) = 69999999 / 1e8 = 0.69999999: below 0.7, above float32(0.7) = 0.699999988 (a
    # threshold rounded to float32 would suppress B)
    boxes = torch.tensor([[[0.0, 0.0, 1e8, 1.0], [0.0, 0.0, 69999999.0, 1.0]]], dtype=torch.float64)
    assert run(boxes, 0.7).tolist() == [[True, True]]
    assert run(boxes, 0.6999999).tolist() == [[True, False]]
    # in float32 B's x2 rounds to 7e7: the IoU is float64's 0.7 itself, not above the threshold
    assert run(boxes.float(), 0.7).tolist() == reference(boxes.float(), 0.7).tolist() == [[True, True]]
    assert run(boxes.float(), 0.6999999).tolist() == [[True, False]]


def test_non_finite_boxes_and_thresholds():
    nan, inf = math.nan, math.inf
    b = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [nan, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0],
                       [0.0, 0.0, 10.0, nan], [-inf, 0.0, inf, 10.0], [0.0, 0.0, 10.0, 10.0],
                       [-inf, -inf, inf, inf], [-inf, -inf, inf, inf]]])
    assert run(b, 0.5)[0].tolist() == [True, True, False, True, True, False, True, True]
    assert run(b, nan).all()  # no IoU is above NaN
    assert run(b, -1.0).tolist() == reference(b, -1.0).tolist()


def test_empty_one_candidate_all_invalid_and_reproducible():
    assert run(torch.zeros(0, 5, 4), 0.5).shape == (0, 5)
    assert run(torch.zeros(3, 0, 4), 0.5).shape == (3, 0)
    boxes = clustered_boxes(3, 40, seed=3)
    assert run(boxes[:, :1], 0.5).tolist() == [[True]] * 3
    assert not run(boxes, 0.5, torch.zeros(3, 40, dtype=torch.bool)).any()
    valid = random_valid(3, 40, seed=4)
    first = run(boxes, 0.5, valid)
    with deterministic_algorithms():
        assert torch.equal(run(boxes, 0.5, valid), first)


def test_non_contiguous_inputs():
    boxes = clustered_boxes(4, 50, seed=5)
    valid = random_valid(4, 50, seed=6)
    b, v = boxes.transpose(0, 1).contiguous().transpose(0, 1)[::2], valid.t().contiguous().t()[::2]
    assert not b.is_contiguous() and not v.is_contiguous()
    assert torch.equal(run(b, 0.5, v), reference(b, 0.5, v))
