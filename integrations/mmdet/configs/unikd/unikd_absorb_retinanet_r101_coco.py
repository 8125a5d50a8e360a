# UniKD stage 1 (absorb), homogeneous pair: the frozen teacher (RetinaNet R101, mmdet's checkpoint) is read at
# P3-P6 (its levels 0-3) by a content AKE (200 learnt queries) and a positional AKE (200 boxes per image, half around
# the GT at IoU > 0.6, half on the background at IoU < 0.4), each a query generator (one Deformable-DETR
# decoder layer) + an extractor (2 layers) + a DETR prediction head, trained with Deformable DETR's set
# loss (focal 2, L1 5, GIoU 2). The paper leaves stage 1's schedule open: 12 epochs of AdamW 2e-4,
# clip 0.1 (Deformable DETR's optimiser). The checkpoint's content_ake.* / positional_ake.* feed stage 2
# (unikd_inject_retinanet_r101_retinanet_r50_1x_coco.py, unikd_inject_retinanet_r101_atss_r50_1x_coco.py).
_base_ = ['mmdet::retinanet/retinanet_r50_fpn_1x_coco.py']
custom_imports = dict(imports=['kdops_mmdet'], allow_failed_imports=False)

teacher_ckpt = 'https://download.openmmlab.com/mmdetection/v2.0/retinanet/retinanet_r101_fpn_2x_coco/retinanet_r101_fpn_2x_coco_20200131-5560aee8.pth'  # noqa: E501
model = dict(
    _delete_=True,
    type='kdops.UniKDAbsorbDetector',
    teacher_cfg='mmdet::retinanet/retinanet_r101_fpn_2x_coco.py',
    teacher_ckpt=teacher_ckpt,
    levels=[0, 1, 2, 3],
    num_positional=200,
    pos_fraction=0.5)
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=2e-4, weight_decay=1e-4),
    clip_grad=dict(max_norm=0.1, norm_type=2))
