"""Registry of benchmark cases, one module per op under kdops/bench/ops/."""
from __future__ import annotations

import importlib
import os
import pkgutil
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch


@dataclass
class Impl:
    """One implementation of a case: ``fn(**inputs)`` returns a tensor or a tuple of tensors
    (what gets compared and back-propagated). ``compile=True`` wraps it in torch.compile."""

    name: str
    fn: Callable
    compile: bool = False
    #: the machine's own limit for the case (not an implementation of the op): ``fn(**inputs)`` moves
    #: the least bytes the op's result needs (read every input once, write every output and every input
    #: gradient once into fresh tensors, as the op's backward does) with plain torch passes, or for a
    #: compute-bound op does its least transcendental work. Timed with the others (no backward, not
    #: compared); the table's ``x roof`` is an implementation's fwd+bwd over this time.
    roof: bool = False


@dataclass
class Case:
    op: str                      # bench entry name == op name
    label: str                   # the problem, e.g. "COCO P3-P7 N=2 C=256"
    make_inputs: Callable[[], Dict[str, object]]  # called once; tensors on the bench device
    impls: List[Impl]            # the first one is kdops, the second the eager reference
    grad_inputs: List[str] = field(default_factory=list)  # inputs that require grad
    min_bytes: Optional[Callable[[Dict[str, object]], int]] = None  # fwd+bwd minimal traffic
    atol: float = 1e-4
    rtol: float = 1e-4
    backward: bool = True
    quick: bool = True           # part of the default (quick) selection; False: only with --full
    bound: str = ""              # what the case's roof implementation does (the table's footnote)


# op name -> factory(device, dtype, size) -> list of cases
_REGISTRY: Dict[str, Callable[[torch.device, torch.dtype, str], List[Case]]] = {}


def register(op: str):
    def deco(factory):
        _REGISTRY[op] = factory
        return factory

    return deco


def _load_all() -> None:
    from . import ops as ops_pkg

    for m in pkgutil.iter_modules(ops_pkg.__path__):
        importlib.import_module(f"{ops_pkg.__name__}.{m.name}")


def available_ops() -> List[str]:
    _load_all()
    return sorted(_REGISTRY)


def no_compile() -> bool:
    """KDOPS_BENCH_NO_COMPILE: "1" drops the torch.compile implementations, "0" or unset keeps them."""
    value = os.environ.get("KDOPS_BENCH_NO_COMPILE", "0")
    if value not in ("0", "1", ""):
        raise ValueError(f"KDOPS_BENCH_NO_COMPILE must be '0' or '1' (or unset), got {value!r}")
    return value == "1"


def cases_for(op: str, device: torch.device, dtype: torch.dtype, size: str, full: bool = True,
              compile: bool = True) -> List[Case]:
    """The cases of one op: all of them (``full=True``) or the quick selection, one representative
    case per op (what ``kdops bench`` runs without ``--full``). ``compile=False`` or
    KDOPS_BENCH_NO_COMPILE=1 drops the torch.compile implementations."""
    _load_all()
    if op not in _REGISTRY:
        raise ValueError(f"kdops bench: unknown op {op!r}; available: {', '.join(sorted(_REGISTRY))}")
    cases = _REGISTRY[op](device, dtype, size)
    if not full:
        cases = [c for c in cases if c.quick]
    if no_compile() or not compile:
        for c in cases:
            c.impls = [i for i in c.impls if not i.compile]
    for c in cases:
        if any(i.roof for i in c.impls[:2]):
            raise ValueError(f"kdops bench: {c.op} ({c.label}): the roof must come after kdops and the eager baseline")
        if any(i.roof for i in c.impls) and not c.bound:
            raise ValueError(f"kdops bench: {c.op} ({c.label}): a roof implementation needs the case's `bound` text")
    return cases
