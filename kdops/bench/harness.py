"""Runs bench cases: checks agreement, then times forward, backward and forward+backward with the
implementations' repetitions interleaved, and flags timings that other work on the machine disturbed."""
from __future__ import annotations

import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from .registry import Case, Impl


#: the machine's own noise while a case is timed: a fixed elementwise pass over CANARY_N floats (the
#: canary) is timed after every repetition round; a canary spread (IQR / median) above CANARY_SPREAD
#: says other work disturbed the machine during the case, and every row of the case is flagged. An op's
#: own spread is not a disturbance signal: on an idle 2-core VM the backward of an op that allocates
#: large gradients varies by up to ~150% between repetitions. Measured on a 2-vCPU EPYC VM (issue 21):
#: idle, the canary's spread stayed within 0.05-0.80 over 26 cases of two runs; with two busy
#: processes on the cores it reached 1.3-25 in a third of the cases.
CANARY_N = 1 << 20
CANARY_SPREAD = 1.0
#: old results (JSON written before the canary existed) are judged by their own spread: above this
#: fraction of the median (and SPREAD_MIN_MS)
SPREAD = 0.25
SPREAD_MIN_MS = 0.05
#: forward+backward timed in one go must not come out below this fraction of the larger of the
#: forward and the backward timed alone (it contains both), by more than CONSISTENCY_MIN_MS (timer and
#: Python overhead on sub-millisecond ops): below it the machine was disturbed.
CONSISTENCY = 0.8
CONSISTENCY_MIN_MS = 0.2
#: repetitions: at most --reps, but a pass of one implementation's repetitions stays within
#: REP_BUDGET_S (a 1-second eager reference gets MIN_REPS, not 10); never under MIN_REPS
REP_BUDGET_S = 4.0
MIN_REPS = 5
ADVICE = ("re-run on an idle machine, or with fewer threads (`kdops bench --threads 1`, or "
          "OMP_NUM_THREADS=1), and compare ratios rather than absolute times")


@dataclass
class Row:
    op: str
    case: str
    impl: str
    fwd_ms: Optional[float] = None
    bwd_ms: Optional[float] = None
    fwdbwd_ms: Optional[float] = None
    fwd_iqr_ms: Optional[float] = None
    bwd_iqr_ms: Optional[float] = None
    fwdbwd_iqr_ms: Optional[float] = None
    speedup_vs_eager: Optional[float] = None
    vs_compile: Optional[float] = None   # the case's torch.compile fwd+bwd / this fwd+bwd
    vs_roof: Optional[float] = None      # this fwd+bwd / the case's roof time (1 = at the machine's limit)
    gbps: Optional[float] = None
    peak_mib: Optional[float] = None
    match: str = ""
    error: str = ""
    disturbed: str = ""          # why this row's timings look disturbed ("" when they look sound)
    extra: Dict[str, object] = field(default_factory=dict)

    def as_dict(self):
        return asdict(self)


def disturbance(row: Dict[str, object]) -> str:
    """Why a row's timings look disturbed by other work on the machine ("" when they look sound):
    the canary's spread during the case above CANARY_SPREAD (rows without a canary: the row's own
    spread above SPREAD of its median), or forward+backward (timed in one go) below CONSISTENCY x the
    larger of forward and backward timed alone. Takes a row as a dict (JSON)."""
    notes = []
    canary = (row.get("extra") or {}).get("canary_spread")
    if canary is not None:
        if canary > CANARY_SPREAD:
            notes.append(f"canary spread {canary:.0%}")
    else:
        for label, med, iqr in (("fwd", row.get("fwd_ms"), row.get("fwd_iqr_ms")),
                                ("bwd", row.get("bwd_ms"), row.get("bwd_iqr_ms")),
                                ("fwd+bwd", row.get("fwdbwd_ms"), row.get("fwdbwd_iqr_ms"))):
            if med and iqr is not None and iqr > SPREAD * med and iqr > SPREAD_MIN_MS:
                notes.append(f"{label} spread {iqr / med:.0%}")
    both, parts = row.get("fwdbwd_ms"), [x for x in (row.get("fwd_ms"), row.get("bwd_ms")) if x]
    if row.get("match") == "roof":  # one pass timed twice, after different neighbours: not a fwd/bwd pair
        parts = []
    if both and parts and both < CONSISTENCY * max(parts) and max(parts) - both > CONSISTENCY_MIN_MS:
        notes.append(f"fwd+bwd {both:.3g} ms < {'bwd' if row.get('bwd_ms') == max(parts) else 'fwd'} "
                     f"{max(parts):.3g} ms")
    return "; ".join(notes)


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


