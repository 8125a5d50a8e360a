"""kdops.mask_pool against a loop over objects."""
import re

import pytest
import torch
from helpers import LOW, close, leaf

import kdops
from kdops import reference


def make(N=2, C=5, H=9, W=11, K=7, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(N, C, H, W, generator=g, dtype=torch.float64).to(dtype)
    m = (torch.rand(K, H, W, generator=g, dtype=torch.float64) > 0.6).to(dtype)
    return f, m, torch.randint(0, N, (K,), generator=g)


def oracle(f, m, bi):
    return torch.stack([(f[b].double() * m[k].double()).sum((1, 2)) for k, b in enumerate(bi.tolist())])


def test_parity_and_grads_float64():
    f, m, bi = make()
    F, M = leaf(f), leaf(m)
    out = kdops.mask_pool(F, M, bi)
    Fr, Mr = leaf(f), leaf(m)
    ref = oracle(Fr, Mr, bi)
    close(out, ref, torch.float64)
    close(reference.mask_pool(f, m, bi), ref, torch.float64)
    w = torch.randn(out.shape, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad((out * w).sum(), (F, M)), torch.autograd.grad((ref * w).sum(), (Fr, Mr))):
        close(a, b, torch.float64)
    assert torch.autograd.gradcheck(lambda f, m: kdops.mask_pool(f, m, bi), (leaf(f[:, :2]), leaf(m)))


@pytest.mark.parametrize("dtype", [torch.float32] + list(LOW))
def test_low_precision(dtype):
    f, m, bi = make(dtype=dtype)
    out = kdops.mask_pool(f, m, bi)
    assert out.dtype == dtype
    ref = oracle(f, m, bi)
    close(out, ref, dtype, scale=ref.abs().max().item())


def test_bool_masks():
    f, m, bi = make()
    close(kdops.mask_pool(f, m.bool(), bi), oracle(f, m, bi), torch.float64)


def test_empty_and_out_of_range_batch():
    f, m, bi = make()
    assert kdops.mask_pool(f, m[:0], bi[:0]).shape == (0, 5)
    out = kdops.mask_pool(f, m[:2], torch.tensor([0, 5]))
    assert not out[1].any() and out[0].any()


def test_bad_inputs():
    f, m, bi = make()
    with pytest.raises(ValueError, match=re.escape("`masks` must have shape (K,9,11)")):
        kdops.mask_pool(f, m[:, :3], bi)
    with pytest.raises(ValueError, match=re.escape("`batch_index` must have shape (7,)")):
        kdops.mask_pool(f, m, bi[:3])
    with pytest.raises(TypeError, match="`batch_index` must have dtype"):
        kdops.mask_pool(f, m, bi.int())
    with pytest.raises(ValueError, match="`feature` must be 4-D"):
        kdops.mask_pool(f[0], m, bi)


def test_torch_compile_fullgraph():
    f, m, bi = make(dtype=torch.float32)
    a_in, b_in = leaf(f), leaf(f)
    cf = torch.compile(lambda f, m, b: kdops.mask_pool(f, m, b).pow(2).sum(), fullgraph=True, backend="aot_eager")
    a = cf(a_in, m, bi)
    b = kdops.mask_pool(b_in, m, bi).pow(2).sum()
    a.backward()
    b.backward()
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a_in.grad, b_in.grad)
