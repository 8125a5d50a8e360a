"""Every bench case of every op (`kdops bench --size small`), forward + backward of its kdops
implementation, on every device present:

- bitwise the same twice in a row under ``torch.use_deterministic_algorithms(True)``;
- on CUDA, no host synchronisation anywhere (``torch.cuda.set_sync_debug_mode("error")``):
  DESIGN.md's "no host sync in the hot path", checked for all ops at once (issue 6);
- finite results and gradients.

The cases come from the bench registry, so an op gets these checks as soon as it has a bench
entry. The CPU runs keep the test itself honest where CI has no GPU.
"""
import contextlib

import pytest
import torch

from kdops.bench.harness import _leaves, _outputs, _scalar
from kdops.bench.registry import available_ops, cases_for

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CASES = [(op, i) for op in available_ops()
         for i in range(len(cases_for(op, torch.device("cpu"), torch.float32, "small")))]


@contextlib.contextmanager
def no_host_sync(device: str):
    if device != "cuda":
        yield
        return
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def run_once(case, inputs, device):
    leaves = _leaves(inputs, case.grad_inputs) if case.backward else []
    with no_host_sync(device):
        res = case.impls[0].fn(**inputs)
        grads = torch.autograd.grad(_scalar(res), leaves, allow_unused=True) if leaves else ()
    return [o.detach() for o in _outputs(res)], [g for g in grads if g is not None]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op, index", CASES, ids=[f"{op}-{i}" for op, i in CASES])
def test_op_is_deterministic_and_sync_free(op, index, device):
    case = cases_for(op, torch.device(device), torch.float32, "small")[index]
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        inputs = case.make_inputs()  # host-to-device copies happen here, outside the sync check
        first = run_once(case, inputs, device)
        again = run_once(case, inputs, device)
    finally:
        torch.use_deterministic_algorithms(before)
    for a, b in zip(first[0] + first[1], again[0] + again[1]):
        assert a.dtype.is_floating_point is False or torch.isfinite(a).all(), (op, case.label)
        assert torch.equal(a, b), f"{op} ({case.label}) differs between two identical runs on {device}"
    assert len(first[0]) > 0 and (not case.backward or not case.grad_inputs or len(first[1]) > 0)
