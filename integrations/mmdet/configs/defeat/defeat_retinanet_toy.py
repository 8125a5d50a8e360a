# DeFeat on kdops.toy_data: the tiny RetinaNet pair, the COCO config's loss (per-image normalised
# GT-box foreground and background, background gain 4, MSE summed, weight 1/256) with a 1x1 conv
# connector per level from the student's 32 to the teacher's 64 channels.
_base_ = ['../pkd/pkd_retinanet_toy.py']

model = dict(
    distill_losses=[
        dict(name='defeat', type='FeatureMimicLoss', student='neck', teacher='neck',
             connector=dict(type='conv1x1', in_channels=32, out_channels=64),
             mask_mode='defeat', strides=[8, 16, 32, 64, 128], image_size=None,
             fg_weight=1.0, bg_weight=4.0, normalize='none', loss_weight=1 / 256),
    ])
