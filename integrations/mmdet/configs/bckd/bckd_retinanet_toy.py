# BCKD on a RetinaNet head (kdops.toy_data): the tiny RetinaNet teacher (FPN 64) -> the tiny student
# (FPN 32), the authors' weights (classification 1.0, GIoU localisation 4.0). The box decoding
# (DeltaXYWH, means/stds) is read from the student's head; the anchors and label weights come from
# the head's own get_anchors()/get_targets() (taps). Head outputs have the same shapes on both sides
# (9 anchors x 4 classes, 9 x 4 deltas), so no connector.
_base_ = ['../pkd/pkd_retinanet_toy.py']

model = dict(
    distill_losses=[
        dict(name='bckd', type='BCKDLoss', student='bbox_head', teacher='bbox_head', alpha_cls=1.0, alpha_loc=4.0,
             beta=1.0, loss='giou'),
    ])
