# Tiny Faster R-CNN teacher for kdops.toy_data (HEAD's heterogeneous pair): ResNet-18 layout with 32
# base channels (stages 32/64/128/256), FPN P2-P6 with the RetinaNet toy student's 32 channels (HEAD
# copies the teacher's R-CNN head onto the student's FPN: equal channels, as 256/256 on COCO), RPN
# anchors of 16 px on P2 for the 12-48 px toy objects, a 2-FC R-CNN head of 256, and RoI budgets
# scaled to the 128x128 images (1/65 of a COCO image's area, 1-5 objects): 300 RPN proposals and 128
# sampled RoIs per image (COCO: 1000 and 512). A plain mmdet config: train it with
# python -m kdops_mmdet.train (or tools/train.py) for the HEAD toy configs.
_base_ = ['./kdops_toy_detection.py', 'mmdet::_base_/models/faster-rcnn_r50_fpn.py']

model = dict(
    backbone=dict(depth=18, base_channels=32, frozen_stages=-1, norm_eval=False, init_cfg=None),
    neck=dict(in_channels=[32, 64, 128, 256], out_channels=32, num_outs=5),
    rpn_head=dict(in_channels=32, feat_channels=32, anchor_generator=dict(scales=[4])),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=32),
        bbox_head=dict(in_channels=32, fc_out_channels=256, num_classes=4)),
    train_cfg=dict(rpn_proposal=dict(nms_pre=1000, max_per_img=300), rcnn=dict(sampler=dict(num=128))),
    test_cfg=dict(rpn=dict(max_per_img=300)))
