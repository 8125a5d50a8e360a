# Student of the KD efficacy benchmark (benchmarks/efficacy.py, issue 16): ResNet-18 layout with 8 base
# channels (stages 8/16/32/64, C3-C5 out), FPN 32 channels at strides 8/16/32 only, RetinaHead with ONE
# stacked conv (0.25 M parameters). AdamW lr 2e-3 wd 0.05, linear warm-up + cosine, grad clip 10,
# batch 16, horizontal flip. A plain mmdet config: it is also the no-KD baseline.
_base_ = ['../_base_/retinanet_r18_toy_student.py']

base_channels = 8
fpn_channels = 32
max_iters = 1500
model = dict(
    backbone=dict(base_channels=base_channels),
    neck=dict(in_channels=[base_channels * 2, base_channels * 4, base_channels * 8], out_channels=fpn_channels,
              add_extra_convs=False, num_outs=3),
    bbox_head=dict(in_channels=fpn_channels, feat_channels=fpn_channels, stacked_convs=1,
                   anchor_generator=dict(strides=[8, 16, 32])))
train_dataloader = dict(batch_size=16, num_workers=0)
val_dataloader = dict(batch_size=16, num_workers=0)
test_dataloader = val_dataloader
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=100),
    dict(type='CosineAnnealingLR', by_epoch=False, begin=100, end=max_iters, T_max=max_iters - 100, eta_min=0.0),
]
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=2e-3, weight_decay=0.05),
    clip_grad=dict(max_norm=10, norm_type=2))
default_hooks = dict(checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=max_iters, max_keep_ckpts=1),
                     logger=dict(type='LoggerHook', interval=50))
