"""`DINOLoss`: DINO's self-distillation loss with DINO's call signature, the "dino" preset of `CMDLoss`.

Example:
    >>> import torch
    >>> loss_fn = DINOLoss(out_dim=32, n_global_crops=2, n_local_crops=2)
    >>> student, teacher = torch.randn(4 * 3, 32), torch.randn(2 * 3, 32)
    >>> loss = loss_fn(student, teacher, epoch=0)
    >>> loss.shape, loss_fn.center.value.shape
    (torch.Size([]), torch.Size([1, 32]))
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cmd.heads.output import CrossLevelOutput
from cmd.losses.cmd import CMDLoss

__all__ = ["DINOLoss"]


class DINOLoss(CMDLoss):
    """DINO's loss on tensors: ``L = 1 / (G (V - 1)) sum_{g, v != g} H(P_g, p_v)``, ``P_g = softmax((t_g - c) / tau_t)``.

    ``CMDLoss.from_preset("dino", ...)`` taking and returning tensors, as DINO's ``DINOLoss`` does:
    ``forward(student_output, teacher_output, epoch) -> loss``. The center is ``center``
    (a `Center`, its buffer ``center.value`` [1, K]), updated after the loss by default.

    Arguments as in `CMDLoss`. Shapes: ``student_output`` [V * B, K] crop-major (or a sequence of
    groups [C_s * B, K]); ``teacher_output`` [G * B, K] (or groups, concatenated); output 0-dim float32.

    Example:
        >>> loss_fn = DINOLoss(out_dim=16, n_global_crops=1, n_local_crops=2)
        >>> loss_fn(torch.randn(3 * 2, 16), torch.randn(1 * 2, 16), epoch=5).dim()
        0
    """

    def __init__(self, out_dim: int, *, n_global_crops: int = 2, n_local_crops: int = 8, **kwargs) -> None:
        super().__init__(out_dim, n_global_crops=n_global_crops, n_local_crops=n_local_crops,
                         **{**CMDLoss.PRESETS["dino"], **kwargs})

    def forward(  # type: ignore[override]  # fmt: skip
        self, student_output: torch.Tensor | Sequence[torch.Tensor], teacher_output: torch.Tensor | Sequence[torch.Tensor],
        epoch: int | None = None, *, teacher_temp: float | None = None, update_centers: bool = True,
    ) -> torch.Tensor:
        """The loss (a 0-dim float32 tensor); then, by default, the center update."""
        student = [CrossLevelOutput(t) for t in _tensors("student_output", student_output)]
        teacher = CrossLevelOutput(torch.cat(_tensors("teacher_output", teacher_output)))
        return super().forward(student, teacher, epoch, teacher_temp=teacher_temp, update_centers=update_centers).loss


def _tensors(name: str, value: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Sequence) and len(value) > 0 and all(isinstance(t, torch.Tensor) for t in value):
        return list(value)
    raise TypeError(f"{name} must be a tensor or a non-empty sequence of tensors; got {type(value).__name__}")
