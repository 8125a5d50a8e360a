r"""kdops.pcc_mse: MSE between normalised feature maps (PKD, LGD).

Gradient (derived here, checked by float64 gradcheck in the tests). Per group
(one mean/std), with :math:`a = (s-\mu_s)/d_s`, :math:`b = (t-\mu_t)/d_t` and
:math:`L = \frac{1}{|X|}\sum (a-b)^2`:

- channel norm (PKD, :math:`d = \sigma + \epsilon`, unbiased :math:`\sigma`, M elements):
  :math:`\partial L/\partial s_i = \frac{2}{|X| d_s}\big((1-k_s) a_i - b_i\big)`,
  :math:`k_s = \frac{d_s(\sum a^2 - \sum ab)}{(M-1)\sigma_s}` (0 for a constant group,
  the limit of the term, where the eager formula gives NaN);
- instance norm (:math:`d = \sqrt{\mathrm{var}+\epsilon}`, biased var):
  the same with :math:`k_s = (\sum a^2 - \sum ab)/M`.

The sums come from the first-pass moments: forward keeps only 8 numbers per group
(means, 1/d, k) and backward writes the gradient in one pass over the inputs.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from .. import reference
from .._dtype import acc_dtype
from ._registry import forbid_double_backward, needs_grad, register_op, saved_grad_autograd, use_kernel
from ._validation import Levels, check_choice, check_number, check_pair, level_scales, paired_levels

OP = "pcc_mse"
_NORMS = {"channel": (0, 1e-6), "instance": (1, 1e-5)}


def pcc_mse(student: Levels, teacher: Levels, *, norm: str = "channel", eps: Optional[float] = None,
            scale: Union[float, Sequence[float]] = 1.0) -> torch.Tensor:
    r"""Mean squared difference of normalised student and teacher features.

    .. math::
        \mathcal{L} = \frac{1}{NCHW}\sum \Big(\frac{S-\mu_S}{d_S} - \frac{T-\mu_T}{d_T}\Big)^2

    - ``norm="channel"``: statistics per channel over (N,H,W), :math:`d = \sigma + \epsilon`
      with the unbiased std and :math:`\epsilon = 10^{-6}` -- exactly mmrazor's PKDLoss
      normalisation (Cao et al., "PKD: General Distillation Framework for Object
      Detectors via Pearson Correlation Coefficient", NeurIPS 2022). The loss equals
      2(1 - r) averaged over channels, r the Pearson correlation (up to eps and the
      (M-1)/M of the unbiased std). PKDLoss is ``pcc_mse / 2`` per level.
    - ``norm="instance"``: per (n,c) over (H,W), :math:`d = \sqrt{\mathrm{var} + \epsilon}`
      with the biased variance and :math:`\epsilon = 10^{-5}` -- ``F.instance_norm`` + MSE as
      LGD (Zhang et al., "LGD: Label-guided Self-distillation for Object Detection",
      AAAI 2022) uses it.

    Statistics are exact two-pass moments (no sum-of-squares cancellation in fp16/bf16);
    no normalised copy of either input is made. A constant channel gives a finite loss
    and gradient. A channel of one element has std 0 here (torch.std gives NaN).

    Args:
        student, teacher: (N,C,H,W) of one shape/dtype/device, or sequences of L levels.
        norm: "channel" or "instance".
        eps: overrides the default epsilon of the chosen norm.
        scale: a number, or for sequences one per level, multiplying each loss (and so its
            gradients) inside the op. Fold a constant loss weight here rather than multiplying
            the result: on the CPU, where the forward pass writes the student's gradient,
            backward then has nothing left to scale when its incoming gradient is 1
            (``total_loss.backward()`` over a sum of losses) -- one pass over the student's
            gradient less.

    Returns:
        0-d loss, or (L,) per-level losses for sequences; float32 (float64 for float64
        inputs). An empty level gives 0. Gradients flow to student and teacher when they
        require grad.
    """
    check_choice(OP, "norm", norm, tuple(_NORMS))
    check_number(OP, "eps", eps, low=0.0, allow_none=True)
    code, default_eps = _NORMS[norm]
    e = float(default_eps if eps is None else eps)
    if norm == "instance" and e == 0.0:
        raise ValueError(f"kdops.{OP}: `eps` must be > 0 for norm='instance' (a constant plane has variance 0)")
    (ss, ts), is_seq = paired_levels(OP, ("student", "teacher"), student, teacher)
    for i, (s, t) in enumerate(zip(ss, ts)):
        check_pair(OP, s, t, i if is_seq else None)
    scales = level_scales(OP, scale, len(ss), is_seq)
    losses = [_level(s, t, norm, code, e, w) for s, t, w in zip(ss, ts, scales)]
    return torch.stack(losses) if is_seq else losses[0]


def _level(s, t, norm, code, eps, scale):
    if not use_kernel(OP, s.device):
        loss = reference.pcc_mse(s, t, norm=norm, eps=eps)
        return loss if scale == 1.0 else loss * scale
    if s.device.type == "cpu" and needs_grad(s) and not needs_grad(t):
        # CPU, the usual KD case (only the student learns): the forward's second pass writes the
        # student's gradient (times `scale`) as it computes the loss; backward only scales it by
        # its incoming gradient, or not at all when that is 1 (see masked_mse)
        return torch.ops.kdops.pcc_mse_fwd_grad(s, t, code, eps, scale)[0]
    loss, _coeffs = torch.ops.kdops.pcc_mse_fwd(s, t, code, eps)
    return loss if scale == 1.0 else loss * scale


def _groups(s, norm):
    return s.shape[1] if norm == 0 else s.shape[0] * s.shape[1]


def _fake_fwd(s, t, norm, eps):
    return s.new_empty((), dtype=acc_dtype(s.dtype)), s.new_empty((_groups(s, norm), 8), dtype=torch.float64)


def _fake_bwd(gl, s, t, coeffs, norm, grad_student, grad_teacher):
    gs = s.new_empty(s.shape) if grad_student else s.new_empty((0,))
    gt = t.new_empty(t.shape) if grad_teacher else t.new_empty((0,))
    return gs, gt


def _setup_context(ctx, inputs, output):
    s, t, norm, _eps = inputs
    ctx.save_for_backward(s, t, output[1])
    ctx.norm = norm


def _backward(ctx, gloss, _gcoeffs):
    forbid_double_backward(OP)
    s, t, coeffs = ctx.saved_tensors
    need = ctx.needs_input_grad
    gs, gt = torch.ops.kdops.pcc_mse_bwd(gloss, s, t, coeffs, ctx.norm, bool(need[0]), bool(need[1]))
    return (gs if need[0] else None, gt if need[1] else None, None, None)


def _fake_fwd_grad(s, t, norm, eps, scale):
    return s.new_empty((), dtype=acc_dtype(s.dtype)), s.new_empty(s.shape)


register_op(OP, fake={"pcc_mse_fwd": _fake_fwd, "pcc_mse_bwd": _fake_bwd, "pcc_mse_fwd_grad": _fake_fwd_grad},
            autograd={"pcc_mse_fwd": (_backward, _setup_context),
                      "pcc_mse_fwd_grad": saved_grad_autograd(OP, 5)})
