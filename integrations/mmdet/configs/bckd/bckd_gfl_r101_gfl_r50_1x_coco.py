# BCKD (Pan et al., ICCV 2023) on COCO: GFL R101-FPN (ms 2x) teacher -> GFL R50-FPN student, 1x,
# the authors' setting: TinyTigerPan/BCKD configs/bckd/bckd_r50_gflv1_r101_fpn_coco_1x.py
# (loss_kd = NovelKDLoss weight 1.0 -> alpha_cls; loss_score_kd = GIoULoss weight 4.0 -> alpha_loc;
# SGD lr 0.01). The classification and localisation terms are kdops.losses.BCKDLoss; the student
# head's priors, label weights and positive count come from its own get_targets() (taps).
_base_ = ['mmdet::gfl/gfl_r50_fpn_1x_coco.py']
custom_imports = dict(imports=['kdops_mmdet'], allow_failed_imports=False)

teacher_ckpt = 'https://download.openmmlab.com/mmdetection/v2.0/gfl/gfl_r101_fpn_mstrain_2x_coco/gfl_r101_fpn_mstrain_2x_coco_20200629_200126-dd12f847.pth'  # noqa: E501
model = dict(
    _delete_=True,
    type='kdops.DistillDetector',
    student={{_base_.model}},
    teacher_cfg='mmdet::gfl/gfl_r101_fpn_ms-2x_coco.py',
    teacher_ckpt=teacher_ckpt,
    distill_losses=[
        dict(name='bckd', type='BCKDLoss', student='bbox_head', teacher='bbox_head', alpha_cls=1.0, alpha_loc=4.0,
             beta=1.0, decoder='gfl', loss='giou', reg_max=16, strides=[8, 16, 32, 64, 128]),
    ])

optim_wrapper = dict(optimizer=dict(lr=0.01))
