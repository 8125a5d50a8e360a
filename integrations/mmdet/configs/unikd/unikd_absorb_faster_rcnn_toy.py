# UniKD stage 1 (absorb), heterogeneous pair on kdops.toy_data: the tiny Faster R-CNN teacher (FPN 32 at
# P2-P6) is frozen; the AKEs read its P3-P6 (levels 1-4). As unikd_absorb_retinanet_toy.py otherwise.
_base_ = ['./unikd_absorb_retinanet_toy.py']

teacher_ckpt = '{{$KDOPS_TOY_TEACHER_CKPT:work_dirs/faster_rcnn_r18_toy_teacher/iter_3000.pth}}'
model = dict(
    teacher_cfg='{{fileDirname}}/../_base_/faster_rcnn_r18_toy_teacher.py',
    teacher_ckpt=teacher_ckpt,
    levels=[1, 2, 3, 4])
