# FitNet hints (Romero et al., ICLR 2015) for detection on COCO, as LutingWang/HEAD's baseline
# (configs/kd/fitnet.py): RetinaNet X101-64x4d-FPN (multi-scale 3x) teacher -> RetinaNet R50-FPN
# student, 1x; a 1x1 conv regressor (256 -> 256) per FPN level and a plain mean-squared error
# (weight 1.0) on all five FPN outputs. kdops: FeatureMimicLoss(normalize='numel'), no masks.
_base_ = ['mmdet::retinanet/retinanet_r50_fpn_1x_coco.py']
custom_imports = dict(imports=['kdops_mmdet'], allow_failed_imports=False)

teacher_ckpt = 'https://download.openmmlab.com/mmdetection/v2.0/retinanet/retinanet_x101_64x4d_fpn_mstrain_3x_coco/retinanet_x101_64x4d_fpn_mstrain_3x_coco_20210719_051838-022c2187.pth'  # noqa: E501
model = dict(
    _delete_=True,
    type='kdops.DistillDetector',
    student={{_base_.model}},
    teacher_cfg='mmdet::retinanet/retinanet_x101-64x4d_fpn_ms-640-800-3x_coco.py',
    teacher_ckpt=teacher_ckpt,
    distill_losses=[
        dict(name='fitnet', type='FeatureMimicLoss', student='neck', teacher='neck',
             connector=dict(type='conv1x1', in_channels=256, out_channels=256), normalize='numel',
             loss_weight=1.0),
    ])
