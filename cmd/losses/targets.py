"""Teacher targets shared by the three losses: temperature, centering, aggregation, center updates.

- Teacher temperature: ``linspace(warmup_teacher_temp, teacher_temp, warmup_epochs)[epoch]``, then
  ``teacher_temp`` (also for every epoch past the planned number, where DINO's table would end).
- Centered teacher probabilities: ``P = softmax((t - c) / tau_t)`` in float32, without gradient.
- Aggregated targets: the cross-entropy is linear in its target, so the targets of all teacher crops
  ``g != v`` of a student crop v are summed *before* the cross-entropy: image level
  ``T_v = sum_{g != v} P_g``; region level ``T_v,j = sum_{g != v} Q_{g, m_g(j)}``, gathered straight
  into one buffer per student group by one ``embedding_bag`` (sum mode) call.
- Centers: ``c <- m c + (1 - m) * mean of the teacher logits over the global batch`` (the sum and
  the count are all-reduced over processes through `cmd.distributed`), held as buffers that are in
  ``state_dict()``. `CenteredTeacherLoss` is the base class of the three losses.

Example:
    >>> teacher_temperature(0, 0.04, 0.07, 30), teacher_temperature(500, 0.04, 0.07, 30)
    (0.04, 0.07)
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cmd import distributed as dist
from cmd.losses.functional import flush_subnormal_
from cmd.losses.layout import CropLayout

__all__ = [
    "teacher_temperature",
    "centered_probs",
    "centered_log_probs",
    "image_target_bags",
    "region_target_bags",
    "aggregate_targets",
    "CenteredTeacherLoss",
]


def teacher_temperature(epoch: int, warmup_teacher_temp: float, teacher_temp: float, warmup_epochs: int) -> float:
    """The teacher temperature of ``epoch``: DINO's linear warm-up, then constant.

    Equals ``numpy.linspace(warmup_teacher_temp, teacher_temp, warmup_epochs)[epoch]`` during the
    warm-up and ``teacher_temp`` afterwards, for any epoch (also past the planned number of epochs).

    Raises:
        ValueError: for a negative epoch. TypeError: for a non-integer epoch.
    """
    try:
        epoch = operator.index(epoch)
    except TypeError:
        raise TypeError(f"epoch must be an integer; got {epoch!r} ({type(epoch).__name__})") from None
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0; got {epoch}")
    if epoch >= warmup_epochs:
        return float(teacher_temp)
    if epoch == warmup_epochs - 1:  # numpy.linspace ends exactly on its stop value
        return float(teacher_temp) if warmup_epochs > 1 else float(warmup_teacher_temp)
    step = (teacher_temp - warmup_teacher_temp) / (warmup_epochs - 1)
    return float(epoch * step + warmup_teacher_temp)


def _centered_scaled(logits: torch.Tensor, center: torch.Tensor, temperature: float) -> torch.Tensor:
    # (t - c) / tau as one fused float32 operation: -c / tau + (1 / tau) * t.
    return torch.add(center.to(torch.float32) * (-1.0 / temperature), logits, alpha=1.0 / temperature).to(
        torch.float32
    )


def centered_probs(logits: torch.Tensor, center: torch.Tensor, temperature: float) -> torch.Tensor:
    """Teacher probabilities ``softmax((logits - center) / temperature)`` in float32, no gradient.

    Probabilities below float32's smallest normal number are set to 0 (see `flush_subnormal_`).

    Args:
        logits: [..., K] teacher logits, any floating dtype.
        center: [1, K] the center.
        temperature: tau_t.

    Returns:
        [..., K] float32.
    """
    with torch.no_grad():
        probs = torch.softmax(_centered_scaled(logits.detach(), center, temperature), dim=-1)
        return flush_subnormal_(probs)


def centered_log_probs(
    logits: torch.Tensor, center: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Like `centered_probs`, returning ``(probs, log_probs)`` (for the teacher's image level diagnostics)."""
    with torch.no_grad():
        log_probs = torch.log_softmax(_centered_scaled(logits.detach(), center, temperature), dim=-1)
        return flush_subnormal_(log_probs.exp()), log_probs


