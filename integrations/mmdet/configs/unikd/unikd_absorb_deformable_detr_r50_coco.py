# UniKD stage 1 (absorb), heterogeneous pair (DETR-style teacher): the frozen teacher (Deformable DETR R50, mmdet's checkpoint) is read at
# 4 ChannelMapper levels (strides 8-64) by a content AKE (200 learnt queries) and a positional AKE (200 boxes per image, half around
# the GT at IoU > 0.6, half on the background at IoU < 0.4), each a query generator (one Deformable-DETR
# decoder layer) + an extractor (2 layers) + a DETR prediction head, trained with Deformable DETR's set
# loss (focal 2, L1 5, GIoU 2). The paper leaves stage 1's schedule open: 12 epochs of AdamW 2e-4,
# clip 0.1 (Deformable DETR's optimiser). The checkpoint's content_ake.* / positional_ake.* feed stage 2
# (unikd_inject_deformable_detr_r50_retinanet_r50_1x_coco.py).
_base_ = ['./unikd_absorb_retinanet_r101_coco.py']

teacher_ckpt = 'https://download.openmmlab.com/mmdetection/v3.0/deformable_detr/deformable-detr_r50_16xb2-50e_coco/deformable-detr_r50_16xb2-50e_coco_20221029_210934-6bc7d21b.pth'  # noqa: E501
model = dict(
    teacher_cfg='mmdet::deformable_detr/deformable-detr_r50_16xb2-50e_coco.py',
    teacher_ckpt=teacher_ckpt,
    levels=[0, 1, 2, 3])
