# UniKD stage 2 (inject), heterogeneous pair on kdops.toy_data: Faster R-CNN teacher (FPN 32, its P3-P6
# = levels 1-4) -> RetinaNet student (FPN 32, its P3-P6 = levels 0-3), through the frozen AKEs of
# unikd_absorb_faster_rcnn_toy.py. Only the teacher's features are read: its heads play no part.
_base_ = ['../_base_/retinanet_r18_toy_student.py']
custom_imports = dict(imports=['kdops_mmdet'], allow_failed_imports=False)

teacher_ckpt = '{{$KDOPS_TOY_TEACHER_CKPT:work_dirs/faster_rcnn_r18_toy_teacher/iter_3000.pth}}'
ake_ckpt = '{{$KDOPS_TOY_UNIKD_AKE_CKPT:work_dirs/unikd_absorb_faster_rcnn_toy/iter_3000.pth}}'
model = dict(
    _delete_=True,
    type='kdops.UniKDDistillDetector',
    student={{_base_.model}},
    teacher_cfg='{{fileDirname}}/../_base_/faster_rcnn_r18_toy_teacher.py',
    teacher_ckpt=teacher_ckpt,
    ake_ckpt=ake_ckpt,
    ake=dict(num_queries=50, num_extractor_layers=1, ffn_dims=256, num_heads=4),
    num_positional=50,
    levels=[0, 1, 2, 3],
    teacher_levels=[1, 2, 3, 4],
    adaptor=dict(num_layers=2, num_heads=4, ffn_dims=256),
    loss=dict(content_weight=10.0, positional_weight=10.0))
custom_hooks = [dict(type='kdops.KDScheduleHook', warmup_iters=100, losses=['unikd'])]
