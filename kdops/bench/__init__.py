"""The benchmark harness behind ``kdops bench`` (see docs/architecture.md, section 6).

Each op registers its cases in ``kdops/bench/ops/<op>.py`` with :func:`register`;
the harness checks that kdops, the eager reference, torch.compile(reference) and
any installed peer agree, then times forward, backward and forward+backward.
"""
from .registry import Case, Impl, available_ops, cases_for, register

__all__ = ["Case", "Impl", "available_ops", "cases_for", "register"]
