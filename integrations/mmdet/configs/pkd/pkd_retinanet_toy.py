# PKD on kdops.toy_data: the tiny RetinaNet teacher (FPN 64) -> the tiny student (FPN 32), the COCO
# config's loss (PKDLoss, weight 10 on P3-P6) with a 1x1 conv connector per level from the student's
# 32 to the teacher's 64 channels (trained with the student, dropped at export).
#   python -m kdops.toy_data data/kdops_toy
#   python -m kdops_mmdet.train integrations/mmdet/configs/_base_/retinanet_r18_toy_teacher.py \
#       --work-dir work_dirs/retinanet_r18_toy_teacher
#   KDOPS_TOY_TEACHER_CKPT=work_dirs/retinanet_r18_toy_teacher/iter_3000.pth \
#       python -m kdops_mmdet.train integrations/mmdet/configs/pkd/pkd_retinanet_toy.py
_base_ = ['../_base_/retinanet_r18_toy_student.py']
custom_imports = dict(imports=['kdops_mmdet'], allow_failed_imports=False)

teacher_ckpt = '{{$KDOPS_TOY_TEACHER_CKPT:work_dirs/retinanet_r18_toy_teacher/iter_3000.pth}}'
model = dict(
    _delete_=True,
    type='kdops.DistillDetector',
    student={{_base_.model}},
    teacher_cfg='{{fileDirname}}/../_base_/retinanet_r18_toy_teacher.py',
    teacher_ckpt=teacher_ckpt,
    distill_losses=[
        dict(name='pkd', type='PKDLoss', student='neck', teacher='neck', levels=[0, 1, 2, 3],
             connector=dict(type='conv1x1', in_channels=32, out_channels=64), loss_weight=10),
    ])
