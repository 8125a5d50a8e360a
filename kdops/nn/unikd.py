r"""UniKD's learnable blocks (Lao et al., "UniKD: Universal Knowledge Distillation for Mimicking
Homogeneous or Heterogeneous Object Detectors", ICCV 2023), framework-free.

UniKD distils *knowledge embeddings* instead of raw features. An Adaptive Knowledge Extractor
(AKE) holds knowledge queries that probe a detector's FPN with deformable cross-attention:

- :class:`UniKDDecoderLayer` -- one Deformable-DETR decoder layer (self-attention over the
  queries, multi-scale deformable cross-attention on the FPN through :class:`kdops.nn.MSDeformAttn`,
  FFN; post-norm).
- :class:`AdaptiveKnowledgeExtractor` -- ``kind="content"``: learnable queries and reference
  points (Deformable DETR); ``kind="positional"``: queries encoded from boxes sampled around the
  GT (:func:`kdops.losses.sample_positional_boxes`). Each has a query generator
  :math:`f` (one layer, on the teacher's FPN), an extractor :math:`f_e` (two layers) and, for
  stage 1 only, a prediction head.
- :class:`UniKDAdaptor` -- the student-side feature adaptor: a per-level 1x1 conv ("FC") and two
  deformable self-attention (Deformable DETR encoder) layers over all levels' pixels.

Training in two stages: stage 1 trains each AKE on the frozen teacher's FPN with a DETR loss
(:class:`kdops.losses.UniKDMatchingLoss`) on ``predict(extract(*generate(T), T))``. Stage 2, as
these modules are meant to be used (keeping the AKEs frozen in stage 2 is our reading of the
paper): per batch ``q, ref = ake.generate(T)`` (teacher side, no gradient),
``z_T = ake.extract(q, ref, T)``, ``z_S = ake.extract(q, ref, adaptor(S))`` and
:class:`kdops.losses.UniKDLoss` compares ``z_S`` with ``z_T``; gradients reach the student and the
adaptor through the frozen extractor.

No code was released; the choices the paper leaves open are listed in each class's docstring.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..ops._validation import check_choice, check_levels, check_number, check_tensor
from .ms_deform_attn import MSDeformAttn

__all__ = ["AdaptiveKnowledgeExtractor", "UniKDAdaptor", "UniKDDecoderLayer"]

Flat = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def flatten_levels(features: Sequence[torch.Tensor]) -> Flat:
    """L maps (N,C,H_l,W_l) -> value (N,S,C) (levels' row-major pixels concatenated),
    spatial_shapes (L,2) int64 rows (H_l, W_l), level_start_index (L,) int64 -- what
    :class:`kdops.nn.MSDeformAttn` takes. Shapes come from the tensors' sizes (no device read)."""
    value = torch.cat([f.flatten(2).transpose(1, 2) for f in features], 1)
    dev = value.device
    shapes = torch.tensor([tuple(f.shape[-2:]) for f in features], dtype=torch.int64, device=dev)
    sizes = [f.shape[-2] * f.shape[-1] for f in features]
    starts = torch.tensor([sum(sizes[:i]) for i in range(len(sizes))], dtype=torch.int64, device=dev)
    return value, shapes, starts


def sine_embed(coords: torch.Tensor, dims_per_coord: int, temperature: float = 10000.0) -> torch.Tensor:
    r"""DETR's sine encoding of normalised coordinates (...,k) -> (..., k·d): for each coordinate
    v in [0,1], :math:`[\sin(2\pi v/T^{2i/d}), \cos(2\pi v/T^{2i/d})]_{i<d/2}` interleaved (d even)."""
    i = torch.arange(dims_per_coord, dtype=coords.dtype, device=coords.device)
    dim_t = temperature ** (2 * torch.div(i, 2, rounding_mode="floor") / dims_per_coord)
    pos = coords[..., None] * (2 * math.pi) / dim_t  # (..., k, d)
    pos = torch.stack([pos[..., 0::2].sin(), pos[..., 1::2].cos()], -1).flatten(-2)
    return pos.flatten(-2)


def _inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def _ffn(embed_dims: int, ffn_dims: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(embed_dims, ffn_dims), nn.ReLU(), nn.Dropout(dropout),
                         nn.Linear(ffn_dims, embed_dims), nn.Dropout(dropout))


def _check_features(owner: str, features, num_levels: int, embed_dims: int, like: Optional[torch.Tensor],
                    name: str = "features") -> torch.Tensor:
    """A list/tuple of ``num_levels`` maps (N,embed_dims,H_l,W_l), one N, dtype and device
    (those of ``like`` when given). Returns the first level."""
    if not isinstance(features, (list, tuple)):
        raise TypeError(f"{owner}: `{name}` must be a list or tuple of {num_levels} (N,C,H,W) maps (one per "
                        f"FPN level), got {type(features).__name__}")
    if len(features) != num_levels:
        raise ValueError(f"{owner}: `{name}` must hold num_levels={num_levels} maps, got {len(features)}")
    first = check_levels(owner, name, list(features), True)
    if first.shape[1] != embed_dims:
        raise ValueError(f"{owner}: `{name}` must have embed_dims={embed_dims} channels, got {first.shape[1]} "
                         "(project them first, e.g. with kdops.nn.UniKDAdaptor)")
    if like is not None:
        if first.device != like.device:
            raise ValueError(f"{owner}: `{name}` are on {first.device} but the queries on {like.device}; "
                             "move every input to one device")
        if first.dtype != like.dtype:
            raise TypeError(f"{owner}: `{name}` are {first.dtype} but the queries {like.dtype}; use one dtype")
        if first.shape[0] != like.shape[0]:
            raise ValueError(f"{owner}: `{name}` have batch {first.shape[0]} but the queries {like.shape[0]}")
    return first


def _check_reference(owner: str, name: str, ref, query: torch.Tensor) -> None:
    check_tensor(owner, name, ref, ndim=3, like=query, what="(N,Q,2) points or (N,Q,4) boxes")
    N, Q = query.shape[:2]
    if tuple(ref.shape[:2]) != (N, Q) or ref.shape[2] not in (2, 4):
        raise ValueError(f"{owner}: `{name}` must be (N,Q,2) points (x,y) or (N,Q,4) boxes (cx,cy,w,h), "
                         f"normalised, with (N,Q) = ({N},{Q}), got {tuple(ref.shape)}")


class UniKDDecoderLayer(nn.Module):
    r"""One Deformable DETR decoder layer (post-norm), UniKD's building block (Lao et al., ICCV 2023).

    .. math::
        q &\leftarrow \mathrm{LN}\big(q + \mathrm{MHA}(q + p,\; q + p,\; q)\big)\\
        q &\leftarrow \mathrm{LN}\big(q + \mathrm{MSDA}(q + p,\; r,\; \{F_l\})\big)\\
        q &\leftarrow \mathrm{LN}\big(q + W_2\,\mathrm{ReLU}(W_1 q)\big)

    with p the query position (optional), r the reference points or boxes and MSDA
    :class:`kdops.nn.MSDeformAttn` sampling the maps :math:`F_l` (Zhu et al., ICLR 2021, Eq. 3).
    Submodule names follow mmdet's ``DeformableDetrTransformerDecoderLayer``: ``self_attn``
    (``torch.nn.MultiheadAttention``), ``cross_attn``, ``ffn``, ``norms``.

    Args:
        embed_dims: C (256); divisible by ``num_heads``.
        num_heads: heads of both attentions (8).
        num_levels: FPN levels L the cross-attention samples (4).
        num_points: sampling points per head and level (4).
        ffn_dims: hidden width of the FFN (1024, Deformable DETR's).
        dropout: dropout after each sub-layer (0.0).
    """

    def __init__(self, embed_dims: int = 256, num_heads: int = 8, num_levels: int = 4, num_points: int = 4,
                 ffn_dims: int = 1024, dropout: float = 0.0) -> None:
        super().__init__()
        owner = type(self).__name__
        for name, v in (("embed_dims", embed_dims), ("num_heads", num_heads), ("num_levels", num_levels),
                        ("num_points", num_points), ("ffn_dims", ffn_dims)):
            check_number(owner, name, v, low=1, integer=True)
        check_number(owner, "dropout", dropout, low=0.0, high=1.0)
        if embed_dims % num_heads:
            raise ValueError(f"{owner}: `embed_dims` must be divisible by num_heads={num_heads}, got {embed_dims}")
        self.embed_dims, self.num_levels = embed_dims, num_levels
        self.self_attn = nn.MultiheadAttention(embed_dims, num_heads, dropout=dropout, batch_first=True)
        self.cross_attn = MSDeformAttn(embed_dims, num_heads, num_levels, num_points, dropout=dropout,
                                       batch_first=True)
        self.ffn = _ffn(embed_dims, ffn_dims, dropout)
        self.dropout = nn.Dropout(dropout)
        self.norms = nn.ModuleList(nn.LayerNorm(embed_dims) for _ in range(3))

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor, features: Sequence[torch.Tensor],
                query_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        r"""One decoder step (Deformable DETR, Zhu et al., ICLR 2021; UniKD, Lao et al., ICCV 2023).

        Args:
            query: (N,Q,C) queries.
            reference_points: (N,Q,2) normalised (x, y) in [0,1], or (N,Q,4) normalised boxes
                (cx, cy, w, h) -- then the sampling offsets scale with the box (MSDeformAttn's rule).
                The same reference is used on every level (no padding, valid ratios 1).
            features: L maps (N,C,H_l,W_l), flattened here into MSDeformAttn's value,
                spatial_shapes and level_start_index.
            query_pos: (N,Q,C) added to the query before self-attention's q, k and before the
                cross-attention's offsets and weights; None: no position.

        Returns:
            (N,Q,C) updated queries.
        """
        owner = type(self).__name__
        self._check(owner, query, reference_points, query_pos)
        _check_features(owner, features, self.num_levels, self.embed_dims, query)
        return self.run(query, reference_points, flatten_levels(features), query_pos)

    def _check(self, owner: str, query, reference_points, query_pos) -> None:
        check_tensor(owner, "query", query, ndim=3, what="(N,Q,C)")
        if query.shape[-1] != self.embed_dims:
            raise ValueError(f"{owner}: `query` must be (N,Q,C) with C=embed_dims={self.embed_dims}, "
                             f"got {tuple(query.shape)}")
        _check_reference(owner, "reference_points", reference_points, query)
        if query_pos is not None:
            check_tensor(owner, "query_pos", query_pos, like=query, shape=tuple(query.shape), what="(N,Q,C)")

    def run(self, query: torch.Tensor, reference_points: torch.Tensor, flat: Flat,
            query_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        """:meth:`forward` on already checked inputs and :func:`flatten_levels` output (shared by
        stacked layers, so the maps are flattened once)."""
        value, shapes, starts = flat
        qk = query if query_pos is None else query + query_pos
        attn = self.self_attn(qk, qk, query, need_weights=False)[0]
        query = self.norms[0](query + self.dropout(attn))
        ref = reference_points[:, :, None, :].expand(-1, -1, self.num_levels, -1)
        query = self.norms[1](self.cross_attn(query, value=value, query_pos=query_pos, reference_points=ref,
                                              spatial_shapes=shapes, level_start_index=starts))
        return self.norms[2](query + self.ffn(query))


class AdaptiveKnowledgeExtractor(nn.Module):
    r"""UniKD's Adaptive Knowledge Extractor (AKE; Lao et al., ICCV 2023).

    ``kind="content"``: :math:`Q` learnable queries, ``query_embed`` (Q, 2C) split into a position
    :math:`p` and a content :math:`e` (Deformable DETR's ``query_embed``), reference points
    :math:`r = \sigma(W_r p)` (N,Q,2), and the query generator
    :math:`q_{ct} = f(e, p, r; F^T)`.

    ``kind="positional"``: boxes b (N,Q,4), normalised (cx, cy, w, h), become queries
    :math:`q^0 = W_b\,\mathrm{PE}(b)` -- PE the sine encoding of each of the 4 coordinates with
    C/4 dims (DETR's, temperature 10000, scale 2π), :math:`W_b` one Linear C->C -- and
    :math:`q_{pos} = f_{pos}(q^0, r=b; F^T)`.

    Both then share the form of the extractor :math:`z = f_e(q, r; F)` (``num_extractor_layers``
    :class:`UniKDDecoderLayer`, run on the teacher's maps or the adapted student's) and the
    stage-1 prediction head (Deformable DETR's: ``class_embed`` Linear C->K with bias
    :math:`-\log((1-0.01)/0.01)`, ``bbox_embed`` 3-layer MLP with zero-initialised last layer).

    Parameter count at the defaults (C=256, 8 heads, 4 levels, 4 points, FFN 1024, Q=200, 2
    extractor layers, computed from this code): one :class:`UniKDDecoderLayer` has 1,020,544
    parameters (self-attention 263,168; deformable cross-attention 230,272; FFN 525,568; norms
    1,536). Content AKE: 3,164,546 without the prediction head (queries 102,400, reference
    Linear 514, 3 layers), 3,317,718 with it (80 classes). Positional AKE: 3,127,424 without the
    head (box FC 65,792, 3 layers), 3,280,596 with it. Both AKEs: 6,291,970 without the heads,
    6,598,314 with them. The paper reports ≈1.56 M for both; with Deformable DETR's layer
    (FFN 1024) three layers per AKE cannot be that small, so the paper's layers must be narrower
    (fewer FFN dims, shared layers, or fewer layers) -- it does not say which; ``ffn_dims``,
    ``num_extractor_layers`` and ``embed_dims`` are the knobs.

    Assumptions where the paper is silent: the generator and extractor layers use no query
    position except the content generator's :math:`p` (the generated q already carries
    position); the extractor keeps the references fixed (no iterative box refinement); the
    positional generator's reference is the box itself (MSDeformAttn's box mode); every
    decoder layer is Deformable DETR's post-norm layer.

    Args:
        kind: "content" or "positional".
        embed_dims: C (256); divisible by 8 for the positional kind (4 sine parts of even width).
        num_heads, num_levels, num_points, ffn_dims, dropout: of every :class:`UniKDDecoderLayer`.
        num_queries: content queries Q (200); unused by the positional kind.
        num_extractor_layers: layers of :math:`f_e` (2).
        num_classes: K of the prediction head (80).
    """

    def __init__(self, kind: str = "content", embed_dims: int = 256, num_heads: int = 8, num_levels: int = 4,
                 num_points: int = 4, ffn_dims: int = 1024, num_queries: int = 200, num_extractor_layers: int = 2,
                 num_classes: int = 80, dropout: float = 0.0) -> None:
        super().__init__()
        owner = type(self).__name__
        self.kind = check_choice(owner, "kind", kind, ("content", "positional"))
        for name, v in (("num_queries", num_queries), ("num_extractor_layers", num_extractor_layers),
                        ("num_classes", num_classes), ("embed_dims", embed_dims)):
            check_number(owner, name, v, low=1, integer=True)
        if kind == "positional" and embed_dims % 8:
            raise ValueError(f"{owner}: `embed_dims` must be divisible by 8 for kind='positional' (4 sine "
                             f"encodings of even width C/4), got {embed_dims}")
        C = self.embed_dims = embed_dims
        self.num_levels, self.num_queries, self.num_classes = num_levels, num_queries, num_classes
        layer = dict(embed_dims=C, num_heads=num_heads, num_levels=num_levels, num_points=num_points,
                     ffn_dims=ffn_dims, dropout=dropout)
        if kind == "content":
            self.query_embed = nn.Embedding(num_queries, 2 * C)
            self.reference_points = nn.Linear(C, 2)
        else:
            self.box_embed = nn.Linear(C, C)
        self.generator = UniKDDecoderLayer(**layer)
        self.extractor = nn.ModuleList(UniKDDecoderLayer(**layer) for _ in range(num_extractor_layers))
        self.class_embed = nn.Linear(C, num_classes)
        self.bbox_embed = nn.Sequential(nn.Linear(C, C), nn.ReLU(), nn.Linear(C, C), nn.ReLU(), nn.Linear(C, 4))
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Deformable DETR's: xavier reference Linear with zero bias, class prior 0.01, zero last
        box layer (the decoder layers keep their own initialisation)."""
        if self.kind == "content":
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.constant_(self.reference_points.bias, 0.0)
        nn.init.constant_(self.class_embed.bias, -math.log((1 - 0.01) / 0.01))
        nn.init.constant_(self.bbox_embed[-1].weight, 0.0)
        nn.init.constant_(self.bbox_embed[-1].bias, 0.0)

    def generate(self, features: Sequence[torch.Tensor],
                 boxes: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """The query generator f / f_pos, run on the teacher's maps.

        Args:
            features: L maps (N,C,H_l,W_l) (the teacher's FPN).
            boxes: positional kind only: (N,Q,4) normalised (cx, cy, w, h); None for content.

        Returns:
            (q, reference): (N,Q,C) knowledge queries and (N,Q,2) reference points (content) or
            the boxes (N,Q,4) (positional).
        """
        owner = f"{type(self).__name__}.generate"
        first = _check_features(owner, features, self.num_levels, self.embed_dims, None)
        flat = flatten_levels(features)
        if self.kind == "content":
            if boxes is not None:
                raise ValueError(f"{owner}: `boxes` must be None for kind='content' (its queries are learnt)")
            pos, content = self.query_embed.weight.split(self.embed_dims, 1)
            N = first.shape[0]
            pos, content = pos.expand(N, -1, -1), content.expand(N, -1, -1)
            reference = self.reference_points(pos).sigmoid()
            return self.generator.run(content, reference, flat, pos), reference
        check_tensor(owner, "boxes", boxes, ndim=3, like=first, what="(N,Q,4) normalised (cx,cy,w,h)")
        if boxes.shape[0] != first.shape[0] or boxes.shape[2] != 4:
            raise ValueError(f"{owner}: `boxes` must be (N,Q,4) normalised (cx,cy,w,h) with N={first.shape[0]}, "
                             f"got {tuple(boxes.shape)}")
        if boxes.dtype != first.dtype:
            raise TypeError(f"{owner}: `boxes` must have the dtype of `features` ({first.dtype}), got {boxes.dtype}")
        query = self.box_embed(sine_embed(boxes, self.embed_dims // 4))
        return self.generator.run(query, boxes, flat), boxes

    def extract(self, q: torch.Tensor, reference: torch.Tensor, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """The extractor f_e: the queries probe ``features`` (teacher's, or the adapted student's)
        through ``num_extractor_layers`` decoder layers.

        Args:
            q: (N,Q,C) from :meth:`generate`; reference: (N,Q,2) or (N,Q,4) from :meth:`generate`.
            features: L maps (N,C,H_l,W_l).

        Returns:
            z: (N,Q,C) knowledge embeddings.
        """
        owner = f"{type(self).__name__}.extract"
        self.generator._check(owner, q, reference, None)
        _check_features(owner, features, self.num_levels, self.embed_dims, q)
        flat = flatten_levels(features)
        for layer in self.extractor:
            q = layer.run(q, reference, flat)
        return q

    def predict(self, z: torch.Tensor, reference: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        r"""Stage-1 prediction head: class logits and boxes.

        Args:
            z: (N,Q,C) knowledge embeddings.
            reference: None, or the (N,Q,2) / (N,Q,4) reference of the queries: the box regression
                is then relative to it, :math:`\sigma(\delta + \sigma^{-1}(r))` on the first 2 (or 4)
                coordinates, as Deformable DETR; None: :math:`\sigma(\delta)`.

        Returns:
            (logits (N,Q,K), boxes (N,Q,4) normalised (cx, cy, w, h) in (0,1)).
        """
        owner = f"{type(self).__name__}.predict"
        check_tensor(owner, "z", z, ndim=3, what="(N,Q,C)")
        if z.shape[-1] != self.embed_dims:
            raise ValueError(f"{owner}: `z` must be (N,Q,C) with C={self.embed_dims}, got {tuple(z.shape)}")
        delta = self.bbox_embed(z)
        if reference is not None:
            _check_reference(owner, "reference", reference, z)
            k = reference.shape[-1]
            delta = torch.cat([delta[..., :k] + _inverse_sigmoid(reference), delta[..., k:]], -1)
        return self.class_embed(z), delta.sigmoid()

    def forward(self, features: Sequence[torch.Tensor],
                boxes: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        r"""Generate and extract on the same maps (stage 1 on the teacher's FPN; UniKD, Lao et al.,
        ICCV 2023): :math:`z = f_e(f(F), r; F)`.

        Args:
            features: L maps (N,C,H_l,W_l).
            boxes: (N,Q,4) normalised (cx, cy, w, h) for kind="positional", None for content.

        Returns:
            (q (N,Q,C), reference (N,Q,2) or (N,Q,4), z (N,Q,C)); ``predict(z, reference)`` gives
            the stage-1 outputs.
        """
        q, reference = self.generate(features, boxes)
        return q, reference, self.extract(q, reference, features)


class _DeformableEncoderLayer(nn.Module):
    """Deformable DETR's encoder layer: deformable self-attention over all pixels, FFN, post-norm."""

    def __init__(self, embed_dims: int, num_heads: int, num_levels: int, num_points: int, ffn_dims: int,
                 dropout: float) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(embed_dims, num_heads, num_levels, num_points, dropout=dropout,
                                      batch_first=True)
        self.ffn = _ffn(embed_dims, ffn_dims, dropout)
        self.norms = nn.ModuleList(nn.LayerNorm(embed_dims) for _ in range(2))

    def forward(self, x: torch.Tensor, pos: Optional[torch.Tensor], ref: torch.Tensor, shapes: torch.Tensor,
                starts: torch.Tensor) -> torch.Tensor:
        """(N,S,C) pixels -> (N,S,C); ``ref`` (N,S,L,2) pixel centres."""
        x = self.norms[0](self.self_attn(x, value=x, query_pos=pos, reference_points=ref, spatial_shapes=shapes,
                                         level_start_index=starts))
        return self.norms[1](x + self.ffn(x))


class UniKDAdaptor(nn.Module):
    r"""UniKD's student feature adaptor (Lao et al., ICCV 2023): maps the student's FPN to
    the teacher's embedding space before the frozen AKE extracts from it.

    .. math::
        X_l = W_l S_l \;(\text{1x1 conv}),\qquad
        X \leftarrow \mathrm{LN}(X + \mathrm{MSDA}(X + P, r, X)),\;
        X \leftarrow \mathrm{LN}(X + \mathrm{FFN}(X))\quad(\times\,\texttt{num\_layers})

    over the concatenated pixels of all levels (Deformable DETR's encoder, Zhu et al., ICLR 2021):
    every pixel is a query with reference r its centre ((x+0.5)/W_l, (y+0.5)/H_l), used on every
    level, and the value is the same flattened maps. P is the encoder's position: a 2-D sine
    encoding of the pixel centre (C/2 dims for y, C/2 for x) plus a learnt per-level embedding.

    Assumptions (the paper says "FC + two deformable self-attention layers"): the FC is a
    per-level 1x1 conv; each layer is Deformable DETR's encoder layer with its FFN and position
    (``with_pos=False`` drops P); no padding mask (padding pixels are attended like any other, as
    the FPN computed them).

    Args:
        in_channels: the student's channels, one int for every level or one per level.
        embed_dims: C of the teacher/AKE (256); divisible by ``num_heads`` and by 4.
        num_levels: L; default ``len(in_channels)`` for a sequence, else 4.
        num_layers: deformable self-attention layers (2).
        num_heads, num_points, ffn_dims, dropout: of each layer (8, 4, 1024, 0.0).
        with_pos: add the sine + level position to the queries (True).
    """

    def __init__(self, in_channels: Union[int, Sequence[int]], embed_dims: int = 256,
                 num_levels: Optional[int] = None, num_layers: int = 2, num_heads: int = 8, num_points: int = 4,
                 ffn_dims: int = 1024, dropout: float = 0.0, with_pos: bool = True) -> None:
        super().__init__()
        owner = type(self).__name__
        check_number(owner, "num_levels", num_levels, low=1, integer=True, allow_none=True)
        if isinstance(in_channels, (list, tuple)):
            if not in_channels:
                raise ValueError(f"{owner}: `in_channels` must not be empty")
            chans = [check_number(owner, f"in_channels[{i}]", c, low=1, integer=True)
                     for i, c in enumerate(in_channels)]
            if num_levels is not None and num_levels != len(chans):
                raise ValueError(f"{owner}: `num_levels`={num_levels} but `in_channels` has {len(chans)} entries")
        else:
            check_number(owner, "in_channels", in_channels, low=1, integer=True)
            chans = [in_channels] * (4 if num_levels is None else num_levels)
        for name, v in (("embed_dims", embed_dims), ("num_layers", num_layers), ("num_heads", num_heads),
                        ("num_points", num_points), ("ffn_dims", ffn_dims)):
            check_number(owner, name, v, low=1, integer=True)
        check_number(owner, "dropout", dropout, low=0.0, high=1.0)
        if not isinstance(with_pos, bool):
            raise TypeError(f"{owner}: `with_pos` must be True or False, got {type(with_pos).__name__}")
        if embed_dims % 4 or embed_dims % num_heads:
            raise ValueError(f"{owner}: `embed_dims` must be divisible by 4 (the 2-D sine position) and by "
                             f"num_heads={num_heads}, got {embed_dims}")
        self.in_channels, self.embed_dims, self.num_levels, self.with_pos = chans, embed_dims, len(chans), with_pos
        self.input_proj = nn.ModuleList(nn.Conv2d(c, embed_dims, 1) for c in chans)
        self.level_embed = nn.Parameter(torch.empty(len(chans), embed_dims))
        self.layers = nn.ModuleList(_DeformableEncoderLayer(embed_dims, num_heads, len(chans), num_points, ffn_dims,
                                                            dropout) for _ in range(num_layers))
        nn.init.normal_(self.level_embed)

    def forward(self, features: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        r"""Adapt the student's FPN (UniKD, Lao et al., ICCV 2023; the layers are Deformable DETR's
        encoder, Zhu et al., ICLR 2021).

        Args:
            features: L student maps (N,C_l,H_l,W_l), C_l = ``in_channels[l]``; one N, dtype, device.

        Returns:
            L maps (N,embed_dims,H_l,W_l).
        """
        owner = type(self).__name__
        if not isinstance(features, (list, tuple)):
            raise TypeError(f"{owner}: `features` must be a list or tuple of {self.num_levels} (N,C,H,W) maps, "
                            f"got {type(features).__name__}")
        if len(features) != self.num_levels:
            raise ValueError(f"{owner}: `features` must hold num_levels={self.num_levels} maps, got {len(features)}")
        first = None
        for i, (f, c) in enumerate(zip(features, self.in_channels)):
            check_tensor(owner, f"features[{i}]", f, ndim=4, like=first, what="(N,C,H,W)")
            if f.shape[1] != c or (first is not None and (f.shape[0] != first.shape[0] or f.dtype != first.dtype)):
                raise ValueError(f"{owner}: `features[{i}]` must be (N,{c},H,W) with the N and dtype of "
                                 f"`features[0]`, got {tuple(f.shape)} {f.dtype}")
            first = f if first is None else first
        maps = [proj(f) for proj, f in zip(self.input_proj, features)]
        x, shapes, starts = flatten_levels(maps)
        ref, pos = self._positions(maps, x)
        for layer in self.layers:
            x = layer(x, pos, ref, shapes, starts)
        N, C = x.shape[0], self.embed_dims
        return [v.transpose(1, 2).reshape(N, C, *m.shape[-2:]) for v, m in
                zip(x.split([m.shape[-2] * m.shape[-1] for m in maps], 1), maps)]

    def _positions(self, maps: List[torch.Tensor], x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Reference (N,S,L,2) pixel centres (x, y) and position (N,S,C) or None."""
        refs, pos = [], []
        for lvl, m in enumerate(maps):
            H, W = m.shape[-2:]
            ys = (torch.arange(H, dtype=x.dtype, device=x.device) + 0.5) / H
            xs = (torch.arange(W, dtype=x.dtype, device=x.device) + 0.5) / W
            yy, xx = torch.meshgrid(ys, xs, indexing="ij")
            centres = torch.stack([xx.reshape(-1), yy.reshape(-1)], -1)  # (H*W, 2) as (x, y)
            refs.append(centres)
            if self.with_pos:
                pos.append(sine_embed(centres.flip(-1), self.embed_dims // 2) + self.level_embed[lvl])
        N, S = x.shape[:2]
        ref = torch.cat(refs)[None, :, None, :].expand(N, S, self.num_levels, 2)
        return ref, (torch.cat(pos)[None].expand(N, -1, -1) if self.with_pos else None)
