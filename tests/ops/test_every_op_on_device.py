"""Every bench case of every op (`kdops bench --size small`), forward + backward of its kdops
implementation, on every device present:

- bitwise the same twice in a row under ``torch.use_deterministic_algorithms(True)``;
- on CUDA, no host synchronisation anywhere (``torch.cuda.set_sync_debug_mode("error")``):
  docs/architecture.md's "no host sync in the hot path", checked for all ops at once (issue 6);
- finite results and gradients;
- on CUDA, forward + backward captured in one CUDA graph and replayed gives bitwise the results of
  the eager runs (no host work, allocation outside the graph's pool, or host-side state in the hot
  path; issue 6).

The cases come from the bench registry, so an op gets these checks as soon as it has a bench
entry. The CPU runs keep the test itself honest where CI has no GPU.
"""
import contextlib

import pytest
import torch

from kdops.bench.harness import _backward, _leaves, _outputs
from kdops.bench.registry import available_ops, cases_for

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CASES = [(op, i) for op in available_ops()
         for i in range(len(cases_for(op, torch.device("cpu"), torch.float32, "small")))]


@contextlib.contextmanager
def no_host_sync(check: bool):
    if not check:
        yield
        return
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def run_once(case, inputs, check_sync: bool = False):
    leaves = _leaves(inputs, case.grad_inputs) if case.backward else []
    with no_host_sync(check_sync):
        res = case.impls[0].fn(**inputs)
        grads = (_backward(res, leaves) if leaves else None) or ()
    return [o.detach() for o in _outputs(res)], [g for g in grads if g is not None]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op, index", CASES, ids=[f"{op}-{i}" for op, i in CASES])
def test_op_is_deterministic_and_sync_free(op, index, device):
    case = cases_for(op, torch.device(device), torch.float32, "small")[index]
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        inputs = case.make_inputs()  # host-to-device copies happen here, outside the sync check
        first = run_once(case, inputs, device == "cuda")
        again = run_once(case, inputs, device == "cuda")
    finally:
        torch.use_deterministic_algorithms(before)
    for a, b in zip(first[0] + first[1], again[0] + again[1]):
        assert a.dtype.is_floating_point is False or torch.isfinite(a).all(), (op, case.label)
        assert torch.equal(a, b), f"{op} ({case.label}) differs between two identical runs on {device}"
    assert len(first[0]) > 0 and (not case.backward or not case.grad_inputs or len(first[1]) > 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("op, index", CASES, ids=[f"{op}-{i}" for op, i in CASES])
def test_op_replays_in_a_cuda_graph(op, index):
    case = cases_for(op, torch.device("cuda"), torch.float32, "small")[index]
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        inputs = case.make_inputs()
        # warm-up on a side stream (Triton compiles and autotunes here, not during capture), as
        # torch.cuda.graphs' whole-network capture recipe does
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                eager = run_once(case, inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = run_once(case, inputs)
        graph.replay()
        torch.cuda.synchronize()
    finally:
        torch.use_deterministic_algorithms(before)
    assert len(captured[0]) == len(eager[0]) and len(captured[1]) == len(eager[1])
    for a, b in zip(eager[0] + eager[1], captured[0] + captured[1]):
        assert torch.equal(a, b), f"{op} ({case.label}): the CUDA graph replay differs from the eager run"
