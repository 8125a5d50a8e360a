# Teacher of the KD efficacy benchmark (benchmarks/efficacy.py, issue 16): the student's layout with 32 base
# channels (stages 32/64/128/256), FPN 64 at strides 8/16/32, TWO head convs (3.1 M parameters),
# 2000 iterations on all 2000 toy images, same optimiser and schedule as the student.
_base_ = ['./retinanet_r18_efficacy_student.py']

max_iters = 2000
model = dict(
    backbone=dict(base_channels=32),
    neck=dict(in_channels=[64, 128, 256], out_channels=64),
    bbox_head=dict(in_channels=64, feat_channels=64, stacked_convs=2))
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=100),
    dict(type='CosineAnnealingLR', by_epoch=False, begin=100, end=max_iters, T_max=max_iters - 100, eta_min=0.0),
]
default_hooks = dict(checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=max_iters, max_keep_ckpts=1))
