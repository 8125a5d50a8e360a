# UniKD stage 1 (absorb), heterogeneous pair (two-stage teacher): the frozen teacher (Faster R-CNN R101, mmdet's checkpoint) is read at
# P3-P6 (its levels 1-4: its FPN starts at P2) by a content AKE (200 learnt queries) and a positional AKE (200 boxes per image, half around
# the GT at IoU > 0.6, half on the background at IoU < 0.4), each a query generator (one Deformable-DETR
# decoder layer) + an extractor (2 layers) + a DETR prediction head, trained with Deformable DETR's set
# loss (focal 2, L1 5, GIoU 2). The paper leaves stage 1's schedule open: 12 epochs of AdamW 2e-4,
# clip 0.1 (Deformable DETR's optimiser). The checkpoint's content_ake.* / positional_ake.* feed stage 2
# (unikd_inject_faster_rcnn_r101_retinanet_r50_1x_coco.py).
_base_ = ['./unikd_absorb_retinanet_r101_coco.py']

teacher_ckpt = 'https://download.openmmlab.com/mmdetection/v2.0/faster_rcnn/faster_rcnn_r101_fpn_2x_coco/faster_rcnn_r101_fpn_2x_coco_bbox_mAP-0.398_20200504_210455-1d2dac9c.pth'  # noqa: E501
model = dict(
    teacher_cfg='mmdet::faster_rcnn/faster-rcnn_r101_fpn_2x_coco.py',
    teacher_ckpt=teacher_ckpt,
    levels=[1, 2, 3, 4])
