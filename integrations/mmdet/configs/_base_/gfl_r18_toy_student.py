# Tiny GFL student for kdops.toy_data (128x128, 4 classes): the RetinaNet toy's backbone and FPN
# (16 base channels, FPN 32) with mmdet's GFLHead (reg_max 16, ATSS assignment). A plain mmdet config.
_base_ = ['./retinanet_r18_toy_student.py']

model = dict(
    type='GFL',
    bbox_head=dict(
        _delete_=True,
        type='GFLHead',
        num_classes=4,
        in_channels=32,
        stacked_convs=2,
        feat_channels=32,
        norm_cfg=dict(type='GN', num_groups=8, requires_grad=True),  # 32 groups of 1 channel would be degenerate
        anchor_generator=dict(
            type='AnchorGenerator',
            ratios=[1.0],
            octave_base_scale=4,  # 32 px on P3: toy objects are 12-48 px
            scales_per_octave=1,
            strides=[8, 16, 32, 64, 128]),
        loss_cls=dict(type='QualityFocalLoss', use_sigmoid=True, beta=2.0, loss_weight=1.0),
        loss_dfl=dict(type='DistributionFocalLoss', loss_weight=0.25),
        reg_max=16,
        loss_bbox=dict(type='GIoULoss', loss_weight=2.0)),
    train_cfg=dict(
        _delete_=True,
        assigner=dict(type='ATSSAssigner', topk=9),
        allowed_border=-1,
        pos_weight=-1,
        debug=False),
    test_cfg=dict(nms=dict(type='nms', iou_threshold=0.6)))
