# UniKD stage 2 (inject), heterogeneous pair (two-stage teacher): the RetinaNet R50 student learns from the Faster R-CNN R101 teacher
# through the frozen AKEs of unikd_absorb_faster_rcnn_r101_coco.py (its checkpoint: model.ake_ckpt). Queries come from the teacher's
# P3-P6 (its levels 1-4: its FPN starts at P2); the extractors run on them and on the student's P3-P6 through the adaptor (1x1 conv per
# level + 2 deformable self-attention layers, dropped at export); loss_unikd_content + loss_unikd_positional,
# the decoupled embedding MSE at lambda_1 = lambda_2 = 10 (the paper's), on top of the student's losses.
_base_ = ['./unikd_inject_retinanet_r101_retinanet_r50_1x_coco.py']

teacher_ckpt = 'https://download.openmmlab.com/mmdetection/v2.0/faster_rcnn/faster_rcnn_r101_fpn_2x_coco/faster_rcnn_r101_fpn_2x_coco_bbox_mAP-0.398_20200504_210455-1d2dac9c.pth'  # noqa: E501
model = dict(
    teacher_cfg='mmdet::faster_rcnn/faster-rcnn_r101_fpn_2x_coco.py',
    teacher_ckpt=teacher_ckpt,
    ake_ckpt='work_dirs/unikd_absorb_faster_rcnn_r101_coco/epoch_12.pth',
    teacher_levels=[1, 2, 3, 4])
