"""Device helpers shared by kdops.ops and kdops.triton."""
from __future__ import annotations

import torch


def constant(values, *, like: torch.Tensor, dtype=None) -> torch.Tensor:
    """A small constant tensor on `like`'s device without a host synchronisation.

    ``torch.tensor(values, device="cuda")`` is a blocking host-to-device copy, which
    synchronises the stream (and trips ``torch.cuda.set_sync_debug_mode("error")``); a
    non-blocking copy of a fresh CPU tensor does not.
    """
    t = torch.tensor(values, dtype=dtype)
    return t if like.device.type == "cpu" else t.to(like.device, non_blocking=True)
