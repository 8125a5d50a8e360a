# LGD (label-guided self-distillation, Zhang et al., AAAI 2022) on kdops.toy_data: the tiny RetinaNet
# student (FPN 32, P3-P7) distils the instructive knowledge built from its labels and its own features;
# no teacher to train first. The release's schedule scaled from 180k to this config's 3000 iterations:
# the student's features join loss_lgd after 500 iterations (30k/180k), its backbone trains from
# iteration 330 (20k/180k). The release's RetinaNet setting: a context box per image, the appearance
# embedding not detached.
#   python -m kdops.toy_data data/kdops_toy
#   python -m kdops_mmdet.train integrations/mmdet/configs/lgd/lgd_retinanet_toy.py
_base_ = ['../_base_/retinanet_r18_toy_student.py']
custom_imports = dict(imports=['kdops_mmdet'], allow_failed_imports=False)

model = dict(
    _delete_=True,
    type='kdops.LGDDetector',
    student={{_base_.model}},
    lgd=dict(add_context_box=True, detach_appearance=False),
    loss_weight=1.0,
    distill_start_iter=500,
    freeze_backbone_iters=330)
custom_hooks = [dict(type='kdops.KDScheduleHook')]  # tells the model the iteration
# the backbone gets no gradient during its frozen iterations
model_wrapper_cfg = dict(type='MMDistributedDataParallel', find_unused_parameters=True)
