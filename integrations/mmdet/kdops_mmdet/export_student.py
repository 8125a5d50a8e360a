"""python -m kdops_mmdet.export_student IN.pth OUT.pth

Turns a DistillDetector checkpoint into a plain mmdet checkpoint of the student: the ``student.``
keys without their prefix; teacher, connectors and KD-loss parameters dropped; ``meta`` kept
(``dataset_meta`` gives init_detector its class names); optimizer, scheduler and message-hub state
dropped (they describe the distillation run). ``mmdet.apis.init_detector(student_config, OUT.pth)``
loads it without kdops.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
from typing import Optional, Sequence

import torch

from kdops.export import student_state_dict

PREFIX = "student."


def export_student(src: str, dst: str) -> dict:
    """Write the student-only checkpoint of ``src`` to ``dst``; return it."""
    # a checkpoint the Runner wrote holds numpy scalars and mmengine objects (message hub), which
    # torch >= 2.6 refuses under its default weights_only=True; the user's own file, so load it fully
    ckpt = torch.load(src, map_location="cpu", weights_only=False)
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"export_student: {src} holds no state_dict")
    out_state, dropped = student_state_dict(state, PREFIX)
    if not out_state:
        raise ValueError(f"export_student: {src} has no '{PREFIX}*' keys: not a kdops DistillDetector checkpoint "
                         f"(top-level keys: {sorted(dropped)[:10]})")
    meta = copy.deepcopy(ckpt.get("meta", {})) if isinstance(ckpt, dict) else {}
    meta["kdops_export"] = dict(source=os.path.abspath(src), dropped=sorted(dropped))
    out = {"meta": meta, "state_dict": out_state}
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    torch.save(out, dst)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kdops_mmdet.export_student", description=__doc__.split("\n\n")[1])
    ap.add_argument("src", help="DistillDetector checkpoint (e.g. work_dirs/.../iter_3000.pth)")
    ap.add_argument("dst", help="output: the student's mmdet checkpoint")
    args = ap.parse_args(argv)
    out = export_student(args.src, args.dst)
    print(f"export_student: wrote {len(out['state_dict'])} student tensors to {args.dst} "
          f"(dropped: {', '.join(out['meta']['kdops_export']['dropped']) or 'nothing'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
