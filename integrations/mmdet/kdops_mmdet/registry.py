"""kdops' child registries of mmdet's (scope ``kdops``).

Configs name our classes with the scope prefix (``type='kdops.DistillDetector'``) while the
run's default scope stays ``mmdet``; mmdet's types stay visible from here through the parent.
"""
from mmdet.registry import HOOKS as MMDET_HOOKS
from mmdet.registry import MODELS as MMDET_MODELS
from mmdet.registry import TRANSFORMS as MMDET_TRANSFORMS
from mmengine.registry import Registry

MODELS = Registry("model", parent=MMDET_MODELS, scope="kdops", locations=["kdops_mmdet"])
HOOKS = Registry("hook", parent=MMDET_HOOKS, scope="kdops", locations=["kdops_mmdet"])
TRANSFORMS = Registry("transform", parent=MMDET_TRANSFORMS, scope="kdops", locations=["kdops_mmdet"])
