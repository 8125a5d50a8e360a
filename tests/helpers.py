"""Shared test utilities: tolerances by dtype, autograd of the reference, devices."""
from __future__ import annotations

import contextlib
import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
LOW = (torch.float16, torch.bfloat16)
# (atol, rtol) of a kdops result against a float64 oracle, by input dtype.
TOL = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (1e-5, 1e-4),
    torch.float16: (2e-3, 2e-2),
    torch.bfloat16: (2e-2, 5e-2),
}


def triton_device() -> str:
    """Where Triton kernels run in this process: the GPU, or CPU tensors under the interpreter."""
    return "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"


def close(actual, expected, dtype, scale=1.0, msg=""):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol * scale, rtol=rtol, msg=msg or None)


def grads_of(fn, inputs):
    """Value of fn(*inputs) summed with fixed random weights, and grads of inputs requiring grad."""
    out = fn(*inputs)
    g = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).reshape(out.shape)
    req = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    grads = torch.autograd.grad((out * g).sum(), req, allow_unused=True)
    return out.detach(), grads


def leaf(x, dtype=None, requires_grad=True):
    y = x.detach().clone()
    if dtype is not None:
        y = y.to(dtype)
    return y.requires_grad_(requires_grad)


def compile_for_gpu(fn, signature: dict, constexprs: dict, arch: int = 90, **options):
    """Compiles a @triton.jit kernel to a cubin for sm_<arch> without a GPU (type checks the
    compiled path, which the interpreter does not). Skips when that toolchain is missing."""
    import pytest

    if INTERPRET:
        pytest.skip("kernels are interpreted in this process (TRITON_INTERPRET=1)")
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except Exception as exc:  # pragma: no cover
        pytest.skip(f"triton compiler unavailable: {exc}")
    sig = dict(signature)
    sig.update({k: "constexpr" for k in constexprs})
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs),
                            target=GPUTarget("cuda", arch, 32), options=options or None)
    assert "cubin" in kernel.asm
    return kernel


def assert_compiled_matches_eager(f, leaves, *rest):
    """f(leaves, *rest) under torch.compile(fullgraph=True) against eager: same value, same gradients
    of `leaves` (a tensor or a list of tensors, copied into fresh leaves for each run)."""
    single = isinstance(leaves, torch.Tensor)
    runs = []
    for fn in (torch.compile(f, fullgraph=True, backend="aot_eager"), f):
        xs = [leaf(x) for x in ([leaves] if single else leaves)]
        out = fn(xs[0] if single else xs, *rest)
        out.backward()
        runs.append((out, xs))
    (a, a_in), (b, b_in) = runs
    torch.testing.assert_close(a, b)
    for x, y in zip(a_in, b_in):
        torch.testing.assert_close(x.grad, y.grad)


@contextlib.contextmanager
def deterministic_algorithms(flag: bool = True):
    """torch.use_deterministic_algorithms(flag) inside the block, restored after (warn_only too)."""
    prev, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(flag)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=warn)


def assert_same_across_thread_counts(run):
    """run() -> a sequence of tensors, called with 1 thread, all threads under deterministic algorithms,
    and 1 thread again: every call must give bitwise the same tensors."""
    threads = torch.get_num_threads()
    res = []
    try:
        for n, d in ((1, False), (max(threads, 2), True), (1, True)):
            torch.set_num_threads(n)
            with deterministic_algorithms(d):
                res.append(tuple(run()))
    finally:
        torch.set_num_threads(threads)
    for r in res[1:]:
        assert all(torch.equal(a, b) for a, b in zip(r, res[0]))
