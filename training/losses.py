"""Training losses beyond plain cross-entropy: focal loss and knowledge distillation.

Both take raw logits ``[batch, num_labels]`` and integer targets ``[batch]`` and are computed in
fp32 (callers under bf16 autocast should pass ``logits.float()``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    gamma: float = 2.0,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Focal loss (Lin et al. 2017), per example

        FL_i = -w_{y_i} * (1 - p_{y_i})**gamma * log p_{y_i},   p = softmax(logits_i)

    with ``w = 1`` when ``weight`` is None. ``reduction="mean"`` averages FL_i over the batch
    (divides by the batch size, not by the sum of the weights), ``"sum"`` adds them up and
    ``"none"`` returns them. ``gamma = 0`` is cross-entropy: without ``weight`` it equals
    ``F.cross_entropy``; with ``weight`` it equals ``F.cross_entropy(..., weight=w,
    reduction="sum") / batch`` (torch's weighted mean divides by the sum of the weights instead).

    The factor ``(1 - p_y)**gamma`` shrinks the loss of examples the model already gets right, so
    the gradient goes to the hard (often rare-class) ones.
    """
    if gamma < 0:
        raise ValueError(f"focal loss gamma must be >= 0, got {gamma}")
    log_p = F.log_softmax(logits.float(), dim=-1).gather(1, target.long().unsqueeze(1)).squeeze(1)
    # exp(log p) rather than softmax then gather: one log-softmax, no log(0) for confident mistakes
    per_example = -((1.0 - log_p.exp()).clamp(min=0.0) ** gamma) * log_p
    if weight is not None:
        per_example = per_example * weight.to(per_example.dtype)[target.long()]
    if reduction == "mean":
        return per_example.mean()
    if reduction == "sum":
        return per_example.sum()
    if reduction == "none":
        return per_example
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    temperature: float = 2.0,
    alpha: float = 0.5,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Hinton et al. (2015) knowledge distillation:

        alpha * KL(softmax(teacher / T) || softmax(student / T)) * T**2
        + (1 - alpha) * CE(student, target)

    The KL term is summed over classes and averaged over the batch (``batchmean``); the ``T**2``
    keeps its gradient on the same scale as the hard-label term whatever the temperature. The CE
    term is ``F.cross_entropy(student, target, weight=weight)`` (torch's weighted mean).
    ``alpha = 1`` learns from the teacher alone, ``alpha = 0`` from the labels alone.
    """
    if temperature <= 0:
        raise ValueError(f"distillation temperature must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"distillation alpha must be in [0, 1], got {alpha}")
    student, teacher = student_logits.float(), teacher_logits.float().detach()
    kl = F.kl_div(
        F.log_softmax(student / temperature, dim=-1),
        F.log_softmax(teacher / temperature, dim=-1),
        reduction="batchmean",
        log_target=True,
    )
    ce = F.cross_entropy(student, target.long(), weight=weight)
    return alpha * kl * temperature**2 + (1.0 - alpha) * ce
