# HEAD (Wang et al., ECCV 2022), the paper's Table 4 pair: Faster R-CNN R50 (mmdet's multi-scale 3x
# checkpoint, the one the release loads) -> RetinaNet R18, 1x schedule. The release's settings: the
# assistant is the teacher's R-CNN head on the student's P3-P6 (strides 8-64), initialised from the
# teacher's; proposals from the student's head (nms_pre 2000, NMS 0.7, 1000 per image); the teacher's
# R-CNN sampler (512 RoIs, 25% positives, GT added); AKD on shared_fcs[0] and [-1] and CKD on the
# student's last cls conv, each weight 2.0 warmed up over 2000 iterations. The paper's lambda^A = 5:
# akd=dict(loss_weight=5.0). CKD stops at the first LR drop (epoch 8) as in the paper; the release
# keeps it on (remove stop_at_first_lr_milestone).
_base_ = ['mmdet::retinanet/retinanet_r18_fpn_1x_coco.py']
custom_imports = dict(imports=['kdops_mmdet'], allow_failed_imports=False)

teacher_ckpt = 'https://download.openmmlab.com/mmdetection/v2.0/faster_rcnn/faster_rcnn_r50_fpn_mstrain_3x_coco/faster_rcnn_r50_fpn_mstrain_3x_coco_20210524_110822-e10bd31c.pth'  # noqa: E501
model = dict(
    _delete_=True,
    type='kdops.HEADDistillDetector',
    student={{_base_.model}},
    teacher_cfg='mmdet::faster_rcnn/faster-rcnn_r50_fpn_ms-3x_coco.py',
    teacher_ckpt=teacher_ckpt,
    featmap_strides=[8, 16, 32, 64],
    proposals=dict(nms_pre=2000, iou_threshold=0.7, max_per_img=1000, min_bbox_size=0),
    akd=dict(loss_weight=2.0),
    ckd=dict(type='mse', loss_weight=2.0))
custom_hooks = [
    dict(type='kdops.KDScheduleHook', warmup_iters=2000, losses=['akd']),
    dict(type='kdops.KDScheduleHook', warmup_iters=2000, stop_at_first_lr_milestone=True, losses=['ckd']),
]
