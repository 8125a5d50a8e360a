# DeFeat (Guo et al., "Distilling Object Detectors via Decoupled Features", CVPR 2021) on COCO:
# RetinaNet X101-64x4d-FPN (multi-scale 3x) teacher -> RetinaNet R50-FPN student, 1x. The DeFeat
# authors released no code; this follows LutingWang/HEAD's re-implementation (configs/kd/defeat.py):
# a 1x1 conv adapter (256 -> 256) per FPN level, the GT-box foreground and the background each
# normalised per image (background gain 4), MSE summed and weighted 1/256, on all five FPN outputs.
# kdops: FeatureMimicLoss(mask_mode='defeat'), boxes / stride (no image size), see its docstring.
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
        dict(name='defeat', type='FeatureMimicLoss', student='neck', teacher='neck',
             connector=dict(type='conv1x1', in_channels=256, out_channels=256),
             mask_mode='defeat', strides=[8, 16, 32, 64, 128], image_size=None,
             fg_weight=1.0, bg_weight=4.0, normalize='none', loss_weight=1 / 256),
    ])
