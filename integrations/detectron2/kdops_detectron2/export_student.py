"""python -m kdops_detectron2.export_student --config-file F --weights W --out O [KEY VALUE ...]

Turns a KDDetector checkpoint (``W``, e.g. ``OUTPUT_DIR/model_final.pth``) into a plain detectron2
checkpoint of the student: ``{"model": student_state_dict}`` (the ``student.*`` keys without their
prefix; teacher, connectors and method modules, optimizer and scheduler dropped). The keys are
checked against the student that ``F`` builds (strict), and the student's config without
``MODEL.KD`` is written next to ``O`` (``O`` with ``.yaml``), so that

    cfg = get_cfg(); cfg.merge_from_file("student.yaml")
    model = build_model(cfg); DetectionCheckpointer(model).load("student.pth")

works without kdops.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import torch

from kdops.export import student_state_dict

PREFIX = "student."


def export_student(cfg, weights: str, out: str) -> dict:
    """Writes the student's checkpoint of ``weights`` to ``out`` (and its config to
    ``splitext(out)[0] + ".yaml"``); returns the saved dict."""
    from detectron2.modeling import build_model

    from .config import plain_cfg, student_cfg

    if not os.path.isfile(weights):
        raise FileNotFoundError(f"export_student: checkpoint {weights!r} not found")
    # a checkpoint KDTrainer wrote also holds the optimizer/scheduler state (not only tensors); it is
    # the user's own file, so it is loaded fully
    ckpt = torch.load(weights, map_location="cpu", weights_only=False)
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"export_student: {weights} holds no model state dict")
    out_state, dropped = student_state_dict(state, PREFIX)
    if not out_state:
        raise ValueError(f"export_student: {weights} has no '{PREFIX}*' keys: not a KDDetector checkpoint "
                         f"(top-level keys: {sorted(dropped)[:10]})")
    scfg = student_cfg(cfg)
    scfg.MODEL.DEVICE = "cpu"
    model = build_model(scfg)
    model.load_state_dict(out_state, strict=True)  # the exported keys are exactly the student's
    result = {"model": out_state, "__author__": "kdops_detectron2.export_student",
              "kdops_export": {"source": os.path.abspath(weights), "dropped": sorted(dropped)}}
    os.makedirs(os.path.dirname(os.path.abspath(out)) or ".", exist_ok=True)
    torch.save(result, out)
    with open(os.path.splitext(out)[0] + ".yaml", "w") as f:
        f.write(plain_cfg(cfg).dump())
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .config import get_kd_cfg

    ap = argparse.ArgumentParser(prog="python -m kdops_detectron2.export_student",
                                 description=__doc__.split("\n\n")[1])
    ap.add_argument("--config-file", required=True, metavar="FILE", help="the KD config the weights were trained with")
    ap.add_argument("--weights", required=True, help="KDDetector checkpoint (e.g. OUTPUT_DIR/model_final.pth)")
    ap.add_argument("--out", required=True, help="output: the student's detectron2 checkpoint")
    ap.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = ap.parse_args(argv)
    cfg = get_kd_cfg(args.config_file, args.opts)
    out = export_student(cfg, args.weights, args.out)
    print(f"export_student: wrote {len(out['model'])} student tensors to {args.out} "
          f"(dropped: {', '.join(out['kdops_export']['dropped']) or 'nothing'}); config: "
          f"{os.path.splitext(args.out)[0] + '.yaml'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
