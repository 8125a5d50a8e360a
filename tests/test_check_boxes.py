"""kdops.check_boxes: GT boxes that can cover nothing are counted and reported (issue 21, point 7)."""
import warnings

import pytest
import torch

import kdops
import kdops._extension as ext
from kdops.losses import FeatureMimicLoss

NAN = float("nan")


@pytest.fixture(autouse=True)
def fresh_warnings():
    ext._warned.difference_update({k for k in ext._warned if k.startswith("check_boxes:")})
    yield
    ext._warned.difference_update({k for k in ext._warned if k.startswith("check_boxes:")})


def boxes():
    b = torch.tensor([[0, 0, 10, 10], [5, 5, 1, 9], [0, 0, NAN, 3], [0, 0, 4, 4], [1, 1, 2, 2]], dtype=torch.float32)
    bi = torch.tensor([0, 1, 1, 2, -1])  # two images: 2 and -1 are out of range
    return b, bi


def test_clean_boxes_pass_silently():
    b = torch.tensor([[0.0, 0.0, 10.0, 10.0], [3.0, 3.0, 3.0, 8.0]])  # zero width is not inverted
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kdops.check_boxes(b, torch.tensor([0, 1]), 2) == 0
        assert kdops.check_boxes(b[:0], torch.zeros(0, dtype=torch.int64), 0) == 0


def test_warns_once_per_reason_with_the_count():
    b, bi = boxes()
    with pytest.warns(RuntimeWarning) as rec:
        assert kdops.check_boxes(b, bi, 2) == 4
    msgs = [str(w.message) for w in rec]
    assert len(msgs) == 3
    assert any("2 of 5 boxes have a batch index outside [0, num_images)" in m for m in msgs)
    assert any("1 of 5 boxes have an inverted extent (x2 < x1 or y2 < y1)" in m for m in msgs)
    assert any("1 of 5 boxes have a non-finite coordinate (NaN or inf)" in m for m in msgs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per reason: the next step is quiet
        assert kdops.check_boxes(b, bi, 2) == 4


def test_strict_raises_naming_count_and_reason():
    b, bi = boxes()
    with pytest.raises(ValueError, match=r"2 of 5 boxes have a batch index outside \[0, num_images\)"):
        kdops.check_boxes(b, bi, 2, strict=True)
    with pytest.raises(ValueError, match=r"1 of 2 boxes have an inverted extent"):
        kdops.check_boxes(b[:2], torch.tensor([0, 0]), 1, strict=True)


def test_arguments_are_validated():
    b, bi = boxes()
    with pytest.raises(ValueError, match="kdops.check_boxes: `batch_index` must have shape"):
        kdops.check_boxes(b, bi[:2], 2)
    with pytest.raises(TypeError, match="`num_images` must be an int"):
        kdops.check_boxes(b, bi, 2.0)
    with pytest.raises(TypeError, match="`strict` must be True or False"):
        kdops.check_boxes(b, bi, 2, strict=1)


def test_no_host_read_where_the_data_is_not_host_readable(monkeypatch):
    b, bi = boxes()
    meta_b, meta_bi = b.to("meta"), bi.to("meta")
    for debug in ("0", "1"):  # meta / fake tensors have no values, debug mode or not
        monkeypatch.setenv("KDOPS_DEBUG_CHECKS", debug)
        assert kdops.check_boxes(meta_b, meta_bi, 2) is None
    compiled = torch.compile(lambda x, i: kdops.check_boxes(x, i, 2, strict=True) or x.sum(), fullgraph=True,
                             backend="eager")
    assert torch.isnan(compiled(b, bi))  # traced: no check, no graph break, no error


def test_feature_mimic_loss_checks_its_boxes():
    s = [torch.randn(2, 4, 8, 8, requires_grad=True)]
    t = [torch.randn(2, 4, 8, 8)]
    b = torch.tensor([[0.0, 0.0, 30.0, 30.0], [10.0, 10.0, 40.0, 40.0]])
    bi = torch.tensor([0, 5])
    loss = FeatureMimicLoss(strides=[8])
    with pytest.warns(RuntimeWarning, match="1 of 2 boxes have a batch index outside"):
        loss(s, t, boxes=b, batch_index=bi, image_size=(64, 64)).backward()
    with pytest.raises(ValueError, match="1 of 2 boxes have a batch index outside"):
        FeatureMimicLoss(strides=[8], strict_boxes=True)(s, t, boxes=b, batch_index=bi, image_size=(64, 64))
