# UniKD stage 2 (inject), heterogeneous pair (DETR-style teacher): the RetinaNet R50 student learns from the Deformable DETR R50 teacher
# through the frozen AKEs of unikd_absorb_deformable_detr_r50_coco.py (its checkpoint: model.ake_ckpt). Queries come from the teacher's
# 4 ChannelMapper levels (strides 8-64); the extractors run on them and on the student's P3-P6 through the adaptor (1x1 conv per
# level + 2 deformable self-attention layers, dropped at export); loss_unikd_content + loss_unikd_positional,
# the decoupled embedding MSE at lambda_1 = lambda_2 = 10 (the paper's), on top of the student's losses.
_base_ = ['./unikd_inject_retinanet_r101_retinanet_r50_1x_coco.py']

teacher_ckpt = 'https://download.openmmlab.com/mmdetection/v3.0/deformable_detr/deformable-detr_r50_16xb2-50e_coco/deformable-detr_r50_16xb2-50e_coco_20221029_210934-6bc7d21b.pth'  # noqa: E501
model = dict(
    teacher_cfg='mmdet::deformable_detr/deformable-detr_r50_16xb2-50e_coco.py',
    teacher_ckpt=teacher_ckpt,
    ake_ckpt='work_dirs/unikd_absorb_deformable_detr_r50_coco/epoch_12.pth',
    teacher_levels=[0, 1, 2, 3])
