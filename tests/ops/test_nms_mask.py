"""kdops.nms_mask against torchvision.ops.nms (the peer, run per group on the valid boxes), the eager
reference (kdops/reference/nms_mask.py) and hand-computed masks. The raw op on hostile inputs (NaN,
inf, huge, degenerate boxes, any threshold) is fuzzed in test_raw_ops_fuzz.py, on every backend."""
import math
import re

import pytest
import torch
from box_helpers import clustered_boxes, random_valid, torchvision_keep
from helpers import assert_same_across_thread_counts

import kdops
from kdops import reference

needs_c = pytest.mark.skipif(not kdops.HAS_C, reason="needs the compiled CPU kernels")
THRESHOLDS = [0.0, 0.5, 0.7, 1.0]


@needs_c
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("thr", THRESHOLDS)
def test_matches_torchvision_on_clustered_boxes(dtype, thr):
    G, K = 6, 157
    boxes = clustered_boxes(G, K, seed=3, dtype=dtype)
    valid = random_valid(G, K, seed=4)
    got = kdops.nms_mask(boxes, thr, valid)
    want = torchvision_keep(boxes, thr, valid)
    assert got.dtype == torch.bool and got.shape == (G, K)
    assert torch.equal(got, want)
    assert torch.equal(kdops.nms_mask(boxes, thr), torchvision_keep(boxes, thr))
    if thr == 0.5:  # the clusters really overlap: NMS keeps some and drops many
        assert 0.1 < got[valid].float().mean() < 0.9


@needs_c
def test_float32_matches_torchvision_in_float32_away_from_ties():
    # torchvision computes float32 boxes in float32; with continuous random boxes no IoU rounds
    # across the threshold, so its own float32 answer is the same
    tv = pytest.importorskip("torchvision.ops")
    boxes = clustered_boxes(3, 200, seed=5, dtype=torch.float32)
    got = kdops.nms_mask(boxes, 0.6)
    for g in range(3):
        kept = tv.nms(boxes[g], -torch.arange(200, dtype=torch.float32), 0.6)
        assert torch.equal(got[g].nonzero()[:, 0], kept.sort()[0])


@needs_c
@pytest.mark.parametrize("G,K", [(1, 1), (2, 3), (3, 31), (2, 32), (2, 33), (4, 97), (1, 300)])
def test_matches_the_reference_at_odd_sizes(G, K):
    boxes = clustered_boxes(G, K, seed=K, dtype=torch.float32, spread=6.0)
    valid = random_valid(G, K, seed=K + 1, p=0.7)
    for thr in (0.3, 0.65):
        assert torch.equal(kdops.nms_mask(boxes, thr, valid), reference.nms_mask(boxes, thr, valid))


@needs_c
def test_non_contiguous_boxes_and_valid():
    boxes = clustered_boxes(8, 60, seed=9)
    valid = random_valid(8, 60, seed=10)
    b, v = boxes.transpose(0, 1).contiguous().transpose(0, 1)[::2], valid.t().contiguous().t()[::2]
    assert not b.is_contiguous() and not v.is_contiguous()
    assert torch.equal(kdops.nms_mask(b, 0.5, v), torchvision_keep(b, 0.5, v))


@needs_c
def test_duplicates_and_exact_tie_ious():
    # A (area 4) and B (area 3, inside A): IoU(A, B) = 3 / 4 exactly; A2 duplicates A (IoU 1)
    A, B = [0.0, 0.0, 4.0, 1.0], [0.0, 0.0, 3.0, 1.0]
    C = [0.0, 0.0, 2.0, 1.0]  # IoU(A, C) = 1/2, IoU(B, C) = 2/3
    boxes = torch.tensor([[A, B, A, C]], dtype=torch.float64)
    cases = {
        0.75: [True, True, False, True],    # B's IoU with A is exactly 0.75: not above, kept; C: 0.5, 2/3
        0.7: [True, False, False, True],    # B suppressed by A; C (0.5 with A) kept
        0.5: [True, False, False, True],    # C's IoU with A is exactly 0.5: kept
        0.4: [True, False, False, False],
        1.0: [True, True, True, True],      # nothing is above 1, not even a duplicate
    }
    for thr, want in cases.items():
        got = kdops.nms_mask(boxes, thr)
        assert got[0].tolist() == want, thr
        assert torch.equal(got, torchvision_keep(boxes, thr)), thr
    # the invalid A is skipped: its duplicate takes its place and suppresses B
    got = kdops.nms_mask(boxes, 0.7, torch.tensor([[False, True, True, True]]))
    assert got[0].tolist() == [False, True, False, True]  # B kept first, A2 (IoU 0.75 with B) suppressed


