"""DINO's image-level distillation loss, computed with aggregated targets.

For teacher global crop g and student crop v (B images each, crop-major along the batch):
``P_g = softmax((t_g - c) / tau_t)``, ``log p_v = log_softmax(s_v / tau_s)``, and

    I(g, v) = H(P_g, p_v) = -1/B sum_b sum_k P_g,bk log p_v,bk,     L_DINO = mean over v != g of I(g, v).

The cross-entropy is linear in its target, so ``sum_{g != v} I(g, v) = H(T_v, p_v)`` with the
aggregated target ``T_v = sum_{g != v} P_g``: one log-softmax and one cross-entropy per student crop,
the teacher softmax once. The result equals DINO's per-pair loop; only the order of the sums differs.

Example:
    >>> import torch
    >>> loss_fn = DINOLoss(out_dim=32, n_crops=4)
    >>> student, teacher = torch.randn(4 * 3, 32), torch.randn(2 * 3, 32)
    >>> loss = loss_fn(student, teacher, epoch=0)
    >>> loss.shape, loss_fn.center.shape
    (torch.Size([]), torch.Size([1, 32]))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cmd.losses.functional import no_autocast, soft_cross_entropy
from cmd.losses.layout import CropLayout, check_finite, check_shape, describe_shapes, infer_layout
from cmd.losses.targets import (
    CenteredTeacherLoss,
    aggregate_targets,
    centered_log_probs,
    centered_probs,
    image_target_bags,
)

__all__ = ["DINOLoss", "ImageDistillation", "image_distillation"]


@dataclass
class ImageDistillation:
    """Image-level results shared with `CMDLoss`.

    Attributes:
        cross_entropy: 0-dim, ``sum over pairs (g, v != g) of I(g, v)`` (divide by the pair count).
        log_probs: [V * B, K] student ``log p_v`` (differentiable) or None.
        teacher_probs: [G * B, K] ``P_g``.
        teacher_log_probs: [G * B, K] ``log P_g`` or None.
        bags: ``(indices, offsets, target_mass)`` of the aggregated image targets.
    """

    cross_entropy: torch.Tensor
    log_probs: torch.Tensor | None
    teacher_probs: torch.Tensor
    teacher_log_probs: torch.Tensor | None
    bags: tuple[torch.Tensor, torch.Tensor, list]


def _cat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(list(tensors), dim=0)


def image_distillation(
    student_logits: Sequence[torch.Tensor],
    teacher_logits: Sequence[torch.Tensor],
    layout: CropLayout,
    center: torch.Tensor,
    teacher_temp: float,
    student_temp: float,
    *,
    return_log_probs: bool = False,
    return_teacher_log_probs: bool = False,
) -> ImageDistillation:
    """``sum_{g, v != g} H(P_g, p_v)`` with aggregated targets (shapes already checked).

    Args:
        student_logits: per student group [C_s * B, K] (crop-major, global crops first).
        teacher_logits: per teacher group [G_t * B, K].
        layout: the crop layout.
        center: [1, K].
        teacher_temp, student_temp: tau_t, tau_s.
        return_log_probs: keep the student log-probabilities (for the bags of `CMDLoss`).
        return_teacher_log_probs: also compute ``log P_g`` (for diagnostics).
    """
    student = _cat(student_logits)
    teacher = _cat(teacher_logits)
    if return_teacher_log_probs:
        probs, log_probs_t = centered_log_probs(teacher, center, teacher_temp)
    else:
        probs, log_probs_t = centered_probs(teacher, center, teacher_temp), None
    indices, offsets, mass = image_target_bags(layout, student.device)
    target = aggregate_targets(probs, indices, offsets)
    ce, log_probs = soft_cross_entropy(student, target, student_temp, mass, return_log_probs=return_log_probs)
    return ImageDistillation(ce / layout.batch_size, log_probs, probs, log_probs_t, (indices, offsets, mass))


def _as_tensor_list(name: str, value: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Sequence) and len(value) > 0 and all(isinstance(t, torch.Tensor) for t in value):
        return list(value)
    raise TypeError(f"{name} must be a tensor or a non-empty sequence of tensors; got {type(value).__name__}")


class DINOLoss(CenteredTeacherLoss):
    """DINO's self-distillation loss between the image-level outputs of a student and a teacher.

    ``L = 1 / (G (V - 1)) sum_{g, v != g} H(P_g, p_v)`` with ``P_g = softmax((t_g - c) / tau_t)`` and
    ``p_v = softmax(s_v / tau_s)``, all softmaxes in float32. The center ``c`` (buffer ``center``
    [1, K]) moves toward the mean teacher logit of the global batch after the loss is computed.

    Args:
        out_dim: K.
        n_crops: V, the student crops (global + local).
        n_global_crops: G, the teacher crops; the first G student crops are the same views.
        warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs: tau_t rises linearly over
            the warm-up epochs, then stays at ``teacher_temp`` (also past ``n_epochs``).
        n_epochs: the planned number of epochs.
        student_temp: tau_s.
        center_momentum: m in ``c <- m c + (1 - m) mean``.
        validate: check inputs for NaN/inf (synchronises with the device).

    Shapes:
        student_logits: [V * B, K] crop-major (or a sequence of groups [C_s * B, K]).
        teacher_logits: [G * B, K] crop-major (or a sequence of groups).
        output: scalar.

    Example:
        >>> loss_fn = DINOLoss(out_dim=16, n_crops=3, n_global_crops=1)
        >>> loss_fn(torch.randn(3 * 2, 16), torch.randn(1 * 2, 16), epoch=5).dim()
        0
    """

    def __init__(
        self,
        out_dim: int,
        n_crops: int,
        *,
        n_global_crops: int = 2,
        warmup_teacher_temp: float = 0.04,
        teacher_temp: float = 0.07,
        warmup_teacher_temp_epochs: int = 30,
        n_epochs: int = 100,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        validate: bool = False,
    ) -> None:
        super().__init__(
            out_dim,
            ("center",),
            warmup_teacher_temp=warmup_teacher_temp,
            teacher_temp=teacher_temp,
            warmup_teacher_temp_epochs=warmup_teacher_temp_epochs,
            n_epochs=n_epochs,
            student_temp=student_temp,
            center_momentum=center_momentum,
            validate=validate,
        )
        if isinstance(n_global_crops, bool) or not isinstance(n_global_crops, int) or n_global_crops < 1:
            raise ValueError(f"n_global_crops must be an integer >= 1; got {n_global_crops!r}")
        if isinstance(n_crops, bool) or not isinstance(n_crops, int) or n_crops < max(2, n_global_crops):
            raise ValueError(f"n_crops must be an integer >= max(2, n_global_crops={n_global_crops}); got {n_crops!r}")
        self.n_crops = n_crops
        self.n_global_crops = n_global_crops

    def forward(
        self,
        student_logits: torch.Tensor | Sequence[torch.Tensor],
        teacher_logits: torch.Tensor | Sequence[torch.Tensor],
        epoch: int,
        *,
        update_centers: bool = True,
    ) -> torch.Tensor:
        """The loss (a 0-dim float32 tensor); then, by default, the center update."""
        student = _as_tensor_list("student_logits", student_logits)
        teacher = _as_tensor_list("teacher_logits", teacher_logits)
        layout = infer_layout(
            [t.shape[0] for t in student],
            [t.shape[0] for t in teacher],
            n_global=self.n_global_crops,
            n_crops=self.n_crops,
            student_shapes=describe_shapes(student),
            teacher_shapes=describe_shapes(teacher),
        )
        k = self.out_dim
        for i, t in enumerate(student):
            check_shape(f"student_logits[{i}]", t, (t.shape[0], k), f"([crops x images, out_dim={k}])")
        for i, t in enumerate(teacher):
            check_shape(f"teacher_logits[{i}]", t, (t.shape[0], k), f"([crops x images, out_dim={k}])")
        if self.validate:
            for i, t in enumerate(student):
                check_finite(f"student_logits[{i}]", t)
            for i, t in enumerate(teacher):
                check_finite(f"teacher_logits[{i}]", t)
        tau_t = self.teacher_temperature(epoch)
        with no_autocast(student[0].device):
            result = image_distillation(student, teacher, layout, self.center, tau_t, self.student_temp)
            loss = result.cross_entropy / layout.n_pairs
        if update_centers:
            self.update_centers(teacher)
        return loss

    def accumulate_centers(self, teacher_logits: torch.Tensor | Sequence[torch.Tensor]) -> None:
        """Add teacher logits [G * B, K] to the running sum of the next center update (no sync)."""
        for t in _as_tensor_list("teacher_logits", teacher_logits):
            check_shape("teacher_logits", t, (None, self.out_dim), f"([rows, out_dim={self.out_dim}])")
            self._accumulate("center", t)

    def update_centers(self, teacher_logits: torch.Tensor | Sequence[torch.Tensor] | None = None) -> None:
        """Accumulate ``teacher_logits`` (if given), then apply the pending center update (collective)."""
        if teacher_logits is not None:
            self.accumulate_centers(teacher_logits)
        self._apply_pending()
