# Tiny RetinaNet teacher for kdops.toy_data: the student's layout at twice the width (stages
# 32/64/128/256, FPN 64). Train it with plain mmdet (tools/train.py or python -m kdops_mmdet.train);
# its checkpoint is the distillation configs' model.teacher_ckpt.
_base_ = ['./retinanet_r18_toy_student.py']

model = dict(
    backbone=dict(base_channels=32),
    neck=dict(in_channels=[64, 128, 256], out_channels=64),
    bbox_head=dict(in_channels=64, feat_channels=64))