def _bag_offsets(rows_without_own: int, rows_all: int, n_teachers: int, device: torch.device) -> torch.Tensor:
    # Bags of G - 1 entries (global crops: their own view left out), then bags of G entries.
    first = torch.arange(rows_without_own, device=device) * (n_teachers - 1)
    rest = torch.arange(rows_all, device=device) * n_teachers + rows_without_own * (n_teachers - 1)
    return torch.cat([first, rest])


def _drop_own_view(indices: torch.Tensor, first_crop: int) -> torch.Tensor:
    """Bags of global crops ``v = first_crop + c``: keep teachers ``(v + 1 + i) mod G``, i < G - 1.

    Args:
        indices: [n, ..., G] candidate rows for crops ``first_crop .. first_crop + n - 1`` (all < G).

    Returns:
        [n, ..., G - 1], the column ``g == v`` left out (order within a bag does not matter).
    """
    n, g = indices.shape[0], indices.shape[-1]
    crop = torch.arange(first_crop, first_crop + n, device=indices.device)
    keep = (crop[:, None] + 1 + torch.arange(g - 1, device=indices.device)[None, :]) % g  # [n, G-1]
    keep = keep.view(n, *([1] * (indices.dim() - 2)), g - 1).expand(*indices.shape[:-1], g - 1)
    return torch.gather(indices, -1, keep)