@needs_c
def test_threshold_and_iou_are_float64():
    # IoU = 69999999 / 1e8 = 0.69999999: below 0.7, above float32(0.7) = 0.699999988
    boxes = torch.tensor([[[0.0, 0.0, 1e8, 1.0], [0.0, 0.0, 69999999.0, 1.0]]], dtype=torch.float64)
    assert kdops.nms_mask(boxes, 0.7).tolist() == [[True, True]]
    assert kdops.nms_mask(boxes, 0.6999999).tolist() == [[True, False]]
    assert torch.equal(kdops.nms_mask(boxes, 0.7), torchvision_keep(boxes, 0.7))


@needs_c
def test_degenerate_and_empty_boxes():
    boxes = torch.tensor([[[0.0, 0.0, 10.0, 10.0],
                           [5.0, 5.0, 3.0, 8.0],     # x2 < x1: intersects nothing
                           [2.0, 2.0, 2.0, 2.0],     # a point: area 0
                           [2.0, 2.0, 2.0, 2.0],     # the same point: IoU 0/0 = NaN, not suppressed
                           [6.0, 6.0, 4.0, 4.0],     # inverted both ways: area +4, intersects nothing
                           [1.0, 1.0, 9.0, 9.0]]], dtype=torch.float64)  # IoU 0.64 with the first
    for thr, last in ((0.0, False), (0.5, False), (0.7, True)):
        got = kdops.nms_mask(boxes, thr)
        assert got[0].tolist() == [True, True, True, True, True, last], thr
        assert torch.equal(got, torchvision_keep(boxes, thr)), thr


@needs_c
@pytest.mark.parametrize("G,K", [(0, 5), (3, 0), (0, 0)])
def test_empty_groups_or_candidates(G, K):
    out = kdops.nms_mask(torch.zeros(G, K, 4), 0.5)
    assert out.shape == (G, K) and out.dtype == torch.bool
    out = kdops.nms_mask(torch.zeros(G, K, 4), 0.5, torch.zeros(G, K, dtype=torch.bool))
    assert out.shape == (G, K) and out.dtype == torch.bool


@needs_c
def test_one_candidate_and_all_invalid():
    boxes = clustered_boxes(3, 20, seed=2)
    assert kdops.nms_mask(boxes[:, :1], 0.5).tolist() == [[True]] * 3
    assert kdops.nms_mask(boxes[:, :1], 0.5, torch.tensor([[True], [False], [True]])).tolist() == [[True], [False],
                                                                                                     [True]]
    none = kdops.nms_mask(boxes, 0.5, torch.zeros(3, 20, dtype=torch.bool))
    assert not none.any()


@needs_c
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_give_torchvisions_mask_of_the_upcast_values(dtype):
    boxes = clustered_boxes(4, 120, seed=11, dtype=dtype)
    valid = random_valid(4, 120, seed=12)
    for thr in THRESHOLDS:
        got = kdops.nms_mask(boxes, thr, valid)
        assert torch.equal(got, torchvision_keep(boxes.double(), thr, valid)), thr
        assert torch.equal(got, kdops.nms_mask(boxes.double(), thr, valid)), thr


@needs_c
def test_boxes_requiring_grad_give_a_plain_mask():
    boxes = clustered_boxes(2, 30, seed=13, dtype=torch.float32).requires_grad_()
    out = kdops.nms_mask(boxes, 0.5)
    assert out.dtype == torch.bool and not out.requires_grad and out.grad_fn is None
    assert torch.equal(out, torchvision_keep(boxes.detach(), 0.5))


@needs_c
def test_same_result_for_any_thread_count():
    boxes = clustered_boxes(24, 90, seed=14, dtype=torch.float32)
    valid = random_valid(24, 90, seed=15)
    want = torchvision_keep(boxes, 0.6, valid)

    def run():
        out = kdops.nms_mask(boxes, 0.6, valid)
        assert torch.equal(out, want)
        return (out,)

    assert_same_across_thread_counts(run)


