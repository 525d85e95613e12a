"""EsViT's region-level distillation loss with argmax region matching, computed with aggregated targets.

For teacher global crop g and student crop v of the same B images, with region logits
``tr_g`` [B, N_g, K], ``r_v`` [B, N_v, K] and backbone tokens ``F'_g``, ``F_v``:
``Q_g,i = softmax((tr_g,i - c_r) / tau_t)``, ``log q_v,j = log_softmax(r_v,j / tau_s)``, and

    R(g, v) = 1/B sum_b 1/N_v sum_j H(Q_g,m(j), q_v,j),   m(j) = argmax_i cos(F_v,j, F'_g,i)

(each student region is matched to the most similar teacher region of the same image; no gradient
through the matching). Summed over the teachers ``g != v``, student region j of crop v has the
aggregated target ``sum_{g != v} Q_{g, m_g(j)}``, gathered from all teacher crops into one buffer
per student group: one log-softmax and one cross-entropy per student region.

Example:
    >>> import torch
    >>> from cmd.heads.output import CrossLevelOutput
    >>> B, K, D = 2, 16, 8
    >>> student = [CrossLevelOutput(torch.randn(2 * B, K), torch.randn(2 * B, 4, K), torch.randn(2 * B, 4, D)),
    ...            CrossLevelOutput(torch.randn(3 * B, K), torch.randn(3 * B, 1, K), torch.randn(3 * B, 1, D))]
    >>> teacher = [CrossLevelOutput(torch.randn(2 * B, K), torch.randn(2 * B, 4, K), torch.randn(2 * B, 4, D))]
    >>> loss_fn = RegionDistillationLoss(K, n_global_crops=2, n_local_crops=3)
    >>> loss_fn(student, teacher, epoch=0).dim()
    0
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cmd.heads.output import CrossLevelOutput
from cmd.losses.functional import match_regions, no_autocast, soft_cross_entropy, teacher_match_tokens
from cmd.losses.inputs import as_output_list, check_outputs, layout_of
from cmd.losses.layout import CropLayout
from cmd.losses.targets import CenteredTeacherLoss, aggregate_targets, centered_probs, region_target_bags

__all__ = ["RegionDistillationLoss", "RegionDistillation", "region_distillation"]


@dataclass
class RegionDistillation:
    """Region-level results shared with `CMDLoss`.

    Attributes:
        cross_entropy: 0-dim, ``sum over pairs (g, v != g) of R(g, v)`` (divide by the pair count).
        log_probs: per student group [C_s * B, N_s, K] ``log q`` (differentiable), or None.
        teacher_bags: [G * B, K] ``beta_g = sum_i w_g,i Q_g,i`` when teacher weights were given, else None.
    """

    cross_entropy: torch.Tensor
    log_probs: list[torch.Tensor] | None
    teacher_bags: torch.Tensor | None


def teacher_region_probs(
    teacher_regions: Sequence[torch.Tensor], region_center: torch.Tensor, teacher_temp: float
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``Q`` for all teacher groups: one flat [sum_t G_t B N_t, K] buffer and per-group [G_t B, N_t, K] views."""
    k = region_center.shape[-1]
    flat = [r.reshape(-1, k) for r in teacher_regions]
    probs = centered_probs(flat[0] if len(flat) == 1 else torch.cat(flat), region_center, teacher_temp)
    views, start = [], 0
    for r in teacher_regions:
        n = r.shape[0] * r.shape[1]
        views.append(probs[start : start + n].view(r.shape[0], r.shape[1], k))
        start += n
    return probs, views


