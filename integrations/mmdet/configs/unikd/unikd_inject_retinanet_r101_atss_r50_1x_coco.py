# UniKD stage 2 (inject), ATSS student: the ATSS R50 student learns from the RetinaNet R101 teacher
# through the frozen AKEs of unikd_absorb_retinanet_r101_coco.py (its checkpoint: model.ake_ckpt). Queries
# come from the teacher's P3-P6; the extractors run on them and on the student's P3-P6 through the adaptor
# (1x1 conv per level + 2 deformable self-attention layers, dropped at export); loss_unikd_content +
# loss_unikd_positional, the decoupled embedding MSE at lambda_1 = lambda_2 = 10 (the paper's), on top of
# the student's losses. (A standalone config: mmdet's ATSS config is its base, for its data and schedule.)
_base_ = ['mmdet::atss/atss_r50_fpn_1x_coco.py']
custom_imports = dict(imports=['kdops_mmdet'], allow_failed_imports=False)

teacher_ckpt = 'https://download.openmmlab.com/mmdetection/v2.0/retinanet/retinanet_r101_fpn_2x_coco/retinanet_r101_fpn_2x_coco_20200131-5560aee8.pth'  # noqa: E501
model = dict(
    _delete_=True,
    type='kdops.UniKDDistillDetector',
    student={{_base_.model}},
    teacher_cfg='mmdet::retinanet/retinanet_r101_fpn_2x_coco.py',
    teacher_ckpt=teacher_ckpt,
    ake_ckpt='work_dirs/unikd_absorb_retinanet_r101_coco/epoch_12.pth',
    num_positional=200,
    levels=[0, 1, 2, 3],
    teacher_levels=[0, 1, 2, 3],
    loss=dict(content_weight=10.0, positional_weight=10.0))
custom_hooks = [dict(type='kdops.KDScheduleHook', warmup_iters=500, losses=['unikd'])]
