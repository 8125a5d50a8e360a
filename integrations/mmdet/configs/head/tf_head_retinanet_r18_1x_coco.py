# TF-HEAD (Wang et al., ECCV 2022): RetinaNet R18 trained with an FCOS assistant on P3-P7 and a
# Faster R-CNN R-CNN head on P3-P6 (both from scratch, no teacher), 1x schedule. The release's settings
# (configs/kd/fcos_retina_faster_r18_head.py, there with roles of FCOS and RetinaNet swapped): FCOS
# assistant losses at 0.5 (focal, GIoU, centerness), R-CNN head as in Faster R-CNN (512 RoIs, 25%
# positives, GT added), the student's proposals (nms_pre 2000, NMS 0.7, 1000 per image); dense mimic
# weight 1.0 (1x1 conv on the last cls conv), CKD 1.3; the assistants' GT losses and the mimic losses
# warm up over 2000 iterations; the mimic losses stop at the first LR drop (epoch 8).
_base_ = ['mmdet::retinanet/retinanet_r18_fpn_1x_coco.py']
custom_imports = dict(imports=['kdops_mmdet'], allow_failed_imports=False)

model = dict(
    _delete_=True,
    type='kdops.TFHEADDetector',
    student={{_base_.model}},
    featmap_strides=[8, 16, 32, 64],
    proposals=dict(nms_pre=2000, iou_threshold=0.7, max_per_img=1000, min_bbox_size=0),
    rcnn_assistant=dict(
        type='StandardRoIHead',
        bbox_roi_extractor=dict(
            type='SingleRoIExtractor',
            roi_layer=dict(type='RoIAlign', output_size=7, sampling_ratio=0),
            out_channels=256,
            featmap_strides=[8, 16, 32, 64]),
        bbox_head=dict(
            type='Shared2FCBBoxHead',
            in_channels=256,
            fc_out_channels=1024,
            roi_feat_size=7,
            num_classes=80,
            bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[0., 0., 0., 0.], target_stds=[0.1, 0.1, 0.2, 0.2]),
            reg_class_agnostic=False,
            loss_cls=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0),
            loss_bbox=dict(type='L1Loss', loss_weight=1.0)),
        train_cfg=dict(
            assigner=dict(type='MaxIoUAssigner', pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0.5,
                          match_low_quality=False, ignore_iof_thr=-1),
            sampler=dict(type='RandomSampler', num=512, pos_fraction=0.25, neg_pos_ub=-1, add_gt_as_proposals=True),
            pos_weight=-1,
            debug=False),
        test_cfg=dict(score_thr=0.05, nms=dict(type='nms', iou_threshold=0.5), max_per_img=100)),
    dense_assistant=dict(
        type='FCOSHead',
        num_classes=80,
        in_channels=256,
        stacked_convs=4,
        feat_channels=256,
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
    dict(type='kdops.KDScheduleHook', warmup_iters=2000, losses=['assist']),
    dict(type='kdops.KDScheduleHook', warmup_iters=2000, stop_at_first_lr_milestone=True, losses=['dense', 'ckd']),
]
