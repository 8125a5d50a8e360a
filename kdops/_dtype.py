"""The dtype rules every layer shares (ops, references, Triton launchers, losses).

kdops accepts float32, float16, bfloat16 (and float64 on the CPU, for gradcheck) and
accumulates in float32 -- in float64 for float64 inputs.
"""
from __future__ import annotations

from typing import Union

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def acc_dtype(x: Union[torch.dtype, torch.Tensor]) -> torch.dtype:
    """Accumulation (and loss) dtype of a dtype or a tensor: float64 for float64, float32 otherwise."""
    dtype = x.dtype if isinstance(x, torch.Tensor) else x
    return torch.float64 if dtype == torch.float64 else torch.float32
