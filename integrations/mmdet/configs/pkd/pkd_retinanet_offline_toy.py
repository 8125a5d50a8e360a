# PKD from an offline teacher feature cache on kdops.toy_data: pkd_retinanet_toy.py with model.teacher_cache
# set -- the teacher is never built; its FPN maps are read per image and flip from the cache -- and
# kdops.CachedFlip in place of RandomFlip (it replays a flip the cache holds for the image).
#   KDOPS_TOY_TEACHER_CKPT=... python -m kdops_mmdet.cache_teacher \
#       integrations/mmdet/configs/pkd/pkd_retinanet_toy.py --out work_dirs/pkd_cache_retinanet_toy --epochs 2
#   KDOPS_TOY_TEACHER_CKPT=... KDOPS_TOY_FEATURE_CACHE=work_dirs/pkd_cache_retinanet_toy \
#       python -m kdops_mmdet.train integrations/mmdet/configs/pkd/pkd_retinanet_offline_toy.py
# (the teacher checkpoint is hashed into the cache's fingerprint, not loaded)
_base_ = ['./pkd_retinanet_toy.py']

teacher_cache = '{{$KDOPS_TOY_FEATURE_CACHE:work_dirs/pkd_cache_retinanet_toy}}'
model = dict(teacher_cache=teacher_cache)
train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=(128, 128), keep_ratio=True),
    dict(type='kdops.CachedFlip', cache=teacher_cache),
    dict(type='PackDetInputs'),
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