def teacher_region_bags(probs: Sequence[torch.Tensor], weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """``beta_g = sum_i w_g,i Q_g,i`` [G * B, K] from per-group ``Q`` [G_t B, N_t, K] and weights [G_t B, N_t].

    The weights are renormalised in float32 (see `normalised_weights`); no gradient.
    """
    with torch.no_grad():
        return torch.cat(
            [torch.bmm(normalised_weights(w).unsqueeze(1), q).squeeze(1) for q, w in zip(probs, weights)]
        )


def normalised_weights(weights: torch.Tensor) -> torch.Tensor:
    """``w / sum_j w_j`` in float32 [R, N] (differentiable).

    The weights are meant to sum to 1; renormalising in float32 makes the bags proper mixtures also
    for low-precision weights (a bf16 softmax sums to 1 only within ~1e-3), so that the KL terms stay
    >= 0. The loss is thereby invariant to the scale of each row of weights: the gradient with
    respect to ``w`` is the projection ``g_j - sum_i w_i g_i`` of the formula's gradient, which
    changes nothing downstream of a softmax.
    """
    w = weights.to(torch.float32)
    return w / w.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


@dataclass
class TeacherRegionTargets:
    """The teacher side of the region-level loss, computed once per step.

    Attributes:
        probs: [M, K] float32 ``Q`` of every teacher region, all teacher crops in one flat buffer
            (M = sum_t G_t B N_t), no gradient.
        bags: [G * B, K] ``beta_g`` when teacher weights were given, else None.
        row_start: [G] long, the first row of teacher crop g in ``probs``.
        tokens: [G] long, N_g.
        features: per teacher group [G_t * B, N_t, D] backbone tokens (for matching).
        units: per teacher group, the unit-norm tokens used by `match_regions`.
        batch_size: B.
    """

    probs: torch.Tensor
    bags: torch.Tensor | None
    row_start: torch.Tensor
    tokens: torch.Tensor
    features: Sequence[torch.Tensor]
    units: list[torch.Tensor]
    batch_size: int

    def match(self, student_features: torch.Tensor) -> torch.Tensor:
        """``m_g(j)`` for one student group [C * B, N_s, D] against every teacher crop: [C, B, N_s, G]."""
        b = self.batch_size
        return torch.cat(
            [match_regions(student_features, tf, b, teacher_tokens=u) for tf, u in zip(self.features, self.units)],
            dim=-1,
        )


def teacher_region_targets(
    teacher_regions: Sequence[torch.Tensor],
    teacher_features: Sequence[torch.Tensor],
    layout: CropLayout,
    region_center: torch.Tensor,
    teacher_temp: float,
    teacher_weights: Sequence[torch.Tensor] | None = None,
) -> TeacherRegionTargets:
    """Centered teacher probabilities, bags, flat-buffer offsets and matching tokens (shapes checked)."""
    b = layout.batch_size
    device = teacher_regions[0].device
    probs, views = teacher_region_probs(teacher_regions, region_center, teacher_temp)
    bags = teacher_region_bags(views, teacher_weights) if teacher_weights is not None else None
    # First row of each teacher crop in the flat buffer, and its token count (built on the device).
    starts, tokens, row = [], [], 0
    for r, g_t in zip(teacher_regions, layout.teacher_crops):
        n_t = r.shape[1]
        starts.append(torch.arange(g_t, device=device) * (b * n_t) + row)
        tokens.append(torch.full((g_t,), n_t, device=device, dtype=torch.long))
        row += g_t * b * n_t
    return TeacherRegionTargets(
        probs=probs,
        bags=bags,
        row_start=torch.cat(starts),
        tokens=torch.cat(tokens),
        features=teacher_features,
        units=[teacher_match_tokens(tf, b) for tf in teacher_features],
        batch_size=b,
    )


def region_distillation(
    student_regions: Sequence[torch.Tensor],
    student_features: Sequence[torch.Tensor],
    teacher_regions: Sequence[torch.Tensor],
    teacher_features: Sequence[torch.Tensor],
    layout: CropLayout,
    region_center: torch.Tensor,
    teacher_temp: float,
    student_temp: float,
    *,
    return_log_probs: bool = False,
    teacher_weights: Sequence[torch.Tensor] | None = None,
) -> RegionDistillation:
    """``sum_{g, v != g} R(g, v)`` with aggregated, matched targets (shapes already checked).

    Args:
        student_regions, student_features: per student group [C_s * B, N_s, K] and [C_s * B, N_s, D].
        teacher_regions, teacher_features: per teacher group [G_t * B, N_t, K] and [G_t * B, N_t, D].
        layout: the crop layout.
        region_center: [1, K].
        teacher_temp, student_temp: tau_t, tau_s.
        return_log_probs: keep the student region log-probabilities (for the bags of `CMDLoss`).
        teacher_weights: per teacher group [G_t * B, N_t]; when given, also the teacher's bags.
    """
    b, k = layout.batch_size, region_center.shape[-1]
    device = student_regions[0].device
    teacher = teacher_region_targets(
        teacher_regions, teacher_features, layout, region_center, teacher_temp, teacher_weights
    )
    bags = teacher.bags

    # All targets first, so that the teacher probabilities are freed before the student's log-probs exist.
    targets = []
    for s, features in enumerate(student_features):
        indices, offsets, mass = region_target_bags(teacher.match(features), teacher.row_start, teacher.tokens, layout, s)
        targets.append((aggregate_targets(teacher.probs, indices, offsets), mass))
    del teacher

    total = torch.zeros((), device=device)
    log_probs: list[torch.Tensor] = []
    for s, region in enumerate(student_regions):
        n_s = region.shape[1]
        target, mass = targets[s]
        targets[s] = None  # the cross-entropy keeps it for its backward pass only
        ce, lp = soft_cross_entropy(region.reshape(-1, k), target, student_temp, mass, return_log_probs=return_log_probs)
        del target
        total = total + ce / (b * n_s)
        if lp is not None:
            log_probs.append(lp.view(region.shape[0], n_s, k))
    return RegionDistillation(total, log_probs if return_log_probs else None, bags)


class RegionDistillationLoss(CenteredTeacherLoss):
    """EsViT's region-level loss alone: ``L = 1 / (G (V - 1)) sum_{g, v != g} R(g, v)``.

    Uses the ``region`` logits and backbone ``features`` of `CrossLevelOutput` groups; its center is
    the buffer ``region_center`` [1, K], updated from the mean of *all* teacher region logits (every
    token of every image) of the global batch after the loss is computed.

    Args:
        out_dim: K.
        n_global_crops: G. n_local_crops: L (V = G + L).
        warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, n_epochs, student_temp,
        center_momentum, validate: as in `DINOLoss`.

    Shapes:
        student: groups with ``region`` [C_s * B, N_s, K] and ``features`` [C_s * B, N_s, D].
        teacher: groups with ``region`` [G_t * B, N_t, K] and ``features`` [G_t * B, N_t, D].
        output: scalar.
    """

    def __init__(
        self,
        out_dim: int,
        n_global_crops: int = 2,
        n_local_crops: int = 8,
        *,
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
            ("region_center",),
            warmup_teacher_temp=warmup_teacher_temp,
            teacher_temp=teacher_temp,
            warmup_teacher_temp_epochs=warmup_teacher_temp_epochs,
            n_epochs=n_epochs,
            student_temp=student_temp,
            center_momentum=center_momentum,
            validate=validate,
        )
        self.n_global_crops, self.n_local_crops = check_crop_counts(n_global_crops, n_local_crops)

    def forward(
        self,
        student: CrossLevelOutput | Sequence[CrossLevelOutput],
        teacher: CrossLevelOutput | Sequence[CrossLevelOutput],
        epoch: int,
        *,
        update_centers: bool = True,
    ) -> torch.Tensor:
        """The loss (a 0-dim float32 tensor); then, by default, the center update."""
        student = as_output_list("student", student)
        teacher = as_output_list("teacher", teacher)
        layout = layout_of(student, teacher, self.n_global_crops, self.n_global_crops + self.n_local_crops)
        why = {"region": "the region-level loss", "features": "region matching"}
        check_outputs(
            student, teacher, layout, self.out_dim, student_fields=why, teacher_fields=why, validate=self.validate
        )
        tau_t = self.teacher_temperature(epoch)
        with no_autocast(student[0].image.device):
            result = region_distillation(
                [o.region for o in student],
                [o.features for o in student],
                [o.region for o in teacher],
                [o.features for o in teacher],
                layout,
                self.region_center,
                tau_t,
                self.student_temp,
            )
            loss = result.cross_entropy / layout.n_pairs
        if update_centers:
            self.update_centers(teacher)
        return loss

    def accumulate_centers(self, teacher: CrossLevelOutput | Sequence[CrossLevelOutput]) -> None:
        """Add the teacher's region logits to the running sum of the next center update (no sync)."""
        for i, o in enumerate(as_output_list("teacher", teacher)):
            if o.region is None:
                raise ValueError(f"teacher[{i}].region is None; the region center needs region logits")
            self._accumulate("region_center", o.region)

    def update_centers(self, teacher: CrossLevelOutput | Sequence[CrossLevelOutput] | None = None) -> None:
        """Accumulate ``teacher`` (if given), then apply the pending center update (collective)."""
        if teacher is not None:
            self.accumulate_centers(teacher)
        self._apply_pending()


def check_crop_counts(n_global_crops: int, n_local_crops: int) -> tuple[int, int]:
    """Validate G >= 1, L >= 0 and G + L >= 2 (at least one teacher/student pair)."""
    for name, value, low in (("n_global_crops", n_global_crops, 1), ("n_local_crops", n_local_crops, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}; got {value!r}")
    if n_global_crops + n_local_crops < 2:
        raise ValueError(
            f"need at least 2 crops for a teacher/student pair; got n_global_crops={n_global_crops}, "
            f"n_local_crops={n_local_crops}"
        )
    return n_global_crops, n_local_crops
