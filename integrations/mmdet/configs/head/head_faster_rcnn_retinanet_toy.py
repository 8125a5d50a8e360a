# HEAD on kdops.toy_data: the tiny Faster R-CNN teacher (FPN 32, R-CNN FC 256) -> the tiny RetinaNet
# student (FPN 32). The assistant is a copy of the teacher's R-CNN head on the student's P3-P6; AKD
# and CKD at the release's weight 2.0, warmed up over 100 iterations (the toy schedule's LR warm-up;
# 2000 of 90k on COCO); CKD stops at the first LR drop (iteration 2000), as the paper says. The RoI
# budgets are the toy teacher's, scaled to the 128x128 images: 1000 candidates per level and 300
# proposals per image from the student's head, 128 sampled RoIs (COCO: 2000, 1000, 512).
#   KDOPS_TOY_TEACHER_CKPT=work_dirs/faster_rcnn_r18_toy_teacher/iter_3000.pth \
#       python -m kdops_mmdet.train integrations/mmdet/configs/head/head_faster_rcnn_retinanet_toy.py
_base_ = ['../_base_/retinanet_r18_toy_student.py']
custom_imports = dict(imports=['kdops_mmdet'], allow_failed_imports=False)

teacher_ckpt = '{{$KDOPS_TOY_TEACHER_CKPT:work_dirs/faster_rcnn_r18_toy_teacher/iter_3000.pth}}'
model = dict(
    _delete_=True,
    type='kdops.HEADDistillDetector',
    student={{_base_.model}},
    teacher_cfg='{{fileDirname}}/../_base_/faster_rcnn_r18_toy_teacher.py',
    teacher_ckpt=teacher_ckpt,
    featmap_strides=[8, 16, 32, 64],
    proposals=dict(nms_pre=1000, iou_threshold=0.7, max_per_img=300, min_bbox_size=0),
    akd=dict(loss_weight=2.0),
    ckd=dict(type='mse', loss_weight=2.0))
custom_hooks = [
    dict(type='kdops.KDScheduleHook', warmup_iters=100, losses=['akd']),
    dict(type='kdops.KDScheduleHook', warmup_iters=100, stop_at_first_lr_milestone=True, losses=['ckd']),
]
