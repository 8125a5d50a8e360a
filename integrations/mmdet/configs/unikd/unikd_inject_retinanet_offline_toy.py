# UniKD stage 2 from the offline teacher cache on kdops.toy_data: unikd_inject_retinanet_toy.py with
# model.teacher_cache set -- the teacher is never built; its side of the loss (queries, reference points,
# z^T, positives, positional boxes) is read per image and flip from the cache -- and kdops.CachedFlip in
# place of RandomFlip (it replays a flip the cache holds for the image).
#   python -m kdops_mmdet.cache_teacher integrations/mmdet/configs/unikd/unikd_inject_retinanet_toy.py \
#       --out work_dirs/unikd_cache_retinanet_toy --epochs 2
#   KDOPS_TOY_UNIKD_CACHE=work_dirs/unikd_cache_retinanet_toy \
#       python -m kdops_mmdet.train integrations/mmdet/configs/unikd/unikd_inject_retinanet_offline_toy.py
_base_ = ['./unikd_inject_retinanet_toy.py']

teacher_cache = '{{$KDOPS_TOY_UNIKD_CACHE:work_dirs/unikd_cache_retinanet_toy}}'
model = dict(teacher_cache=teacher_cache)
train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=(128, 128), keep_ratio=True),
    dict(type='kdops.CachedFlip', cache=teacher_cache),
    dict(type='PackDetInputs'),
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
