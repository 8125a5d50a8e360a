# LGD (Zhang et al., AAAI 2022) on COCO: Faster R-CNN R50-FPN, 2x schedule, self-distilled from its
# labels; the release's configs/Distillation/FasterRCNN/faster_rcnn_R_50_2xMS_stuGuided_addCtxBox=NO_
# detachAppearanceEmbed=YES_preNondistillIters=30k_preFreezeStudentBackboneIters=20k.yaml (detectron2;
# the release reports 40.5 mAP for it): no context box, the appearance embedding detached, lambda 1,
# the student's features join the distillation loss at 30k iterations, its backbone trains from 20k;
# SGD lr 0.02 (mmdet's and the release's). The release trains with multi-scale resizing (shorter side
# 640-800); add it to train_pipeline to match.
_base_ = ['mmdet::faster_rcnn/faster_rcnn_r50_fpn_2x_coco.py']
custom_imports = dict(imports=['kdops_mmdet'], allow_failed_imports=False)

model = dict(
    _delete_=True,
    type='kdops.LGDDetector',
    student={{_base_.model}},
    lgd=dict(add_context_box=False, detach_appearance=True),
    loss_weight=1.0,
    distill_start_iter=30000,
    freeze_backbone_iters=20000)
custom_hooks = [dict(type='kdops.KDScheduleHook')]
model_wrapper_cfg = dict(type='MMDistributedDataParallel', find_unused_parameters=True)
