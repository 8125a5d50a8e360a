# UniKD stage 2 (inject), heterogeneous pair on kdops.toy_data: Faster R-CNN teacher (FPN 32, its P3-P6
# = levels 1-4) -> RetinaNet student (FPN 32, its P3-P6 = levels 0-3), through the frozen AKEs of
# unikd_absorb_faster_rcnn_toy.py. Only the teacher's features are read: its heads play no part.
_base_ = ['./unikd_inject_retinanet_toy.py']

teacher_ckpt = '{{$KDOPS_TOY_TEACHER_CKPT:work_dirs/faster_rcnn_r18_toy_teacher/iter_3000.pth}}'
ake_ckpt = '{{$KDOPS_TOY_UNIKD_AKE_CKPT:work_dirs/unikd_absorb_faster_rcnn_toy/iter_3000.pth}}'
model = dict(
    teacher_cfg='{{fileDirname}}/../_base_/faster_rcnn_r18_toy_teacher.py',
    teacher_ckpt=teacher_ckpt,
    ake_ckpt=ake_ckpt,
    teacher_levels=[1, 2, 3, 4])
