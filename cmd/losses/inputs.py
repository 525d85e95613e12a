"""Normalise and check the `CrossLevelOutput` groups given to the region-level and CMD losses.

Shape checks cost no synchronisation and are always on; finiteness checks synchronise with the
device and run only when asked (``validate=True``).

Example:
    >>> import torch
    >>> from cmd.heads.output import CrossLevelOutput
    >>> out = CrossLevelOutput(torch.zeros(4, 8), torch.zeros(4, 3, 8), torch.zeros(4, 3, 5))
    >>> len(as_output_list("student", out))
    1
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cmd.heads.output import CrossLevelOutput
from cmd.losses.layout import CropLayout, check_finite, check_shape, describe_shapes, infer_layout

__all__ = ["as_output_list", "layout_of", "check_outputs"]


def as_output_list(name: str, value: CrossLevelOutput | Sequence[CrossLevelOutput]) -> list[CrossLevelOutput]:
    """``value`` as a non-empty list of `CrossLevelOutput` (one per resolution group)."""
    if isinstance(value, CrossLevelOutput):
        return [value]
    if isinstance(value, Sequence) and len(value) > 0 and all(isinstance(o, CrossLevelOutput) for o in value):
        return list(value)
    raise TypeError(
        f"{name} must be a CrossLevelOutput or a non-empty sequence of them (one per resolution group); "
        f"got {type(value).__name__}"
    )


def layout_of(
    student: Sequence[CrossLevelOutput], teacher: Sequence[CrossLevelOutput], n_global: int, n_crops: int
) -> CropLayout:
    """The crop layout, inferred from the image logits' batch sizes (ValueError on a mismatch)."""
    for role, outputs in (("student", student), ("teacher", teacher)):
        for i, o in enumerate(outputs):
            check_shape(f"{role}[{i}].image", o.image, (None, None), "([crops x images, out_dim])")
    return infer_layout(
        [o.image.shape[0] for o in student],
        [o.image.shape[0] for o in teacher],
        n_global=n_global,
        n_crops=n_crops,
        student_shapes=describe_shapes([o.image for o in student]),
        teacher_shapes=describe_shapes([o.image for o in teacher]),
    )


def check_outputs(
    student: Sequence[CrossLevelOutput],
    teacher: Sequence[CrossLevelOutput],
    layout: CropLayout,
    out_dim: int,
    *,
    student_fields: dict[str, str],
    teacher_fields: dict[str, str],
    validate: bool,
) -> None:
    """Check the shapes of the fields each term needs; optionally their finiteness.

    Args:
        student_fields, teacher_fields: ``{field: why it is needed}`` for ``region``, ``features``
            and ``weights`` (``image`` is always checked).

    Raises:
        ValueError: naming the tensor, the expected and the received shape, or the missing field.
    """
    k, b = out_dim, layout.batch_size
    dims: dict[str, int] = {}
    for role, outputs, fields, crops in (
        ("student", student, student_fields, layout.student_crops),
        ("teacher", teacher, teacher_fields, layout.teacher_crops),
    ):
        for i, (o, c) in enumerate(zip(outputs, crops)):
            rows = c * b
            name = f"{role}[{i}]"
            check_shape(f"{name}.image", o.image, (rows, k), f"([{c} crops x {b} images, out_dim={k}])")
            n_tokens = None
            for field, why in fields.items():
                value = getattr(o, field)
                if value is None:
                    raise ValueError(f"{name}.{field} is None, but {why} needs it")
                if n_tokens is None:
                    n_tokens = value.shape[1] if value.dim() >= 2 else None
                if field == "region":
                    check_shape(f"{name}.region", value, (rows, n_tokens, k), f"([{rows}, tokens, out_dim={k}])")
                elif field == "features":
                    d = dims.setdefault("features", value.shape[-1] if value.dim() == 3 else -1)
                    check_shape(f"{name}.features", value, (rows, n_tokens, d), f"([{rows}, tokens, dim={d}])")
                elif field == "weights":
                    check_shape(f"{name}.weights", value, (rows, n_tokens), f"([{rows}, tokens])")
            if validate:
                check_finite(f"{name}.image", o.image)
                for field in fields:
                    check_finite(f"{name}.{field}", getattr(o, field))
                if "weights" in fields:
                    _check_weights(f"{name}.weights", o.weights)


def _check_weights(name: str, weights: torch.Tensor) -> None:
    if bool((weights < 0).any()):
        raise ValueError(f"{name} holds negative multi-instance weights")
    sums = weights.to(torch.float32).sum(dim=-1)
    if not bool(torch.allclose(sums, torch.ones_like(sums), atol=1e-3)):
        worst = float((sums - 1).abs().max())
        raise ValueError(f"{name} rows must sum to 1 (multi-instance weights); the worst row is off by {worst:.3g}")
