# UniKD stage 1 (absorb) on kdops.toy_data: the tiny RetinaNet teacher (FPN 64, P3-P7) is frozen; a
# content AKE (learnt queries) and a positional AKE (boxes around the GT and on the background) learn
# to detect from its P3-P6 as DETR-style detectors (focal 2, L1 5, GIoU 2; Hungarian matching for the
# content queries). Validation evaluates the content AKE as a detector on the teacher's features.
# Sized for 128x128 images: 50 content and 50 positional queries, 1 extractor layer, FFN 256.
#   KDOPS_TOY_TEACHER_CKPT=work_dirs/retinanet_r18_toy_teacher/iter_3000.pth \
#       python -m kdops_mmdet.train integrations/mmdet/configs/unikd/unikd_absorb_retinanet_toy.py
# Then stage 2: unikd_inject_retinanet_toy.py with KDOPS_TOY_UNIKD_AKE_CKPT=<this run's checkpoint>.
_base_ = ['../_base_/retinanet_r18_toy_student.py']
custom_imports = dict(imports=['kdops_mmdet'], allow_failed_imports=False)

teacher_ckpt = '{{$KDOPS_TOY_TEACHER_CKPT:work_dirs/retinanet_r18_toy_teacher/iter_3000.pth}}'
model = dict(
    _delete_=True,
    type='kdops.UniKDAbsorbDetector',
    teacher_cfg='{{fileDirname}}/../_base_/retinanet_r18_toy_teacher.py',
    teacher_ckpt=teacher_ckpt,
    levels=[0, 1, 2, 3],
    ake=dict(num_queries=50, num_extractor_layers=1, ffn_dims=256, num_heads=4),
    num_positional=50,
    pos_fraction=0.5)
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=2e-4, weight_decay=1e-4),
    clip_grad=dict(max_norm=0.1, norm_type=2))
