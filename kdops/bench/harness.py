"""Runs bench cases: checks agreement, then times forward, backward and forward+backward."""
from __future__ import annotations

import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from .registry import Case, Impl


@dataclass
class Row:
    op: str
    case: str
    impl: str
    fwd_ms: Optional[float] = None
    bwd_ms: Optional[float] = None
    fwdbwd_ms: Optional[float] = None
    fwdbwd_iqr_ms: Optional[float] = None
    speedup_vs_eager: Optional[float] = None
    gbps: Optional[float] = None
    peak_mib: Optional[float] = None
    match: str = ""
    error: str = ""
    extra: Dict[str, object] = field(default_factory=dict)

    def as_dict(self):
        return asdict(self)


def _leaves(inputs: Dict[str, object], names: List[str]) -> List[torch.Tensor]:
    out = []
    for n in names:
        v = inputs[n]
        out.extend(v if isinstance(v, (list, tuple)) else [v])
    return out


def _outputs(res) -> List[torch.Tensor]:
    if isinstance(res, torch.Tensor):
        return [res]
    return [r for r in res if isinstance(r, torch.Tensor)]


def _scalar(res) -> torch.Tensor:
    # a fixed, non-uniform combination so every output element's gradient is exercised
    total = 0
    for o in _outputs(res):
        if o.is_floating_point() and o.requires_grad:
            w = torch.linspace(0.5, 1.5, o.numel(), device=o.device, dtype=torch.float32).reshape(o.shape)
            total = total + (o.float() * w).sum()
    return total


class Timer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def now(self) -> float:
        self.sync()
        return time.perf_counter()


def _median_iqr(xs: List[float]):
    xs = sorted(xs)
    if len(xs) < 4:
        return statistics.median(xs), 0.0
    q = statistics.quantiles(xs, n=4)
    return statistics.median(xs), q[2] - q[0]


def _prepare(impl: Impl) -> Callable:
    return torch.compile(impl.fn) if impl.compile else impl.fn


def _run_once(fn, inputs, leaves, backward: bool):
    res = fn(**inputs)
    grads = None
    if backward and leaves:
        grads = torch.autograd.grad(_scalar(res), leaves, allow_unused=True)
    return res, grads


def _compare(a, b, case: Case) -> str:
    (ra, ga), (rb, gb) = a, b
    try:
        for x, y in zip(_outputs(ra), _outputs(rb)):
            torch.testing.assert_close(x.detach().double(), y.detach().double(), atol=case.atol, rtol=case.rtol)
        if ga is not None and gb is not None:
            for x, y in zip(ga, gb):
                if x is None or y is None:
                    continue
                scale = max(y.detach().abs().max().item(), 1e-12)
                torch.testing.assert_close(x.double(), y.double(), atol=case.atol * scale, rtol=case.rtol)
        return "ok"
    except AssertionError as e:
        first = str(e).strip().splitlines()
        return "MISMATCH: " + (first[0] if first else "")


def time_case(case: Case, device: torch.device, reps: int, warmup: int,
              progress: Callable[[str], None]) -> List[Row]:
    inputs = case.make_inputs()
    leaves = _leaves(inputs, case.grad_inputs) if case.backward else []
    timer = Timer(device)
    rows: List[Row] = []
    results = {}
    for impl in case.impls:
        row = Row(op=case.op, case=case.label, impl=impl.name)
        rows.append(row)
        progress(f"{case.op} | {case.label} | {impl.name}")
        try:
            fn = _prepare(impl)
            for _ in range(warmup):
                _run_once(fn, inputs, leaves, case.backward)
            results[impl.name] = _run_once(fn, inputs, leaves, case.backward)
            fwd, bwd, both = [], [], []
            for _ in range(reps):
                t0 = timer.now()
                res = fn(**inputs)
                t1 = timer.now()
                fwd.append(t1 - t0)
                if case.backward and leaves:
                    loss = _scalar(res)
                    t2 = timer.now()
                    torch.autograd.grad(loss, leaves, allow_unused=True)
                    t3 = timer.now()
                    bwd.append(t3 - t2)
                del res
            for _ in range(reps):
                t0 = timer.now()
                _run_once(fn, inputs, leaves, case.backward)
                both.append(timer.now() - t0)
            row.fwd_ms = statistics.median(fwd) * 1e3
            row.bwd_ms = statistics.median(bwd) * 1e3 if bwd else None
            med, iqr = _median_iqr(both)
            row.fwdbwd_ms, row.fwdbwd_iqr_ms = med * 1e3, iqr * 1e3
            if case.min_bytes is not None and impl.name == case.impls[0].name:
                row.gbps = case.min_bytes(inputs) / med / 1e9
            if device.type == "cuda":
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                _run_once(fn, inputs, leaves, case.backward)
                torch.cuda.synchronize()
                row.peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
        except Exception as e:  # a failing peer or compile must not stop the run
            row.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
    ref_name = case.impls[0].name
    # by convention the second implementation of a case is its eager baseline
    base_name = case.impls[1].name if len(case.impls) > 1 else None
    eager = next((r for r in rows if r.impl == base_name and r.fwdbwd_ms), None)
    for r in rows:
        if r.error:
            r.match = "error"
            continue
        r.match = "ok" if r.impl == ref_name else _compare(results[ref_name], results[r.impl], case)
        if eager is not None and r.fwdbwd_ms:
            r.speedup_vs_eager = eager.fwdbwd_ms / r.fwdbwd_ms
    return rows


def default_progress(msg: str) -> None:
    print(f"  running {msg} ...", file=sys.stderr, flush=True)
