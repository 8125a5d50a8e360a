"""Loads the compiled extension ``kdops._C`` (op schemas + C++ CPU kernels).

When it cannot be loaded, kdops still imports: every op then runs its eager
reference (``kdops.reference``) and a single warning says how to build the kernels.
"""
from __future__ import annotations

import os
import warnings

import torch  # noqa: F401  (loads libc10/libtorch, which kdops._C links against)

HAS_C = False
LOAD_ERROR: str | None = None

if os.environ.get("KDOPS_BACKEND", "").lower() == "reference":
    LOAD_ERROR = "KDOPS_BACKEND=reference is set"
else:
    try:
        from . import _C  # noqa: F401  (registers torch.ops.kdops.*)

        HAS_C = True
    except ImportError as exc:  # pragma: no cover - depends on the installation
        LOAD_ERROR = f"{type(exc).__name__}: {exc}"

_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def warn_fallback(op: str, device_type: str) -> None:
    if not HAS_C:
        why = (
            f"the compiled extension kdops._C is not loaded ({LOAD_ERROR}). Build it with "
            "`pip install --no-build-isolation -e .` in the kdops checkout (or `make test`)"
        )
    else:
        why = f"kdops has no kernel for device type '{device_type}'"
    warn_once(
        f"{op}:{device_type}",
        f"kdops.{op}: {why}; running the eager PyTorch reference instead (correct, but slower).",
    )
