"""Student-only export shared by the trainer plug-ins (framework-free: plain state dicts)."""
from __future__ import annotations

from collections import OrderedDict
from typing import Mapping, Set, Tuple

__all__ = ["student_state_dict"]


def student_state_dict(state: Mapping[str, object],
                       prefix: str = "student.") -> Tuple["OrderedDict[str, object]", Set[str]]:
    """The student's tensors of a KD detector's state dict, without ``prefix`` (a DDP ``module.`` in front
    is ignored), and the top-level names of everything dropped (teacher, connectors, KD modules)."""
    out: "OrderedDict[str, object]" = OrderedDict()
    dropped: Set[str] = set()
    for key, value in state.items():
        k = key[len("module."):] if key.startswith("module.") else key
        if k.startswith(prefix):
            out[k[len(prefix):]] = value
        else:
            dropped.add(k.split(".")[0])
    return out, dropped
