# LGD (Zhang et al., AAAI 2022) on COCO: Faster R-CNN R50-FPN, 2x schedule, self-distilled from its
# labels: lgd_retinanet_r50_2x_coco.py with mmdet's Faster R-CNN R50 2x as the student. The release's
# configs/Distillation/FasterRCNN/faster_rcnn_R_50_2xMS_stuGuided_addCtxBox=NO_detachAppearanceEmbed=YES_
# preNondistillIters=30k_preFreezeStudentBackboneIters=20k.yaml (detectron2; the release reports 40.5 mAP
# for it): no context box, the appearance embedding detached, lambda 1, the same schedule; SGD lr 0.02
# (mmdet's and the release's). The release trains with multi-scale resizing (shorter side 640-800).
_base_ = ['./lgd_retinanet_r50_2x_coco.py']

model = dict(student='mmdet::faster_rcnn/faster-rcnn_r50_fpn_2x_coco.py',
             lgd=dict(add_context_box=False, detach_appearance=True))
optim_wrapper = dict(optimizer=dict(lr=0.02))
