# Two-stage teacher of the KD efficacy benchmark for HEAD (benchmarks/efficacy.py, issues 16 and 17): the
# toy Faster R-CNN (ResNet-18 layout, base 32, FPN P2-P6 with the efficacy student's 32 channels so the
# assistant R-CNN head is a copy of this one, 2-FC R-CNN head of 256, 128 sampled RoIs per image) trained
# like the RetinaNet efficacy teacher: 2000 iterations on all 2000 toy images, batch 16, AdamW lr 2e-3
# wd 0.05, warm-up + cosine, clip 10.
_base_ = ['../_base_/faster_rcnn_r18_toy_teacher.py']

max_iters = 2000
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
