# FGD (Yang et al., CVPR 2022) on COCO: RetinaNet X101-64x4d-FPN teacher -> RetinaNet R50-FPN student,
# 2x, the authors' setting: yzd-v/FGD configs/distillers/fgd/
# fgd_retina_rx101_64x4d_distill_retina_r50_fpn_2x_coco.py (FeatureLoss on neck.fpn_convs.{0..4}.conv,
# i.e. the five FPN outputs, alpha 1e-3, beta 5e-4, gamma 5e-4, lambda 5e-6, temperature 0.5; SGD lr 0.01,
# grad clip 35). kdops.losses.FGDLoss holds the five levels' GcBlocks (trained, dropped at export);
# masks from the GT boxes and each image's unpadded img_shape, as the authors' code.
_base_ = ['mmdet::retinanet/retinanet_r50_fpn_2x_coco.py']
custom_imports = dict(imports=['kdops_mmdet'], allow_failed_imports=False)

teacher_ckpt = 'https://download.openmmlab.com/mmdetection/v2.0/retinanet/retinanet_x101_64x4d_fpn_1x_coco/retinanet_x101_64x4d_fpn_1x_coco_20200130-366f5af1.pth'  # noqa: E501
model = dict(
    _delete_=True,
    type='kdops.DistillDetector',
    student={{_base_.model}},
    teacher_cfg='mmdet::retinanet/retinanet_x101-64x4d_fpn_1x_coco.py',
    teacher_ckpt=teacher_ckpt,
    distill_losses=[
        dict(name='fgd', type='FGDLoss', student='neck', teacher='neck', teacher_channels=256, student_channels=256,
             num_levels=5, strides=[8, 16, 32, 64, 128], alpha_fgd=1e-3, beta_fgd=5e-4, gamma_fgd=5e-4,
             lambda_fgd=5e-6, temperature=0.5, image_size='img_shape'),
    ])

optim_wrapper = dict(optimizer=dict(lr=0.01), clip_grad=dict(max_norm=35, norm_type=2))
