# BCKD on kdops.toy_data: the tiny GFL teacher (FPN 64) -> the tiny GFL student (FPN 32), the COCO
# config's loss and weights. Head outputs have the same shapes on both sides (classes, 4*(reg_max+1)),
# so no connector. Teacher checkpoint: train _base_/gfl_r18_toy_teacher.py first.
_base_ = ['../_base_/gfl_r18_toy_student.py']
custom_imports = dict(imports=['kdops_mmdet'], allow_failed_imports=False)

teacher_ckpt = '{{$KDOPS_TOY_TEACHER_CKPT:work_dirs/gfl_r18_toy_teacher/iter_3000.pth}}'
model = dict(
    _delete_=True,
    type='kdops.DistillDetector',
    student={{_base_.model}},
    teacher_cfg='{{fileDirname}}/../_base_/gfl_r18_toy_teacher.py',
    teacher_ckpt=teacher_ckpt,
    distill_losses=[
        dict(name='bckd', type='BCKDLoss', student='bbox_head', teacher='bbox_head', alpha_cls=1.0, alpha_loc=4.0,
             beta=1.0, decoder='gfl', loss='giou', reg_max=16, strides=[8, 16, 32, 64, 128]),
    ])