_GRAD_OUTPUTS: Dict[tuple, torch.Tensor] = {}


def _grad_outputs(res):
    """(outputs, upstream gradients) of a result: every floating output that requires grad gets a fixed,
    non-uniform upstream gradient (a ramp 0.5..1.5 over its elements, made once per shape and dtype and
    kept), so every output element's gradient is exercised and the timed backward is the op's own --
    no reduction of the outputs to a scalar, whose forward and backward would add passes over large
    outputs (box_paint's maps) to every implementation's time."""
    outs, ws = [], []
    for o in _outputs(res):
        if o.is_floating_point() and o.requires_grad:
            key = (tuple(o.shape), o.dtype, o.device)
            w = _GRAD_OUTPUTS.get(key)
            if w is None:
                w = torch.linspace(0.5, 1.5, o.numel(), device=o.device, dtype=torch.float32).reshape(o.shape)
                w = _GRAD_OUTPUTS[key] = w.to(o.dtype)
            outs.append(o)
            ws.append(w)
    return outs, ws


def _backward(res, leaves):
    outs, ws = _grad_outputs(res)
    if not outs:
        return None
    return torch.autograd.grad(outs, leaves, grad_outputs=ws, allow_unused=True)


class Timer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def now(self) -> float:
        self.sync()
        return time.perf_counter()


class _Canary:
    """Times a fixed elementwise pass over CANARY_N floats on the case's device, once per call: an
    ``out=`` multiply-add (no allocation) on torch's own intra-op thread pool, the pool the ops use
    (a BLAS product was thrown off by the OpenMP threads an op leaves spinning)."""

    def __init__(self, device: torch.device):
        g = torch.Generator().manual_seed(0)
        self.a = torch.randn(CANARY_N, generator=g).to(device)
        self.out = torch.empty_like(self.a)
        self.timer = Timer(device)
        self.samples: List[float] = []
        self.tick()  # warm: the first pass pays for thread start-up and first touch

    def tick(self) -> None:
        t0 = self.timer.now()
        torch.add(self.a, self.a, alpha=0.5, out=self.out)
        self.samples.append(self.timer.now() - t0)

    def spread(self) -> Optional[float]:
        xs = self.samples[1:]
        if len(xs) < 4:
            return None
        med, iqr = _median_iqr(xs)
        return iqr / med if med > 0 else None


def _median_iqr(xs: List[float]):
    xs = sorted(xs)
    if len(xs) < 4:
        return statistics.median(xs), 0.0
    q = statistics.quantiles(xs, n=4)
    return statistics.median(xs), q[2] - q[0]


def _prepare(impl: Impl) -> Callable:
    if impl.roof:
        def roof(**inputs):
            with torch.no_grad():
                return impl.fn(**inputs)
        return roof
    return torch.compile(impl.fn) if impl.compile else impl.fn


def _run_once(fn, inputs, leaves, backward: bool):
    res = fn(**inputs)
    grads = None
    if backward and leaves:
        grads = _backward(res, leaves)
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


def _rotated(items: list, k: int) -> list:
    k %= max(len(items), 1)
    return items[k:] + items[:k]


