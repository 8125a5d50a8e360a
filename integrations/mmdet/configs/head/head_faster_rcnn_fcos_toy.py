# HEAD on kdops.toy_data with an FCOS student (the paper's Table 4 pair, at toy scale): the tiny Faster
# R-CNN teacher (FPN 32, R-CNN FC 256) -> the tiny FCOS student (FPN 32). The student's head is the
# assistant's RPN as in the release's FCOSRPNHead: max over classes, top 1000 per level, each score
# times its centerness, distances times the stride, one NMS (0.7) over all levels, 300 per image;
# zero-width boxes are kept as there (min_bbox_size=-1). CKD reads the FCOS cls tower's last conv.
# Everything else as head_faster_rcnn_retinanet_toy.py.
#   KDOPS_TOY_TEACHER_CKPT=work_dirs/faster_rcnn_r18_toy_teacher/iter_3000.pth \
#       python -m kdops_mmdet.train integrations/mmdet/configs/head/head_faster_rcnn_fcos_toy.py
_base_ = ['../_base_/fcos_r18_toy_student.py']
custom_imports = dict(imports=['kdops_mmdet'], allow_failed_imports=False)

teacher_ckpt = '{{$KDOPS_TOY_TEACHER_CKPT:work_dirs/faster_rcnn_r18_toy_teacher/iter_3000.pth}}'
model = dict(
    _delete_=True,
    type='kdops.HEADDistillDetector',
    student={{_base_.model}},
    teacher_cfg='{{fileDirname}}/../_base_/faster_rcnn_r18_toy_teacher.py',
    teacher_ckpt=teacher_ckpt,
    featmap_strides=[8, 16, 32, 64],
    proposals=dict(nms_pre=1000, iou_threshold=0.7, max_per_img=300, min_bbox_size=-1),
    akd=dict(loss_weight=2.0),
    ckd=dict(type='mse', loss_weight=2.0))
custom_hooks = [
    dict(type='kdops.KDScheduleHook', warmup_iters=100, losses=['akd']),
    dict(type='kdops.KDScheduleHook', warmup_iters=100, stop_at_first_lr_milestone=True, losses=['ckd']),
]
