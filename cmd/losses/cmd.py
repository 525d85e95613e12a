"""The Cross-level Multi-instance Distillation (CMD) loss and its presets ("dino", "esvit", "cmd").

Each crop is a *bag* whose *instances* are its region tokens. With multi-instance weights
``w_v,j >= 0`` (``sum_j w_v,j = 1``) the bags are mixtures of the region distributions:
student ``log b_v = logsumexp_j(log w_v,j + log q_v,j)``, teacher ``beta_g = sum_i w_g,i Q_g,i``.
For teacher crop g and student crop v != g (``2 (V - 1)`` pairs for G = 2):

- ``I(g, v) = H(P_g, p_v)``                               intra-level, image (DINO)
- ``R(g, v) = 1/N_v sum_j H(Q_g,m(j), q_v,j)``              intra-level, region (EsViT)
- ``S(v) = KL(b_v || p_v)``                                inter-level inside the student (CMD)
- ``T(g) = KL(beta_g || P_g)``                             inter-level inside the teacher: a diagnostic
- ``X(g, v) = 1/2 [H(P_g, b_v) + H(beta_g, p_v)]``         cross-level teacher -> student (off by default)

``L = mean_pairs[lambda_I I + lambda_R R + lambda_X X] + lambda_S mean_v S``, every H and KL averaged
over the batch. Presets: "dino" (lambda_I = 1), "esvit" (0.5 / 0.5), "cmd" (0.5 / 0.5, lambda_S = 0.1).
See `DINOLoss` and `RegionDistillationLoss` for the aggregated targets that make I and R cheap.

Example:
    >>> import torch
    >>> from cmd.heads.output import CrossLevelOutput
    >>> B, K, D = 2, 16, 8
    >>> def out(crops, n):
    ...     return CrossLevelOutput(torch.randn(crops * B, K), torch.randn(crops * B, n, K),
    ...                             torch.randn(crops * B, n, D), torch.full((crops * B, n), 1 / n))
    >>> loss_fn = CMDLoss.from_preset("cmd", out_dim=K, n_local_crops=3)
    >>> result = loss_fn([out(2, 4), out(3, 1)], [out(2, 4)], epoch=0)
    >>> sorted(result.terms)[:3], result.loss.dim()
    (['cross', 'image', 'inter_student'], 0)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from cmd.heads.output import CrossLevelOutput
from cmd.losses.dino import image_distillation
from cmd.losses.functional import (
    kl_divergence_rows,
    mixture_log_prob,
    no_autocast,
    scaled_float32,
)
from cmd.losses.fused import fused_region_distillation
from cmd.losses.inputs import as_output_list, check_outputs, layout_of
from cmd.losses.region import (
    check_crop_counts,
    normalised_weights,
    region_distillation,
    teacher_region_bags,
    teacher_region_probs,
)
from cmd.losses.targets import CenteredTeacherLoss, aggregate_targets

__all__ = ["CMDLoss", "CMDLossOutput", "TERM_NAMES"]

#: The keys of `CMDLossOutput.terms`, always all present.
TERM_NAMES = (
    "image",
    "region",
    "inter_student",
    "inter_teacher",
    "cross",
    "teacher_entropy",
    "teacher_student_kl",
)


@dataclass
class CMDLossOutput:
    """The CMD loss and its components.

    Attributes:
        loss: 0-dim float32, the weighted total to back-propagate.
        terms: detached 0-dim tensors for logging (no host synchronisation was needed to make them):
            ``image`` mean over pairs of I; ``region`` of R; ``inter_student`` mean over crops of S;
            ``inter_teacher`` mean over teacher crops of T (a diagnostic, never in the loss);
            ``cross`` mean over pairs of X; ``teacher_entropy`` mean entropy of the teacher's image
            distributions (near log K: uniform collapse, near 0: one-prototype collapse);
            ``teacher_student_kl`` mean over pairs of ``KL(P_g || p_v)``. A term that was not
            computed (its weight is 0, or the outputs it needs are None) is NaN.
    """

    loss: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)


class CMDLoss(CenteredTeacherLoss):
    """Cross-level multi-instance distillation loss over multi-crop student and teacher outputs.

    Args:
        out_dim: K.
        n_global_crops: G, the teacher's crops (the first G student crops, in the same order).
        n_local_crops: L, the student's further crops (V = G + L).
        warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, n_epochs: teacher temperature
            schedule (constant after the warm-up, also past ``n_epochs``).
        student_temp: tau_s.
        center_momentum: m for both centers (buffers ``center`` and ``region_center`` [1, K]).
        image_weight, region_weight, inter_weight, cross_weight: lambda_I, lambda_R, lambda_S, lambda_X.
            A term whose weight is 0 is not computed (reported as NaN), except I.
        validate: check every input for NaN/inf and the weights for validity (synchronises).
        fused_chunk_size: None (default): the student's ``region`` logits are used as given. An int:
            the fused region path (`cmd.losses.fused`): the student groups carry ``region_embedding``
            [C_s * B, N_s, d] instead of ``region`` (``CrossLevelHead(region_output="embedding")``),
            ``forward`` gets ``prototypes=head.region_head.prototypes`` [K, d], and the prototype
            layer, log-softmax, cross-entropy and bags run over chunks of this many crop-images,
            never holding the student's [tokens, K] logits. Needs lambda_R > 0 and lambda_X = 0.

    Shapes (``forward``):
        student: a sequence of `CrossLevelOutput` groups, crop-major, the first group starting with
            the G global crops: ``image`` [C_s * B, K]; ``region`` [C_s * B, N_s, K] (lambda_R, lambda_S,
            lambda_X); ``features`` [C_s * B, N_s, D] (lambda_R); ``weights`` [C_s * B, N_s] (lambda_S,
            lambda_X).
        teacher: the G global crops likewise (``features`` for lambda_R, ``weights`` for T and X).
        output: `CMDLossOutput`.

    Example:
        >>> loss_fn = CMDLoss.from_preset("dino", out_dim=8, n_local_crops=1)
        >>> s, t = CrossLevelOutput(torch.randn(3 * 2, 8)), CrossLevelOutput(torch.randn(2 * 2, 8))
        >>> out = loss_fn([s], [t], epoch=0)
        >>> bool(torch.isnan(out.terms["region"]))  # not computed with the "dino" preset
        True
    """

    PRESETS: ClassVar[dict[str, dict[str, float]]] = {
        "dino": {"image_weight": 1.0, "region_weight": 0.0, "inter_weight": 0.0, "cross_weight": 0.0},
        "esvit": {"image_weight": 0.5, "region_weight": 0.5, "inter_weight": 0.0, "cross_weight": 0.0},
        "cmd": {"image_weight": 0.5, "region_weight": 0.5, "inter_weight": 0.1, "cross_weight": 0.0},
    }

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
        image_weight: float = 0.5,
        region_weight: float = 0.5,
        inter_weight: float = 0.1,
        cross_weight: float = 0.0,
        validate: bool = False,
        fused_chunk_size: int | None = None,
    ) -> None:
        super().__init__(
            out_dim,
            ("center", "region_center"),
            warmup_teacher_temp=warmup_teacher_temp,
            teacher_temp=teacher_temp,
            warmup_teacher_temp_epochs=warmup_teacher_temp_epochs,
            n_epochs=n_epochs,
            student_temp=student_temp,
            center_momentum=center_momentum,
            validate=validate,
        )
        self.n_global_crops, self.n_local_crops = check_crop_counts(n_global_crops, n_local_crops)
        for name, value in (
            ("image_weight", image_weight),
            ("region_weight", region_weight),
            ("inter_weight", inter_weight),
            ("cross_weight", cross_weight),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number >= 0; got {value!r}")
        self.image_weight = float(image_weight)
        self.region_weight = float(region_weight)
        self.inter_weight = float(inter_weight)
        self.cross_weight = float(cross_weight)
        if fused_chunk_size is not None:
            if isinstance(fused_chunk_size, bool) or not isinstance(fused_chunk_size, int) or fused_chunk_size < 1:
                raise ValueError(f"fused_chunk_size must be None or a positive int; got {fused_chunk_size!r}")
            if self.region_weight == 0 or self.cross_weight > 0:
                raise ValueError(
                    "fused_chunk_size needs region_weight > 0 and cross_weight == 0; got "
                    f"region_weight={self.region_weight}, cross_weight={self.cross_weight}"
                )
        self.fused_chunk_size = fused_chunk_size

    @classmethod
    def from_preset(cls, name: str, **overrides) -> CMDLoss:
        """A loss with the weights of preset ``name`` ("dino", "esvit" or "cmd"); ``overrides`` win.

        ``out_dim`` must be given among the overrides.

        Example:
            >>> CMDLoss.from_preset("esvit", out_dim=64).inter_weight
            0.0
        """
        if name not in cls.PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(cls.PRESETS)}")
        if "out_dim" not in overrides:
            raise TypeError("CMDLoss.from_preset() needs out_dim=..., e.g. from_preset('cmd', out_dim=65536)")
        return cls(**{**cls.PRESETS[name], **overrides})

    @property
    def n_crops(self) -> int:
        """V = G + L."""
        return self.n_global_crops + self.n_local_crops

    def _needed_fields(self, teacher_has_weights: bool) -> tuple[dict[str, str], dict[str, str]]:
        student: dict[str, str] = {}
        teacher: dict[str, str] = {}
        if self.region_weight > 0:
            why = "region_weight > 0 (the region-level term)"
            student.update(region=why, features=why)
            teacher.update(region=why, features=why)
        if self.inter_weight > 0:
            why = "inter_weight > 0 (the student's bag of regions)"
            student.setdefault("region", why)
            student["weights"] = why
        if self.cross_weight > 0:
            why = "cross_weight > 0 (the cross-level term)"
            student.setdefault("region", why)
            student["weights"] = why
            teacher.setdefault("region", why)
            teacher["weights"] = why
        elif teacher_has_weights and "region" in teacher:
            teacher["weights"] = "the inter_teacher diagnostic"
        return student, teacher

    def forward(
        self,
        student: CrossLevelOutput | Sequence[CrossLevelOutput],
        teacher: CrossLevelOutput | Sequence[CrossLevelOutput],
        epoch: int,
        *,
        update_centers: bool = True,
        prototypes: torch.Tensor | None = None,
    ) -> CMDLossOutput:
        """The loss and its terms; then, by default, the update of both centers.

        ``prototypes`` [K, d]: the student region head's prototypes, for the fused path only.
        """
        student = as_output_list("student", student)
        teacher = as_output_list("teacher", teacher)
        layout = layout_of(student, teacher, self.n_global_crops, self.n_crops)
        teacher_has_weights = all(o.weights is not None for o in teacher)
        student_fields, teacher_fields = self._needed_fields(teacher_has_weights)
        fused = self.fused_chunk_size is not None
        if fused:
            if prototypes is None:
                raise ValueError("CMDLoss(fused_chunk_size=...) needs prototypes=head.region_head.prototypes [K, d]")
            if prototypes.dim() != 2 or prototypes.shape[0] != self.out_dim:
                raise ValueError(f"prototypes must be [K={self.out_dim}, d]; got {list(prototypes.shape)}")
            student_fields.pop("region", None)
            student_fields["region_embedding"] = "the fused region path (fused_chunk_size)"
        elif prototypes is not None:
            raise ValueError("prototypes are used by the fused path only; build CMDLoss(fused_chunk_size=...)")
        check_outputs(
            student,
            teacher,
            layout,
            self.out_dim,
            student_fields=student_fields,
            teacher_fields=teacher_fields,
            validate=self.validate,
        )
        tau_t, tau_s = self.teacher_temperature(epoch), self.student_temp
        device = student[0].image.device
        need_bags = self.inter_weight > 0 or self.cross_weight > 0
        b, n_pairs = layout.batch_size, layout.n_pairs
        nan = torch.full((), float("nan"), device=device)
        terms = dict.fromkeys(TERM_NAMES, nan)

        with no_autocast(device):
            img = image_distillation(
                [o.image for o in student],
                [o.image for o in teacher],
                layout,
                self.center,
                tau_t,
                tau_s,
                return_log_probs=need_bags,
                return_teacher_log_probs=True,
            )
            terms["image"] = img.cross_entropy / n_pairs
            loss = self.image_weight * terms["image"]
            with torch.no_grad():
                entropy = -(img.teacher_probs * img.teacher_log_probs).sum(dim=-1).mean()
                terms["teacher_entropy"] = entropy
                # mean over pairs of KL(P_g || p_v) = mean H(P_g, p_v) - mean H(P_g): every g has V - 1 pairs
                terms["teacher_student_kl"] = (terms["image"].detach() - entropy).clamp_min(0.0)

            region_log_probs: list[torch.Tensor] | None = None
            beta: torch.Tensor | None = None  # the teacher's bags [G * B, K]
            teacher_weights = [o.weights for o in teacher] if "weights" in teacher_fields else None
            if fused:
                ce, kl, beta = fused_region_distillation(
                    [o.region_embedding for o in student],
                    [o.features for o in student],
                    [o.region for o in teacher],
                    [o.features for o in teacher],
                    layout,
                    prototypes,
                    self.region_center,
                    tau_t,
                    tau_s,
                    chunk_rows=self.fused_chunk_size,
                    student_weights=[normalised_weights(o.weights) for o in student] if need_bags else None,
                    image_log_probs=img.log_probs if need_bags else None,
                    teacher_weights=teacher_weights,
                )
                terms["region"] = ce / n_pairs
                loss = loss + self.region_weight * terms["region"]
                if self.inter_weight > 0:
                    terms["inter_student"] = kl / (b * layout.n_crops)
                    loss = loss + self.inter_weight * terms["inter_student"]
                need_bags = False  # the bag term is done
            elif self.region_weight > 0:
                reg = region_distillation(
                    [o.region for o in student],
                    [o.features for o in student],
                    [o.region for o in teacher],
                    [o.features for o in teacher],
                    layout,
                    self.region_center,
                    tau_t,
                    tau_s,
                    return_log_probs=need_bags,
                    teacher_weights=teacher_weights,
                )
                terms["region"] = reg.cross_entropy / n_pairs
                loss = loss + self.region_weight * terms["region"]
                region_log_probs, beta = reg.log_probs, reg.teacher_bags
            elif need_bags:
                region_log_probs = [torch.log_softmax(scaled_float32(o.region, tau_s), dim=-1) for o in student]
                if self.cross_weight > 0:
                    _, q = teacher_region_probs([o.region for o in teacher], self.region_center, tau_t)
                    beta = teacher_region_bags(q, teacher_weights)
                    del q
            if beta is not None:
                with torch.no_grad():
                    terms["inter_teacher"] = _kl_from_probs(beta, img.teacher_log_probs).mean()

            if need_bags:
                log_b = torch.cat(
                    [mixture_log_prob(lq, normalised_weights(o.weights)) for lq, o in zip(region_log_probs, student)]
                )  # [V * B, K]
                if self.inter_weight > 0:
                    terms["inter_student"] = kl_divergence_rows(log_b, img.log_probs).mean()
                    loss = loss + self.inter_weight * terms["inter_student"]
                if self.cross_weight > 0:
                    indices, offsets, _ = img.bags
                    image_target = aggregate_targets(img.teacher_probs, indices, offsets)  # sum_{g != v} P_g
                    bag_target = aggregate_targets(beta, indices, offsets)  # sum_{g != v} beta_g
                    h_bag = -(image_target * log_b).sum()
                    h_image = -(bag_target * img.log_probs).sum()
                    terms["cross"] = 0.5 * (h_bag + h_image) / (b * n_pairs)
                    loss = loss + self.cross_weight * terms["cross"]

        if update_centers:
            self.update_centers(teacher)
        return CMDLossOutput(loss=loss, terms={k: v.detach() for k, v in terms.items()})

    def accumulate_centers(self, teacher: CrossLevelOutput | Sequence[CrossLevelOutput]) -> None:
        """Add the teacher's image (and region, when present) logits to the running sums (no sync)."""
        for o in as_output_list("teacher", teacher):
            self._accumulate("center", o.image)
            if o.region is not None:
                self._accumulate("region_center", o.region)

    def update_centers(self, teacher: CrossLevelOutput | Sequence[CrossLevelOutput] | None = None) -> None:
        """Accumulate ``teacher`` (if given), then apply the pending update of both centers (collective)."""
        if teacher is not None:
            self.accumulate_centers(teacher)
        self._apply_pending()

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, crops={self.n_global_crops}+{self.n_local_crops}, "
            f"weights(I={self.image_weight}, R={self.region_weight}, S={self.inter_weight}, X={self.cross_weight})"
            + (f", fused_chunk_size={self.fused_chunk_size}" if self.fused_chunk_size is not None else "")
        )


def _kl_from_probs(p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``KL(p || q)`` per row for a probability tensor ``p`` that may hold zeros (0 log 0 = 0)."""
    positive = p > 0
    log_p = torch.where(positive, p, torch.ones_like(p)).log()
    return torch.where(positive, p * (log_p - log_q), torch.zeros_like(p)).sum(dim=-1)
