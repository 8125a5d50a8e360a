# LGD (Zhang et al., AAAI 2022) on COCO: RetinaNet R50-FPN, 2x schedule, self-distilled from its labels;
# the release's configs/Distillation/RetinaNet/retinanet_R_50_2xMS_stuGuided_addCtxBox=YES_
# detachAppearanceEmbed=NO_preNondistillIters=30k_preFreezeStudentBackboneIters=20k.yaml (detectron2;
# the release reports 40.4 mAP for it): a context box per image, the appearance embedding not
# detached, lambda 1, the student's features join the distillation loss at 30k iterations, its
# backbone trains from 20k; SGD lr 0.01 for the student and the LGD modules.
# The release trains with multi-scale resizing (shorter side 640-800); add it to train_pipeline to match.
_base_ = ['mmdet::retinanet/retinanet_r50_fpn_2x_coco.py']
custom_imports = dict(imports=['kdops_mmdet'], allow_failed_imports=False)

model = dict(  # kdops.LGDDetector's defaults are this release config's values, written out here
    _delete_=True, type='kdops.LGDDetector', student={{_base_.model}}, loss_weight=1.0,
    lgd=dict(add_context_box=True, detach_appearance=False), distill_start_iter=30000, freeze_backbone_iters=20000)
custom_hooks = [dict(type='kdops.KDScheduleHook')]
model_wrapper_cfg = dict(type='MMDistributedDataParallel', find_unused_parameters=True)
optim_wrapper = dict(optimizer=dict(lr=0.01))