@needs_c
def test_torch_compile_fullgraph():
    boxes = clustered_boxes(3, 50, seed=16, dtype=torch.float32)
    valid = random_valid(3, 50, seed=17)

    def f(b, v):
        keep = kdops.nms_mask(b, 0.5, v)
        return keep, (keep.float() * b[..., 0]).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    keep, s = compiled(boxes, valid)
    want = torchvision_keep(boxes, 0.5, valid)
    assert torch.equal(keep, want)
    torch.testing.assert_close(s, (want.float() * boxes[..., 0]).sum())


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        out = kdops.nms_mask(torch.empty(5, 7, 4, dtype=torch.bfloat16), 0.5,
                             torch.empty(5, 7, dtype=torch.bool))
        assert out.shape == (5, 7) and out.dtype == torch.bool


def test_bad_inputs_name_the_argument():
    b = torch.zeros(2, 3, 4)
    cases = [
        (TypeError, "`boxes` must be a torch.Tensor", lambda: kdops.nms_mask([[0, 0, 1, 1]], 0.5)),
        (ValueError, "`boxes` must be 3-D", lambda: kdops.nms_mask(torch.zeros(3, 4), 0.5)),
        (ValueError, "`boxes` must have shape (G,K,4)", lambda: kdops.nms_mask(torch.zeros(2, 3, 5), 0.5)),
        (TypeError, "`boxes` must have dtype in", lambda: kdops.nms_mask(torch.zeros(2, 3, 4, dtype=torch.int64),
                                                                         0.5)),
        (TypeError, "`iou_threshold` must be a number", lambda: kdops.nms_mask(b, "0.5")),
        (TypeError, "`iou_threshold` must be a number", lambda: kdops.nms_mask(b, True)),
        (TypeError, "`iou_threshold` must be a number", lambda: kdops.nms_mask(b, torch.tensor(0.5))),
        (ValueError, "`iou_threshold` must be a finite number >= 0 and <= 1", lambda: kdops.nms_mask(b, 1.5)),
        (ValueError, "`iou_threshold` must be a finite number >= 0 and <= 1", lambda: kdops.nms_mask(b, -0.1)),
        (ValueError, "`iou_threshold` must be a finite number", lambda: kdops.nms_mask(b, math.nan)),
        (TypeError, "`valid` must be a torch.Tensor", lambda: kdops.nms_mask(b, 0.5, [[True] * 3] * 2)),
        (TypeError, "`valid` must have dtype in (bool)", lambda: kdops.nms_mask(b, 0.5, torch.ones(2, 3))),
        (ValueError, "`valid` must be 2-D", lambda: kdops.nms_mask(b, 0.5, torch.ones(6, dtype=torch.bool))),
        (ValueError, "`valid` must have shape (2, 3)", lambda: kdops.nms_mask(b, 0.5, torch.ones(3, 2,
                                                                                                  dtype=torch.bool))),
    ]
    for exc, msg, call in cases:
        with pytest.raises(exc, match=re.escape(msg)) as e:
            call()
        assert str(e.value).startswith("kdops.nms_mask: "), str(e.value)
    with pytest.raises(ValueError, match=re.escape("`valid` is on meta but the other inputs are on cpu")):
        kdops.nms_mask(b, 0.5, torch.ones(2, 3, dtype=torch.bool, device="meta"))


@needs_c
def test_non_finite_boxes_are_kept_and_suppress_nothing():
    # a NaN coordinate makes every IoU of its box NaN (not above the threshold): kept, suppresses
    # nothing; an infinite box's IoUs are 0 or NaN. The fuzz of tests/ops/test_raw_ops_fuzz.py
    # checks any mix of NaN / inf / huge / degenerate boxes against the reference.
    nan, inf = math.nan, math.inf
    b = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [nan, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0],
                       [0.0, 0.0, 10.0, nan], [-inf, 0.0, inf, 10.0], [0.0, 0.0, 10.0, 10.0],
                       [-inf, -inf, inf, inf], [-inf, -inf, inf, inf]]])
    want = [True, True, False, True, True, False, True, True]
    for thr in (0.0, 0.5):
        assert kdops.nms_mask(b, thr)[0].tolist() == want
        assert torch.equal(kdops.nms_mask(b, thr), torchvision_keep(b, thr))
    # a NaN threshold (the raw op admits it): no IoU is above it, every valid box is kept
    valid = torch.tensor([[True, False] * 4])
    assert torch.equal(torch.ops.kdops.nms_mask_fwd(b, valid, nan), valid)
