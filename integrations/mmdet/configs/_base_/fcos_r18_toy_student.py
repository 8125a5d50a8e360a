# Tiny FCOS student for kdops.toy_data (128x128, 4 classes): the toy RetinaNet student's backbone and
# FPN (ResNet-18 layout, 16 base channels, FPN 32 at P3-P7) with an FCOS head (2 convs of 32, GIoU,
# centerness on the regression branch, normalised distances, centre sampling). Regress ranges scaled
# to the toy objects (12-48 px). A plain mmdet config: the baseline, and what init_detector(this
# config, exported checkpoint) loads for a distilled student.
_base_ = ['./retinanet_r18_toy_student.py']

model = dict(
    type='FCOS',
    bbox_head=dict(
        _delete_=True,
        type='FCOSHead',
        num_classes=4,
        in_channels={{_base_.fpn_channels}},
        stacked_convs=2,
        feat_channels={{_base_.fpn_channels}},
        strides=[8, 16, 32, 64, 128],
        regress_ranges=((-1, 32), (32, 64), (64, 128), (128, 256), (256, 1e8)),
        norm_on_bbox=True,
        centerness_on_reg=True,
        center_sampling=True,
        conv_bias=True,
        dcn_on_last_conv=False,
        loss_cls=dict(type='FocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0),
        loss_bbox=dict(type='GIoULoss', loss_weight=1.0),
        loss_centerness=dict(type='CrossEntropyLoss', use_sigmoid=True, loss_weight=1.0)),
    train_cfg=dict(_delete_=True, assigner=None, allowed_border=-1, pos_weight=-1, debug=False),
    test_cfg=dict(nms_pre=1000, min_bbox_size=0, score_thr=0.05, nms=dict(type='nms', iou_threshold=0.5),
                  max_per_img=100))
