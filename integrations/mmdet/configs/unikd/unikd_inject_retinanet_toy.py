# UniKD stage 2 (inject) on kdops.toy_data: the tiny RetinaNet student (FPN 32) learns from the tiny
# RetinaNet teacher (FPN 64) through the frozen AKEs of stage 1 (unikd_absorb_retinanet_toy.py): queries
# from the teacher's P3-P6, the extractors on the teacher's maps and on the student's P3-P6 through the
# adaptor (1x1 conv 32->64 per level + 2 deformable self-attention layers), loss_unikd_content +
# loss_unikd_positional (decoupled MSE, weight 10 each), warmed up over 100 iterations.
#   KDOPS_TOY_TEACHER_CKPT=... KDOPS_TOY_UNIKD_AKE_CKPT=work_dirs/unikd_absorb_retinanet_toy/iter_3000.pth \
#       python -m kdops_mmdet.train integrations/mmdet/configs/unikd/unikd_inject_retinanet_toy.py
_base_ = ['../_base_/retinanet_r18_toy_student.py']
custom_imports = dict(imports=['kdops_mmdet'], allow_failed_imports=False)

teacher_ckpt = '{{$KDOPS_TOY_TEACHER_CKPT:work_dirs/retinanet_r18_toy_teacher/iter_3000.pth}}'
ake_ckpt = '{{$KDOPS_TOY_UNIKD_AKE_CKPT:work_dirs/unikd_absorb_retinanet_toy/iter_3000.pth}}'
model = dict(
    _delete_=True,
    type='kdops.UniKDDistillDetector',
    student={{_base_.model}},
    teacher_cfg='{{fileDirname}}/../_base_/retinanet_r18_toy_teacher.py',
    teacher_ckpt=teacher_ckpt,
    ake_ckpt=ake_ckpt,
    ake=dict(num_queries=50, num_extractor_layers=1, ffn_dims=256, num_heads=4),
    num_positional=50,
    levels=[0, 1, 2, 3],
    teacher_levels=[0, 1, 2, 3],
    adaptor=dict(num_layers=2, num_heads=4, ffn_dims=256),
    loss=dict(content_weight=10.0, positional_weight=10.0))
custom_hooks = [dict(type='kdops.KDScheduleHook', warmup_iters=100, losses=['unikd'])]