def image_target_bags(layout: CropLayout, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Bags of teacher rows for the aggregated image targets ``T_v = sum_{g != v} P_g``.

    The teacher probabilities are [G * B, K] (rows ``g * B + b``); the student rows are [V * B]
    (crop-major). Returns ``(indices, offsets, target_mass)`` for `aggregate_targets` and
    `soft_cross_entropy`.
    """
    g, b, v = layout.n_global, layout.batch_size, layout.n_crops
    images = torch.arange(b, device=device)
    candidates = torch.arange(g, device=device)[None, None, :] * b + images[None, :, None]  # [1, B, G]
    own_left_out = _drop_own_view(candidates.expand(g, b, g), 0)  # [G, B, G-1]
    others = candidates.expand(v - g, b, g)  # [L, B, G]
    indices = torch.cat([own_left_out.reshape(-1), others.reshape(-1)])
    offsets = _bag_offsets(g * b, (v - g) * b, g, device)
    mass = [(g * b, float(g - 1)), ((v - g) * b, float(g))]
    return indices, offsets, mass


def region_target_bags(
    matches: torch.Tensor, teacher_row_start: torch.Tensor, teacher_tokens: torch.Tensor, layout: CropLayout, group: int
) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Bags of teacher region rows for the aggregated region targets of one student group.

    Args:
        matches: [C, B, N, G] matched teacher token ``m_g(j)`` for every student region.
        teacher_row_start: [G] long, first row of teacher crop g in the flattened teacher
            region probabilities (rows ``start_g + b * N_g + i``).
        teacher_tokens: [G] long, N_g.
        layout: the crop layout; ``group`` the student group.

    Returns:
        ``(indices, offsets, target_mass)``: student row ``(c, b, j)`` gets the bag
        ``{start_g + b * N_g + m_g(j) : g != v}``.
    """
    c, b, n, g = matches.shape
    images = torch.arange(b, device=matches.device).view(1, b, 1, 1)
    rows = teacher_row_start.view(1, 1, 1, g) + images * teacher_tokens.view(1, 1, 1, g) + matches
    n_own = layout.global_crops_in_group(group)
    first = layout.first_student_crop(group)
    indices = torch.cat([_drop_own_view(rows[:n_own], first).reshape(-1), rows[n_own:].reshape(-1)])
    offsets = _bag_offsets(n_own * b * n, (c - n_own) * b * n, g, matches.device)
    mass = [(n_own * b * n, float(g - 1)), ((c - n_own) * b * n, float(g))]
    return indices, offsets, mass


def aggregate_targets(probs: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Sum the rows of ``probs`` [M, K] over each bag: one [R, K] float32 target buffer, no gradient."""
    with torch.no_grad():
        return F.embedding_bag(indices, probs, offsets, mode="sum")


class CenteredTeacherLoss(nn.Module):
    """Base of the distillation losses: temperatures, center buffers and their update.

    Subclasses name their centers (``"center"``, ``"region_center"``); each is a [1, K] float32
    buffer in ``state_dict()``. Teacher logits are first *accumulated* (a running sum and count per
    center, local to the process) and then *applied*: the sums and counts are all-reduced over
    processes and ``c <- m c + (1 - m) sum / count``. ``forward(..., update_centers=True)`` does both
    after the loss is computed; with gradient accumulation, pass ``update_centers=False``, call
    ``accumulate_centers(teacher)`` for each micro-batch and ``update_centers()`` once per optimiser
    step. All processes must call ``update_centers`` together (it is a collective).

    Args:
        out_dim: K.
        center_names: the center buffers to create.
        warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs: the teacher temperature schedule.
        n_epochs: the planned number of epochs (later epochs keep ``teacher_temp``).
        student_temp: tau_s.
        center_momentum: m.
        validate: check inputs for NaN/inf (synchronises with the device).
    """

    def __init__(
        self,
        out_dim: int,
        center_names: Sequence[str],
        *,
        warmup_teacher_temp: float,
        teacher_temp: float,
        warmup_teacher_temp_epochs: int,
        n_epochs: int,
        student_temp: float,
        center_momentum: float,
        validate: bool,
    ) -> None:
        super().__init__()
        _check_int("out_dim", out_dim, 1)
        _check_int("warmup_teacher_temp_epochs", warmup_teacher_temp_epochs, 0)
        _check_int("n_epochs", n_epochs, 1)
        for name, value in (
            ("warmup_teacher_temp", warmup_teacher_temp),
            ("teacher_temp", teacher_temp),
            ("student_temp", student_temp),
        ):
            if not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a positive number; got {value!r}")
        if not isinstance(center_momentum, (int, float)) or not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"center_momentum must lie in [0, 1]; got {center_momentum!r}")
        self.out_dim = out_dim
        self.warmup_teacher_temp = float(warmup_teacher_temp)
        self.teacher_temp = float(teacher_temp)
        self.warmup_teacher_temp_epochs = warmup_teacher_temp_epochs
        self.n_epochs = n_epochs
        self.student_temp = float(student_temp)
        self.center_momentum = float(center_momentum)
        self.validate = bool(validate)
        self._center_names = tuple(center_names)
        for name in self._center_names:
            self.register_buffer(name, torch.zeros(1, out_dim))
            # running [sum over rows (K), count] of teacher logits not yet applied; not saved
            self.register_buffer(f"_{name}_pending", torch.zeros(out_dim + 1), persistent=False)

    def teacher_temperature(self, epoch: int) -> float:
        """tau_t at ``epoch`` (see `teacher_temperature`)."""
        return teacher_temperature(epoch, self.warmup_teacher_temp, self.teacher_temp, self.warmup_teacher_temp_epochs)

    def _accumulate(self, name: str, logits: torch.Tensor) -> None:
        """Add the rows of ``logits`` [..., K] to center ``name``'s running sum and count."""
        with torch.no_grad():
            pending = getattr(self, f"_{name}_pending")
            flat = logits.detach().reshape(-1, self.out_dim)
            pending[:-1] += flat.sum(dim=0, dtype=torch.float32).to(pending.device)
            pending[-1] += flat.shape[0]

    def _apply_pending(self) -> None:
        """All-reduce the running sums and counts and move every center toward its batch mean."""
        with torch.no_grad():
            pending = torch.stack([getattr(self, f"_{n}_pending") for n in self._center_names])
            dist.all_reduce_sum(pending)
            m = self.center_momentum
            for i, name in enumerate(self._center_names):
                center = getattr(self, name)
                count = pending[i, -1]
                mean = pending[i, :-1] / count.clamp_min(1.0)
                updated = center * m + mean.to(center.dtype).unsqueeze(0) * (1.0 - m)
                center.copy_(torch.where(count > 0, updated, center))
                getattr(self, f"_{name}_pending").zero_()

    def extra_repr(self) -> str:
        return (
            f"out_dim={self.out_dim}, teacher_temp={self.warmup_teacher_temp}->{self.teacher_temp} over "
            f"{self.warmup_teacher_temp_epochs} epochs, student_temp={self.student_temp}, "
            f"center_momentum={self.center_momentum}"
        )


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
