"""The multi-crop layout of a batch, inferred from tensor shapes and checked before any arithmetic.

Crops are stacked *crop-major* along the batch (DINO's layout): rows ``[c * B, (c + 1) * B)`` of a
group hold crop ``c`` of every image. The student sees ``V = G + L`` crops, split into resolution
groups (e.g. ``[G x 224 px, L x 96 px]``); the first ``G`` student crops, counted across groups in
order, are the teacher's ``G`` global crops in the teacher's order. The teacher's outputs may also
come in groups (usually one).

Example:
    >>> layout = infer_layout([2 * 4, 8 * 4], [2 * 4], n_global=2, n_crops=10)
    >>> layout.batch_size, layout.n_pairs, layout.global_crops_in_group(1)
    (4, 18, 0)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["CropLayout", "infer_layout", "describe_shapes", "check_shape", "check_finite"]


@dataclass(frozen=True)
class CropLayout:
    """How a multi-crop batch is laid out.

    Attributes:
        batch_size: B, images per crop.
        n_global: G, teacher (global) crops.
        n_crops: V, student crops (G global + L local).
        student_crops: crops per student group (sums to V).
        teacher_crops: crops per teacher group (sums to G).
    """

    batch_size: int
    n_global: int
    n_crops: int
    student_crops: tuple[int, ...]
    teacher_crops: tuple[int, ...]

    @property
    def n_pairs(self) -> int:
        """Teacher/student pairs ``(g, v)`` with ``v != g``: ``G * (V - 1)``."""
        return self.n_global * (self.n_crops - 1)

    def first_student_crop(self, group: int) -> int:
        """Index (across all groups) of the first crop of student group ``group``."""
        return sum(self.student_crops[:group])

    def first_teacher_crop(self, group: int) -> int:
        """Index of the first crop of teacher group ``group``."""
        return sum(self.teacher_crops[:group])

    def global_crops_in_group(self, group: int) -> int:
        """How many of student group ``group``'s crops are global crops (they lead the group)."""
        first = self.first_student_crop(group)
        return max(0, min(self.student_crops[group], self.n_global - first))


def describe_shapes(tensors: Sequence[torch.Tensor]) -> str:
    """The shapes of ``tensors`` as text for error messages, e.g. ``[[16, 32], [64, 32]]``."""
    return "[" + ", ".join(str(list(t.shape)) for t in tensors) + "]"


def infer_layout(
    student_rows: Sequence[int],
    teacher_rows: Sequence[int],
    *,
    n_global: int,
    n_crops: int,
    student_shapes: str | None = None,
    teacher_shapes: str | None = None,
) -> CropLayout:
    """Infer B and the crops per group from the row counts of the student and teacher groups.

    Args:
        student_rows: rows of each student group (each ``C_s * B``).
        teacher_rows: rows of each teacher group (each ``G_t * B``).
        n_global: G.
        n_crops: V.
        student_shapes, teacher_shapes: shapes to quote in error messages.

    Raises:
        ValueError: stating the expected and the received shapes when the rows do not form
            ``G x B`` teacher and ``V x B`` student crops.
    """
    s_desc = student_shapes or str(list(student_rows))
    t_desc = teacher_shapes or str(list(teacher_rows))
    if len(student_rows) == 0 or len(teacher_rows) == 0:
        raise ValueError(f"need at least one student and one teacher group; got student {s_desc}, teacher {t_desc}")
    t_total = sum(teacher_rows)
    if t_total == 0 or t_total % n_global != 0:
        raise ValueError(
            f"teacher outputs must hold {n_global} global crops x B images (crop-major), a positive multiple of "
            f"{n_global} rows; got {t_total} rows in shapes {t_desc}"
        )
    b = t_total // n_global
    if any(r % b for r in teacher_rows):
        raise ValueError(f"each teacher group must hold whole crops of B={b} images; got shapes {t_desc}")
    s_total = sum(student_rows)
    if s_total != n_crops * b or any(r == 0 or r % b for r in student_rows):
        raise ValueError(
            f"student outputs must hold {n_crops} crops x B={b} images = {n_crops * b} rows (B taken from the teacher's "
            f"{t_total} rows / {n_global} global crops), each group a positive multiple of {b} rows; got {s_total} rows "
            f"in shapes {s_desc}"
        )
    return CropLayout(
        batch_size=b,
        n_global=n_global,
        n_crops=n_crops,
        student_crops=tuple(r // b for r in student_rows),
        teacher_crops=tuple(r // b for r in teacher_rows),
    )


def check_shape(name: str, tensor: object, expected: Sequence[int | None], meaning: str) -> torch.Tensor:
    """Check that ``tensor`` is a floating tensor of shape ``expected`` (None: any size there).

    Raises:
        TypeError: when ``tensor`` is not a floating-point tensor.
        ValueError: naming ``name``, the expected ``meaning`` and the received shape.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {meaning}; got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor; got dtype {tensor.dtype}")
    ok = tensor.dim() == len(expected) and all(e is None or s == e for s, e in zip(tensor.shape, expected))
    if not ok:
        want = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
        raise ValueError(f"{name} must have shape {want} {meaning}; got {list(tensor.shape)}")
    return tensor


def check_finite(name: str, tensor: torch.Tensor | None) -> None:
    """Raise a ValueError naming ``name`` when ``tensor`` holds NaN or inf (synchronises with the device)."""
    if tensor is not None and not bool(torch.isfinite(tensor).all()):
        n_bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(f"{name} holds {n_bad} non-finite values (NaN or inf)")

