# Tiny GFL teacher for kdops.toy_data: the GFL student at twice the width (FPN 64).
_base_ = ['./gfl_r18_toy_student.py']

model = dict(
    backbone=dict(base_channels=32),
    neck=dict(in_channels=[64, 128, 256], out_channels=64),
    bbox_head=dict(in_channels=64, feat_channels=64))
