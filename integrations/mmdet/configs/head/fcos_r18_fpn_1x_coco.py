# The FCOS R18 student of HEAD's Table 4 as a plain mmdet config (mmdet ships none): mmdet's FCOS recipe
# (GN head, GIoU, centre sampling, centerness on the regression branch, normalised distances, 1x) on a
# ResNet-18 from torchvision's ImageNet weights, FPN 256 at P3-P7 like the Faster R-CNN teacher's. It
# trains alone as the baseline, and init_detector(this config, an exported HEAD student) loads one.
_base_ = ['mmdet::fcos/fcos_r50-caffe_fpn_gn-head-center-normbbox-centeronreg-giou_1x_coco.py']

model = dict(
    data_preprocessor=dict(type='DetDataPreprocessor', mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375],
                           bgr_to_rgb=True, pad_size_divisor=32),
    backbone=dict(type='ResNet', depth=18, num_stages=4, out_indices=(1, 2, 3), frozen_stages=1,
                  norm_cfg=dict(type='BN', requires_grad=True), norm_eval=True, style='pytorch',
                  init_cfg=dict(type='Pretrained', checkpoint='torchvision://resnet18')),
    neck=dict(in_channels=[128, 256, 512], start_level=0))
