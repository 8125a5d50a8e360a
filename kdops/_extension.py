"""Loads the compiled extension ``kdops._C`` (op schemas + C++ CPU kernels).

When it cannot be loaded, kdops still imports: every op then runs its eager
reference (``kdops.reference``) and a single warning per op says why and how to build
the kernels.

Environment switch ``KDOPS_BACKEND`` (read once, at import):

- unset, ``""`` or ``"auto"``: the compiled kernels where the device has them (default);
- ``"reference"``: every op runs its eager PyTorch reference (debugging, bisecting a
  kernel); the extension is not loaded.

Any other value is an error naming these (a typo must not silently change what runs).

``KDOPS_DEBUG_CHECKS=1`` (read at each call, "0" or unset: off) makes the data checks that
cost a device synchronisation run on GPU tensors too (:func:`kdops.check_boxes`).
"""
from __future__ import annotations

import os
import warnings

import torch  # noqa: F401  (loads libc10/libtorch, which kdops._C links against)

#: the values KDOPS_BACKEND accepts, and what each does
BACKENDS = {
    "auto": "the compiled kernels where the device has them (the default; also when unset or empty)",
    "reference": "every op runs its eager PyTorch reference (kdops.reference); the extension is not loaded",
}


def backend_from_env(value: str | None = None) -> str:
    """The validated KDOPS_BACKEND ("auto" or "reference"); ``value`` defaults to the environment's."""
    raw = os.environ.get("KDOPS_BACKEND", "") if value is None else value
    name = raw.strip().lower() or "auto"
    if name not in BACKENDS:
        valid = "; ".join(f"{k!r}: {v}" for k, v in BACKENDS.items())
        raise ValueError(f"KDOPS_BACKEND={raw!r} is not a kdops backend. Valid values -- {valid}. "
                         "Unset it for the default.")
    return name


BACKEND = backend_from_env()
#: True when KDOPS_BACKEND=reference asked for the references (the extension is then not loaded)
REFERENCE_FORCED = BACKEND == "reference"
HAS_C = False
LOAD_ERROR: str | None = None

if REFERENCE_FORCED:
    LOAD_ERROR = "KDOPS_BACKEND=reference is set"
else:
    try:
        from . import _C  # noqa: F401  (registers torch.ops.kdops.*)

        HAS_C = True
    except ImportError as exc:  # pragma: no cover - depends on the installation
        import importlib.util

        if importlib.util.find_spec(f"{__package__}._C") is None:  # Python would call this a circular import
            LOAD_ERROR = "it is not built: no kdops/_C*.so next to kdops/__init__.py"
        else:
            LOAD_ERROR = f"{type(exc).__name__}: {exc}"

_warned: set[str] = set()


def debug_checks() -> bool:
    """KDOPS_DEBUG_CHECKS: "1" runs data checks that synchronise a GPU with the host; "0" or unset
    does not. Anything else is an error naming the valid values."""
    raw = os.environ.get("KDOPS_DEBUG_CHECKS", "")
    if raw.strip() not in ("", "0", "1"):
        raise ValueError(f"KDOPS_DEBUG_CHECKS={raw!r}: use '1' (run the data checks that synchronise a GPU "
                         "with the host, e.g. kdops.check_boxes on CUDA tensors) or '0' / unset (skip them there)")
    return raw.strip() == "1"


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def fallback_reason(device_type: str) -> str:
    """Why an op runs its eager reference on this device type, and what to do about it."""
    if REFERENCE_FORCED:
        return ("KDOPS_BACKEND=reference is set, so every op runs its eager reference (the compiled kernels "
                "are not used); unset KDOPS_BACKEND to use them")
    if not HAS_C:
        return (f"the compiled extension kdops._C is not loaded ({LOAD_ERROR}). Build it with "
                "`pip install --no-build-isolation -e .` in the kdops checkout (or `make test`)")
    return f"kdops has no kernel for device type '{device_type}'"


def warn_fallback(op: str, device_type: str) -> None:
    warn_once(
        f"{op}:{device_type}",
        f"kdops.{op}: {fallback_reason(device_type)}; running the eager PyTorch reference instead "
        "(correct, but slower).",
    )
