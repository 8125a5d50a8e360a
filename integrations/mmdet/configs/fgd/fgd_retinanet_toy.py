# FGD on kdops.toy_data: the tiny RetinaNet pair of pkd_retinanet_toy.py, the COCO config's weights on
# all five FPN levels. FGDLoss aligns the student's 32 channels to the teacher's 64 itself (its 1x1
# `align` conv, as in the authors' code), so the entry has no connector.
_base_ = ['../pkd/pkd_retinanet_toy.py']

model = dict(
    distill_losses=[
        dict(name='fgd', type='FGDLoss', student='neck', teacher='neck', teacher_channels=64, student_channels=32,
             num_levels=5, strides=[8, 16, 32, 64, 128], alpha_fgd=1e-3, beta_fgd=5e-4, gamma_fgd=5e-4,
             lambda_fgd=5e-6, temperature=0.5, image_size='img_shape'),
    ])
