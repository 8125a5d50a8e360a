# HEAD (Wang et al., ECCV 2022), the paper's Table 4 FCOS pair: Faster R-CNN R50 (mmdet's multi-scale 3x
# checkpoint) -> FCOS R18, 1x schedule. As head_faster_rcnn_r50_retinanet_r18_1x_coco.py, with the
# student's FCOS head as the assistant's RPN the way the release's FCOSRPNHead does it: max over
# classes, top 2000 per level, each score times its centerness, distance decoding (times the stride:
# this FCOS normalises its distances), one NMS (0.7) over all levels, 1000 per image, zero-width boxes
# kept (min_bbox_size=-1). The student is fcos_r18_fpn_1x_coco.py (FPN 256 like the teacher's, so the
# assistant starts as the teacher's R-CNN head).
_base_ = ['./fcos_r18_fpn_1x_coco.py']
custom_imports = dict(imports=['kdops_mmdet'], allow_failed_imports=False)

teacher_ckpt = 'https://download.openmmlab.com/mmdetection/v2.0/faster_rcnn/faster_rcnn_r50_fpn_mstrain_3x_coco/faster_rcnn_r50_fpn_mstrain_3x_coco_20210524_110822-e10bd31c.pth'  # noqa: E501
model = dict(
    _delete_=True,
    type='kdops.HEADDistillDetector',
    student={{_base_.model}},
    teacher_cfg='mmdet::faster_rcnn/faster-rcnn_r50_fpn_ms-3x_coco.py',
    teacher_ckpt=teacher_ckpt,
    featmap_strides=[8, 16, 32, 64],
    proposals=dict(nms_pre=2000, iou_threshold=0.7, max_per_img=1000, min_bbox_size=-1),
    akd=dict(loss_weight=2.0),
    ckd=dict(type='mse', loss_weight=2.0))
custom_hooks = [
    dict(type='kdops.KDScheduleHook', warmup_iters=2000, losses=['akd']),
    dict(type='kdops.KDScheduleHook', warmup_iters=2000, stop_at_first_lr_milestone=True, losses=['ckd']),
]
