"""Taps: what a submodule returned (or a head method computed) during one distillation step.

A tap is named by a dotted module path relative to the detector, optionally followed by
output indices, or a method call:

- ``"neck"``                  the FPN tuple, as a list of levels;
- ``"backbone.layer3"``       one tensor;
- ``"bbox_head.cls_convs.0"`` a module called once per level (shared head convs): the list of
                              its outputs, one per call, i.e. one per level;
- ``"bbox_head"``             a dense head's raw outputs, e.g. ``[cls_scores, bbox_preds]``;
  ``"bbox_head[0]"``          only the classification scores (a list of levels);
- ``"bbox_head.get_targets()"`` the return value of a head method (the training targets the
                              head's own ``loss_by_feat`` computes: labels, label weights, box
                              targets, anchors, ``avg_factor``), recorded as the head computes
                              them, so nothing is assigned twice.

Records exist only between :meth:`TapSet.start` and :meth:`TapSet.stop` (one training step);
outside a step the hooks record nothing (validation runs the student with the hooks idle).
"""
from __future__ import annotations

import functools
import re
from typing import Any, Dict, List, Sequence, Tuple

import torch
import torch.nn as nn

_TAP = re.compile(r"^(?P<path>\w[\w.]*?)(?P<call>\(\))?(?P<idx>(\[-?\d+\])*)$")


def parse_tap(tap: str) -> Tuple[str, bool, Tuple[int, ...]]:
    """``"bbox_head[0]"`` -> ("bbox_head", False, (0,)); ``"bbox_head.get_targets()"`` -> (.., True, ())."""
    m = _TAP.match(tap.strip()) if isinstance(tap, str) else None
    if m is None:
        raise ValueError(f"kdops_mmdet: bad tap {tap!r}: expected a dotted module path such as 'neck' or "
                         f"'backbone.layer3', optionally with output indices ('bbox_head[0]') or a method call "
                         f"('bbox_head.get_targets()')")
    idx = tuple(int(i) for i in re.findall(r"\[(-?\d+)\]", m.group("idx") or ""))
    return m.group("path"), bool(m.group("call")), idx


def resolve_module(root: nn.Module, path: str, role: str) -> nn.Module:
    """The submodule at ``path``; an unknown path names the deepest module that exists and its children."""
    module = root
    done: List[str] = []
    for part in path.split("."):
        children = dict(module.named_children())
        if part not in children:
            where = ".".join(done) if done else f"the {role} ({type(root).__name__})"
            names = ", ".join(f"{k} ({type(v).__name__})" for k, v in children.items()) or "none"
            raise ValueError(f"kdops_mmdet: {role} tap {path!r} does not exist: {where} has no child {part!r}. "
                             f"Its children are: {names}")
        module = children[part]
        done.append(part)
    return module


def as_levels(x: Any) -> Any:
    """Tuples become lists (an FPN tuple -> a list of levels), recursively; tensors stay tensors."""
    if isinstance(x, (tuple, list)):
        return [as_levels(v) for v in x]
    return x


def select(x: Any, idx: Sequence[int], tap: str) -> Any:
    for i in idx:
        if not isinstance(x, (list, tuple)) or not -len(x) <= i < len(x):
            raise ValueError(f"kdops_mmdet: tap {tap!r}: cannot take index [{i}] of "
                             f"{describe(x)}")
        x = x[i]
    return x


def describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor{tuple(x.shape)}"
    if isinstance(x, (list, tuple)):
        return "[" + ", ".join(describe(v) for v in x) + "]"
    return type(x).__name__


class TapSet:
    """Forward hooks (modules) and method wrappers (``path.method()``) on one detector."""

    def __init__(self, model: nn.Module, taps: Sequence[str], role: str) -> None:
        self.role = role
        self.active = False
        self._records: Dict[str, List[Any]] = {}
        self._handles = []
        self.paths: Dict[str, Tuple[str, bool]] = {}  # key -> (path, is_method)
        for tap in taps:
            path, is_call, _ = parse_tap(tap)
            key = path + ("()" if is_call else "")
            if key in self.paths:
                continue
            self.paths[key] = (path, is_call)
            if is_call:
                mod_path, _, method = path.rpartition(".")
                owner = resolve_module(model, mod_path, role) if mod_path else model
                if not callable(getattr(owner, method, None)):
                    raise ValueError(f"kdops_mmdet: {role} tap {tap!r}: {type(owner).__name__} has no method "
                                     f"{method!r}")
                self._wrap_method(owner, method, key)
            else:
                module = resolve_module(model, path, role)
                self._handles.append(module.register_forward_hook(functools.partial(self._hook, key)))

    def _hook(self, key, module, inputs, output):
        if self.active:
            self._records.setdefault(key, []).append(as_levels(output))

    def _wrap_method(self, owner: nn.Module, method: str, key: str) -> None:
        original = getattr(owner, method)

        @functools.wraps(original)
        def recorded(*args, **kwargs):
            out = original(*args, **kwargs)
            if self.active:
                self._records.setdefault(key, []).append(as_levels(out))
            return out

        # an instance attribute shadows the class's method for this module only
        setattr(owner, method, recorded)

    def start(self) -> None:
        self._records = {}
        self.active = True

    def stop(self) -> None:
        self.active = False
        self._records = {}

    def get(self, tap: str) -> Any:
        path, is_call, idx = parse_tap(tap)
        key = path + ("()" if is_call else "")
        calls = self._records.get(key)
        if not calls:
            raise RuntimeError(f"kdops_mmdet: {self.role} tap {tap!r} recorded nothing during this step: the "
                               f"{self.role}'s forward did not call it. Tap a module the {self.role} runs in "
                               f"its loss/feature path (e.g. 'neck', 'backbone.layer3', 'bbox_head')")
        value = calls[0] if len(calls) == 1 else calls
        return select(value, idx, tap)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
