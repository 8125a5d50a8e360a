# PKD (Cao et al., NeurIPS 2022) on COCO: RetinaNet X101-64x4d-FPN teacher -> RetinaNet R50-FPN student,
# 2x schedule, mmrazor's setting: open-mmlab/mmrazor configs/distill/mmdet/pkd/
# pkd_fpn_retina_x101_retina_r50_2x_coco.py (PKDLoss with loss_weight 10 on each of the FPN outputs
# 0-3, i.e. P3-P6, overriding the weight 6 of its base pkd_fpn_frcnn_r101_frcnn_r50_2x_coco.py;
# lr 0.01). mmrazor reports 40.8 mAP (student alone 37.4, teacher 41.0).
# No find_unused_parameters: every KD term stays in the graph (see kdops_mmdet.hooks).
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
        dict(name='pkd', type='PKDLoss', student='neck', teacher='neck', levels=[0, 1, 2, 3], loss_weight=10),
    ])

optim_wrapper = dict(optimizer=dict(lr=0.01))
