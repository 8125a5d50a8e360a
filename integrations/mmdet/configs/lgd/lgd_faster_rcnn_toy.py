# LGD on kdops.toy_data for a two-stage student: lgd_retinanet_toy.py with the tiny Faster R-CNN (FPN 32,
# P2-P6) as the student; the instructive features also go through its RPN and R-CNN head with the GT
# (loss_rpn_cls_tea, loss_cls_tea, ...). The release's Faster R-CNN setting: no context box, the
# appearance embedding detached. Same schedule.
#   python -m kdops.toy_data data/kdops_toy
#   python -m kdops_mmdet.train integrations/mmdet/configs/lgd/lgd_faster_rcnn_toy.py
_base_ = ['./lgd_retinanet_toy.py']

model = dict(
    student='{{fileDirname}}/../_base_/faster_rcnn_r18_toy_teacher.py',
    lgd=dict(add_context_box=False, detach_appearance=True))
