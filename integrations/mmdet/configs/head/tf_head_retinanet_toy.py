# TF-HEAD (teacher-free HEAD) on kdops.toy_data: the toy RetinaNet student (FPN 32) trains with two
# assistants from scratch -- an FCOS head on its P3-P7 and an R-CNN head (RoIAlign, 2 FC of 256) on its
# P3-P6 fed with its own proposals -- and mimics their detached features: 1x1 conv on its last cls conv
# vs FCOS's (weight 1.0), and CKD at each RoI's source pixel vs the R-CNN's last FC (weight 1.3). The
# assistants' GT losses and the mimic losses warm up over 100 iterations (the toy schedule's LR warm-up;
# 2000 on COCO); the mimic losses stop at the first LR drop. RoI budgets scaled to 128x128 images.
_base_ = ['../_base_/retinanet_r18_toy_student.py']
custom_imports = dict(imports=['kdops_mmdet'], allow_failed_imports=False)

model = dict(
    _delete_=True,
    type='kdops.TFHEADDetector',
    student={{_base_.model}},
    featmap_strides=[8, 16, 32, 64],
    proposals=dict(nms_pre=1000, iou_threshold=0.7, max_per_img=300, min_bbox_size=0),
    rcnn_assistant=dict(
        type='StandardRoIHead',
        bbox_roi_extractor=dict(
            type='SingleRoIExtractor',
            roi_layer=dict(type='RoIAlign', output_size=7, sampling_ratio=0),
            out_channels=32,
            featmap_strides=[8, 16, 32, 64]),
        bbox_head=dict(
            type='Shared2FCBBoxHead',
            in_channels=32,
            fc_out_channels=256,
            roi_feat_size=7,
            num_classes=4,
            bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[0., 0., 0., 0.], target_stds=[0.1, 0.1, 0.2, 0.2]),
            reg_class_agnostic=False,
            loss_cls=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0),
            loss_bbox=dict(type='L1Loss', loss_weight=1.0)),
        train_cfg=dict(
            assigner=dict(type='MaxIoUAssigner', pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0.5,
                          match_low_quality=False, ignore_iof_thr=-1),
            sampler=dict(type='RandomSampler', num=128, pos_fraction=0.25, neg_pos_ub=-1, add_gt_as_proposals=True),
            pos_weight=-1,
            debug=False),
        test_cfg=dict(score_thr=0.05, nms=dict(type='nms', iou_threshold=0.5), max_per_img=100)),
    dense_assistant=dict(
        type='FCOSHead',
        num_classes=4,
        in_channels=32,
        stacked_convs=2,
        feat_channels=32,
        strides=[8, 16, 32, 64, 128],
        norm_on_bbox=True,
        centerness_on_reg=True,
        dcn_on_last_conv=False,
        center_sampling=True,
        conv_bias=True,
        loss_cls=dict(type='FocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=0.5),
        loss_bbox=dict(type='GIoULoss', loss_weight=0.5),
        loss_centerness=dict(type='CrossEntropyLoss', use_sigmoid=True, loss_weight=0.5),
        test_cfg=dict(nms_pre=1000, min_bbox_size=0, score_thr=0.05, nms=dict(type='nms', iou_threshold=0.5),
                      max_per_img=100)),
    dense=dict(loss_weight=1.0),
    ckd=dict(loss_weight=1.3))
custom_hooks = [
    dict(type='kdops.KDScheduleHook', warmup_iters=100, losses=['assist']),
    dict(type='kdops.KDScheduleHook', warmup_iters=100, stop_at_first_lr_milestone=True, losses=['dense', 'ckd']),
]
