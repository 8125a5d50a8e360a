# LGD on kdops.toy_data for a two-stage student: the tiny Faster R-CNN (FPN 32, P2-P6) distils the
# instructive knowledge built from its labels and its own features; the instructive features also go
# through its RPN and R-CNN head with the GT (loss_rpn_*_tea, loss_cls_tea, ...). The release's Faster
# R-CNN setting: no context box, the appearance embedding detached. Schedule as lgd_retinanet_toy.py.
#   python -m kdops.toy_data data/kdops_toy
#   python -m kdops_mmdet.train integrations/mmdet/configs/lgd/lgd_faster_rcnn_toy.py
_base_ = ['../_base_/faster_rcnn_r18_toy_teacher.py']
custom_imports = dict(imports=['kdops_mmdet'], allow_failed_imports=False)

model = dict(
    _delete_=True,
    type='kdops.LGDDetector',
    student={{_base_.model}},
    lgd=dict(add_context_box=False, detach_appearance=True),
    loss_weight=1.0,
    distill_start_iter=500,
    freeze_backbone_iters=330)
custom_hooks = [dict(type='kdops.KDScheduleHook')]
model_wrapper_cfg = dict(type='MMDistributedDataParallel', find_unused_parameters=True)
