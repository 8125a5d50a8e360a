# FitNet-style hint learning (Romero et al., ICLR 2015) on the FPN of the toy RetinaNet pair: a plain
# MSE (kdops.losses.FeatureMimicLoss, normalize="numel", no masks) between each student FPN level
# mapped by a 1x1 conv regressor (the connector) and the teacher's level. Toy weights, not a
# published detection setting.
_base_ = ['../pkd/pkd_retinanet_toy.py']

model = dict(
    distill_losses=[
        dict(name='fitnet', type='FeatureMimicLoss', student='neck', teacher='neck', levels=[0, 1, 2, 3, 4],
             connector=dict(type='conv1x1', in_channels=32, out_channels=64), normalize='numel', loss_weight=1.0),
    ])
