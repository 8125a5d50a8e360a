# UniKD stage 1 (absorb), heterogeneous pair on kdops.toy_data: the tiny Faster R-CNN teacher (FPN 32 at
# P2-P6) is frozen; the AKEs read its P3-P6 (levels 1-4). As unikd_absorb_retinanet_toy.py otherwise.
_base_ = ['../_base_/retinanet_r18_toy_student.py']
custom_imports = dict(imports=['kdops_mmdet'], allow_failed_imports=False)

teacher_ckpt = '{{$KDOPS_TOY_TEACHER_CKPT:work_dirs/faster_rcnn_r18_toy_teacher/iter_3000.pth}}'
model = dict(
    _delete_=True,
    type='kdops.UniKDAbsorbDetector',
    teacher_cfg='{{fileDirname}}/../_base_/faster_rcnn_r18_toy_teacher.py',
    teacher_ckpt=teacher_ckpt,
    levels=[1, 2, 3, 4],
    ake=dict(num_queries=50, num_extractor_layers=1, ffn_dims=256, num_heads=4),
    num_positional=50,
    pos_fraction=0.5)
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=2e-4, weight_decay=1e-4),
    clip_grad=dict(max_norm=0.1, norm_type=2))