def time_case(case: Case, device: torch.device, reps: int, warmup: int,
              progress: Callable[[str], None]) -> List[Row]:
    """Checks every implementation against the first (kdops), then times them with their
    repetitions interleaved -- repetition i runs every implementation once, in an order rotated
    by i -- so a disturbance (another process, a frequency change) hits all of them alike rather
    than the one that happened to be running. Forward and backward are timed separately (one
    pass of repetitions), then forward+backward in one go (a second pass). ``warmup`` untimed runs
    come first (at least one: its results are the ones checked); an implementation slower than
    REP_BUDGET_S / reps per run gets fewer repetitions, never under MIN_REPS."""
    inputs = case.make_inputs()
    leaves = _leaves(inputs, case.grad_inputs) if case.backward else []
    timer = Timer(device)
    rows = {impl.name: Row(op=case.op, case=case.label, impl=impl.name) for impl in case.impls}
    roofs = {impl.name for impl in case.impls if impl.roof}
    backward = {impl.name: case.backward and bool(leaves) and not impl.roof for impl in case.impls}
    results, fns = {}, {}

    def fail(name: str, e: Exception) -> None:  # a failing peer or compile must not stop the run
        rows[name].error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
        fns.pop(name, None)

    n_reps = {}
    for impl in case.impls:
        started = time.perf_counter()
        try:
            fn = _prepare(impl)
            for _ in range(max(warmup, 1) - 1):
                _run_once(fn, inputs, leaves, backward[impl.name])
            t0 = timer.now()
            results[impl.name] = _run_once(fn, inputs, leaves, backward[impl.name])  # the last warm-up run
            one = timer.now() - t0
            fns[impl.name] = fn
            # a slow implementation gets fewer repetitions (never under MIN_REPS): a pass of its
            # repetitions stays within REP_BUDGET_S
            n_reps[impl.name] = min(reps, max(MIN_REPS, int(REP_BUDGET_S / max(one, 1e-9))))
        except Exception as e:
            fail(impl.name, e)
        progress(f"{case.op} | {case.label} | {impl.name}: warm-up and check "
                 f"{time.perf_counter() - started:.1f} s")
    fwd = {n: [] for n in fns}
    bwd = {n: [] for n in fns}
    both = {n: [] for n in fns}
    progress(f"{case.op} | {case.label}: timing {', '.join(f'{n} x{n_reps[n]}' for n in fns)} "
             "(repetitions interleaved)")
    canary = _Canary(device)
    for i in range(reps):
        for name in _rotated([n for n in fns if i < n_reps[n]], i):
            try:
                t0 = timer.now()
                res = fns[name](**inputs)
                t1 = timer.now()
                fwd[name].append(t1 - t0)
                if backward[name]:
                    outs, ws = _grad_outputs(res)
                    t2 = timer.now()
                    torch.autograd.grad(outs, leaves, grad_outputs=ws, allow_unused=True)
                    bwd[name].append(timer.now() - t2)
                del res
            except Exception as e:
                fail(name, e)
        canary.tick()
    for i in range(reps):
        canary.tick()
        for name in _rotated([n for n in fns if i < n_reps[n]], i):
            try:
                t0 = timer.now()
                _run_once(fns[name], inputs, leaves, backward[name])
                both[name].append(timer.now() - t0)
            except Exception as e:
                fail(name, e)
    canary_spread = canary.spread()
    for name, fn in list(fns.items()):
        row = rows[name]
        if canary_spread is not None:
            row.extra["canary_spread"] = round(canary_spread, 4)
        row.fwd_ms, row.fwd_iqr_ms = _ms(fwd[name])
        row.bwd_ms, row.bwd_iqr_ms = _ms(bwd[name])
        row.fwdbwd_ms, row.fwdbwd_iqr_ms = _ms(both[name])
        if case.min_bytes is not None and name == case.impls[0].name and row.fwdbwd_ms:
            row.gbps = case.min_bytes(inputs) / (row.fwdbwd_ms * 1e-3) / 1e9
        if device.type == "cuda":
            try:
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                _run_once(fn, inputs, leaves, backward[name])
                torch.cuda.synchronize()
                row.peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
            except Exception as e:
                fail(name, e)
    ref_name = case.impls[0].name
    # by convention the second implementation of a case is its eager baseline
    base_name = case.impls[1].name if len(case.impls) > 1 else None
    eager = rows.get(base_name) if base_name else None
    comp = next((rows[i.name] for i in case.impls if i.compile and not rows[i.name].error), None)
    roof = next((rows[n] for n in roofs if not rows[n].error), None)
    out = list(rows.values())
    for r in out:
        if r.error:
            r.match = "error"
            continue
        if r.impl in roofs:
            r.match = "roof"
            r.extra["bound"] = case.bound
        else:
            r.match = "ok" if r.impl == ref_name else _compare(results[ref_name], results[r.impl], case)
        if eager is not None and eager.fwdbwd_ms and r.fwdbwd_ms:
            r.speedup_vs_eager = eager.fwdbwd_ms / r.fwdbwd_ms
        if comp is not None and comp.fwdbwd_ms and r.fwdbwd_ms and r.impl not in roofs:
            r.vs_compile = comp.fwdbwd_ms / r.fwdbwd_ms
        if roof is not None and roof.fwdbwd_ms and r.fwdbwd_ms:
            r.vs_roof = r.fwdbwd_ms / roof.fwdbwd_ms
        r.disturbed = disturbance(r.as_dict())
    return out


def _ms(xs: List[float]):
    """(median, IQR) in milliseconds, (None, None) for no samples."""
    if not xs:
        return None, None
    med, iqr = _median_iqr(xs)
    return med * 1e3, iqr * 1e3


def default_progress(msg: str) -> None:
    print(f"  running {msg} ...", file=sys.stderr, flush=True)
