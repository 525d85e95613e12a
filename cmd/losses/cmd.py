"""The Cross-level Multi-instance Distillation (CMD) loss and its presets ("dino", "esvit", "cmd").

Each crop is a *bag* of its region tokens; with MIL weights ``w`` (rows sum to 1) the bags are mixtures:
student ``log b_v = logsumexp_j(log w_v,j + log q_v,j)``, teacher ``beta_g = sum_i w_g,i Q_g,i``.
For teacher crop g and student crop v != g (``G (V - 1)`` pairs):

- ``I(g, v) = H(P_g, p_v)``                               intra-level, image (DINO); term ``image``
- ``R(g, v) = 1/N_v sum_j H(Q_g,m(j), q_v,j)``              intra-level, region (EsViT); ``region``
- ``S(v) = KL(b_v || p_v)``                                inter-level inside the student (CMD); ``inter_level``
- ``T(g) = KL(beta_g || P_g)``                             inter-level inside the teacher: a diagnostic;
                                                           ``inter_level_teacher``
- ``X(g, v) = 1/2 [H(P_g, b_v) + H(beta_g, p_v)]``         swapped levels, teacher -> student (an extension,
                                                           off by default); ``swapped``

(The terms were named ``inter_student``, ``inter_teacher`` and ``cross`` before; `DEPRECATED_TERM_NAMES`.)

``L = mean_pairs[lambda_I I + lambda_R R + lambda_X X] + lambda_S mean_v S (+ lambda_K KoLeo)``, every H
and KL averaged over the batch. The cross-entropy is linear in its target, so the targets of the
teacher crops ``g != v`` are summed first (`target_index`): one log-softmax and one cross-entropy
per student crop or region, the teacher's softmax once. Examples: `CMDLoss`, ``docs/blocks/losses.md``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import ClassVar, Literal

import torch
from torch import nn

from cmd import distributed as dist
from cmd.heads.output import CrossLevelOutput
from cmd.losses.center import Center, sinkhorn_knopp
from cmd.losses.functional import (  # fmt: skip
    aggregate_targets,
    bag_log_prob,
    kl_rows,
    koleo,
    match_regions,
    normalise_weights,
    target_index,
    unit_teacher_tokens,
)
from cmd.losses.fused import fused_prototype_cross_entropy, region_cross_entropy
from cmd.schedules import teacher_temperature_schedule

__all__ = ["CMDLoss", "CMDLossOutput", "DEPRECATED_TERM_NAMES", "TERM_NAMES", "diagnose_collapse"]

#: The keys of `CMDLossOutput.terms`, always all present (NaN where not computed).
TERM_NAMES = (
    "image", "region", "inter_level", "inter_level_teacher", "swapped", "koleo",
    "teacher_entropy", "teacher_batch_entropy", "teacher_region_entropy", "teacher_student_kl",
)  # fmt: skip
#: Earlier names of terms (logs written before the rename use them): old -> new. ``cross`` was the
#: extension X (teacher image vs student bag, teacher bag vs student image: ``swapped``),
#: ``inter_student`` / ``inter_teacher`` the S / T of the equations.
DEPRECATED_TERM_NAMES = {"inter_student": "inter_level", "inter_teacher": "inter_level_teacher", "cross": "swapped"}
_TINY = torch.finfo(torch.float32).tiny


class _Terms(dict):
    """`CMDLossOutput.terms`: a dict that still answers the old term names (with a DeprecationWarning)."""

    def _renamed(self, key: object) -> object:
        new = DEPRECATED_TERM_NAMES.get(key) if isinstance(key, str) else None
        if new is not None:
            warnings.warn(f"loss term {key!r} is now named {new!r}", DeprecationWarning, stacklevel=3)
        return new

    def __missing__(self, key: object) -> torch.Tensor:
        new = self._renamed(key)
        if new is None:
            raise KeyError(key)
        return self[new]

    def __contains__(self, key: object) -> bool:
        return dict.__contains__(self, key) or (isinstance(key, str) and key in DEPRECATED_TERM_NAMES
                                                 and dict.__contains__(self, DEPRECATED_TERM_NAMES[key]))

    def get(self, key: object, default: object = None) -> object:
        return self[key] if key in self else default
Teacher = CrossLevelOutput | torch.Tensor | Sequence[CrossLevelOutput | torch.Tensor]
_WHY = {"tokens": "region_weight > 0 (matching)", "region": "region_weight > 0 or inter/swapped_weight > 0",
        "mil_weights": "inter_weight > 0 or swapped_weight > 0 (the bags)", "pooled": "koleo_weight > 0",
        "region_embedding": "the fused region path (fused_chunk_size)", "image": "every preset",
        "prototypes": "the fused region path (fused_chunk_size)"}  # fmt: skip


@dataclass
class CMDLossOutput:
    """``loss``: 0-dim float32, the weighted total. ``terms``: detached 0-dim tensors, made without a host sync.

    NaN where not computed (weight 0, or outputs absent): ``image``, ``region``, ``swapped`` (means over
    pairs of I, R, X), ``inter_level`` (mean of S), ``koleo``, ``inter_level_teacher`` (mean of T, a
    diagnostic). Collapse signals (`diagnose_collapse`): ``teacher_entropy`` = mean ``H(P_t)``;
    ``teacher_batch_entropy`` = ``H(mean_b P_t)`` over the global batch (all-reduced);
    ``teacher_region_entropy`` = mean ``H(Q)`` over teacher regions; ``teacher_student_kl`` = mean
    over pairs of ``KL(P_g || p_v)``.
    """

    loss: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)


UNIFORM_TOLERANCE = 0.01  # uniform collapse: H(P_t) >= 0.99 log K (calibrated on runs, issue 23)


def diagnose_collapse(
    teacher_entropy: float, teacher_batch_entropy: float, out_dim: int, *, tolerance: float = 0.1,
    uniform_tolerance: float = UNIFORM_TOLERANCE,
) -> Literal["uniform", "one_hot"] | None:
    """The teacher's collapse from its entropies (nats, ``CMDLossOutput.terms``), or None when healthy.

    ``"uniform"``: per-sample entropy ``H(P_t) >= (1 - uniform_tolerance) log K`` (then the batch-mean
    one is too: the targets carry almost no information); ``"one_hot"``: batch-mean entropy
    ``H(mean_b P_t) <= tolerance log K`` (every sample on the same few prototypes); healthy training
    has a low per-sample and a high batch-mean entropy.

    The uniform threshold is calibrated against the k-NN gain of real runs (docs/blocks/losses.md,
    "Calibration"): runs that learn (+4.5 to +35 k-NN points) stay below 0.984 log K at every logged
    step (most end at 0.8-0.94 log K), so the former thresholds of 0.9, 0.97 and 0.98 log K flagged
    some of them; runs that collapse (teacher-student KL under 0.05 nats, no gain) reach 0.991 log K
    and more.

    Entropies of K outcomes lie in ``[0, log K]``: a non-finite, negative or larger value (beyond a
    rounding slack of ``1e-3 log K``) is refused, as is a K that is not an integer >= 2.

    Raises:
        ValueError: ``out_dim`` not an integer >= 2, ``tolerance`` or ``uniform_tolerance`` outside
            (0, 0.5), or an entropy that is NaN, infinite, negative or above ``log K`` (the argument is named).

    Example:
        >>> import math
        >>> diagnose_collapse(0.99 * math.log(1024), math.log(1024), 1024), diagnose_collapse(0.0, 0.01, 1024)
        ('uniform', 'one_hot')
        >>> diagnose_collapse(1.5, 6.5, 1024) is None, diagnose_collapse(0.985 * math.log(128), 4.8, 128) is None
        (True, True)
    """
    import operator

    try:
        k = operator.index(out_dim) if not isinstance(out_dim, bool) else None
    except TypeError:
        k = None
    if k is None or k < 2:
        raise ValueError(f"out_dim (K, the number of prototypes) must be an integer >= 2, got {out_dim!r}")
    for name, value in (("tolerance", tolerance), ("uniform_tolerance", uniform_tolerance)):
        if not 0 < value < 0.5:
            raise ValueError(f"{name} must be in (0, 0.5), got {value!r}")
    log_k = math.log(k)
    slack = 1e-3 * log_k  # float32 rounding of a computed entropy, or a value rounded in a log
    values = {}
    for name, value in (("teacher_entropy", teacher_entropy), ("teacher_batch_entropy", teacher_batch_entropy)):
        try:
            h = float(value)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{name} must be a number (nats), got {value!r}") from err
        if not math.isfinite(h) or not -slack <= h <= log_k + slack:
            raise ValueError(
                f"{name} = {h!r} is impossible: the entropy of K = {k} outcomes lies in [0, log K = {log_k:.6g}] nats"
            )
        values[name] = h
    if values["teacher_entropy"] >= (1 - uniform_tolerance) * log_k:
        return "uniform"
    return "one_hot" if values["teacher_batch_entropy"] <= tolerance * log_k else None


class CMDLoss(nn.Module):
    """Cross-level multi-instance distillation loss over multi-crop student and teacher outputs.

    Args:
        out_dim: K. n_global_crops: G (the first G student crops, in order). n_local_crops: L (V = G + L).
        warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs: the teacher temperature
            (`cmd.schedules.teacher_temperature_schedule`, DINO's). student_temp: tau_s.
        center_momentum: m of both `Center` modules (``center`` image, ``region_center`` region).
        image_weight, region_weight, inter_weight, swapped_weight: lambda_I, lambda_R, lambda_S, lambda_X.
        koleo_weight: DINOv2's KoLeo term on the student's ``pooled`` image vectors of each global crop
            (the nearest neighbour within this process's batch, as DINOv2 does); 0 = off.
        centering, sinkhorn_iterations: ``"center"`` (DINO) or ``"sinkhorn"`` (DINOv2 / SwAV: `sinkhorn_knopp`
            over the global batch at both levels; the centers are then neither used nor updated).
        validate: check every input for NaN / inf (the fused path's prototypes included) and the MIL
            weights for validity (synchronises with the device).
        fused_chunk_size: None, or the fused region path (`cmd.losses.fused`, lambda_R > 0, lambda_X = 0):
            students give ``region_embedding`` + ``prototypes`` and the prototype layer runs inside the
            chunked region terms, over chunks of this many crop-images (the [T, K] logits never exist).
            Without it, with lambda_R > 0 and lambda_X = 0 (every preset), the region terms run chunked
            on the given region logits (chunks sized for the device); with lambda_X > 0 in plain autograd.
        cross_weight: deprecated name of ``swapped_weight`` (DeprecationWarning); None: not given.

    Attributes ``student_outputs`` / ``teacher_outputs``: the `CrossLevelOutput` fields the loss reads
    (pass them as ``network(crops, outputs=...)``); ``active_terms``: the terms with weight > 0.

    ``forward(student, teacher, epoch=None, *, teacher_temp=None, update_centers=True)``: ``student``
    `CrossLevelOutput` groups (crop-major, the first starting with the G global crops: ``image``
    [C_s * B, K], ``region`` [C_s * B, N_s, K], ``tokens`` [C_s * B, N_s, D], ``mil_weights``
    [C_s * B, N_s], ...); ``teacher`` one output of the G global crops [G * B, ...]; the schedule's
    ``epoch`` or an explicit ``teacher_temp``. Returns `CMDLossOutput`, then updates the centers.
    Under torch.distributed forward is a collective (batch entropy, Sinkhorn-Knopp, centers).

    Example:
        >>> B, K, D = 2, 16, 8
        >>> def out(crops, n):
        ...     return CrossLevelOutput(torch.randn(crops * B, K), torch.randn(crops * B, n, K),
        ...                             torch.randn(crops * B, n, D), torch.full((crops * B, n), 1 / n))
        >>> loss_fn = CMDLoss.from_preset("cmd", out_dim=K, n_local_crops=3)
        >>> result = loss_fn([out(2, 4), out(3, 1)], out(2, 4), epoch=0)
        >>> sorted(loss_fn.student_outputs), result.loss.dim(), bool(torch.isnan(result.terms["swapped"]))
        (['image', 'mil_weights', 'region', 'tokens'], 0, True)
    """

    PRESETS: ClassVar[dict[str, dict[str, float]]] = {
        "dino": {"image_weight": 1.0, "region_weight": 0.0, "inter_weight": 0.0, "swapped_weight": 0.0},
        "esvit": {"image_weight": 0.5, "region_weight": 0.5, "inter_weight": 0.0, "swapped_weight": 0.0},
        "cmd": {"image_weight": 0.5, "region_weight": 0.5, "inter_weight": 0.1, "swapped_weight": 0.0},
    }

    def __init__(  # fmt: skip
        self, out_dim: int, *, n_global_crops: int = 2, n_local_crops: int = 8,
        warmup_teacher_temp: float = 0.04, teacher_temp: float = 0.07, warmup_teacher_temp_epochs: int = 30,
        student_temp: float = 0.1, center_momentum: float = 0.9, image_weight: float = 0.5,
        region_weight: float = 0.5, inter_weight: float = 0.1, swapped_weight: float = 0.0, koleo_weight: float = 0.0,
        centering: Literal["center", "sinkhorn"] = "center", sinkhorn_iterations: int = 3,
        validate: bool = False, fused_chunk_size: int | None = None, cross_weight: float | None = None,
    ) -> None:
        super().__init__()
        if cross_weight is not None:  # the term's former name
            warnings.warn("CMDLoss(cross_weight=...) is deprecated: the term is named 'swapped', pass swapped_weight=",
                          DeprecationWarning, stacklevel=2)
            swapped_weight = cross_weight
        for name, value, low in (("n_global_crops", n_global_crops, 1), ("n_local_crops", n_local_crops, 0),
                                 ("out_dim", out_dim, 2), ("sinkhorn_iterations", sinkhorn_iterations, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}; got {value!r}")
        if n_global_crops + n_local_crops < 2:
            raise ValueError(f"need at least 2 crops for a teacher/student pair; got {n_global_crops} + {n_local_crops}")
        weights = dict(image_weight=image_weight, region_weight=region_weight, inter_weight=inter_weight,
                       swapped_weight=swapped_weight, koleo_weight=koleo_weight)
        for name, value in (*weights.items(), ("student_temp", student_temp)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number >= 0; got {value!r}")
        if student_temp <= 0:
            raise ValueError(f"student_temp must be a positive number; got {student_temp!r}")
        if not any(weights.values()):
            raise ValueError(f"no active term: at least one of {sorted(weights)} must be > 0")
        if centering not in ("center", "sinkhorn"):
            raise ValueError(f"centering must be 'center' or 'sinkhorn'; got {centering!r}")
        if fused_chunk_size is not None and (isinstance(fused_chunk_size, bool) or not isinstance(fused_chunk_size, int)
                                             or fused_chunk_size < 1 or region_weight == 0 or swapped_weight > 0):
            raise ValueError(f"fused_chunk_size must be None or a positive int, with region_weight > 0 and swapped_weight "
                             f"== 0; got {fused_chunk_size!r}, region_weight={region_weight}, swapped_weight={swapped_weight}")
        self.out_dim, self.n_global_crops, self.n_local_crops = out_dim, n_global_crops, n_local_crops
        self.temperature_schedule = teacher_temperature_schedule(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs)
        self.student_temp = float(student_temp)
        self.image_weight, self.region_weight = float(image_weight), float(region_weight)
        self.inter_weight, self.swapped_weight, self.koleo_weight = float(inter_weight), float(swapped_weight), float(koleo_weight)
        self.centering, self.sinkhorn_iterations = centering, sinkhorn_iterations
        self.validate, self.fused_chunk_size = bool(validate), fused_chunk_size
        self.center = Center(out_dim, center_momentum)
        self.region_center = Center(out_dim, center_momentum)
        self.register_load_state_dict_pre_hook(_load_legacy_centers)
        self.n_crops = n_global_crops + n_local_crops  # V
        terms = {"image": image_weight, "region": region_weight, "inter_level": inter_weight,
                 "swapped": swapped_weight, "koleo": koleo_weight}
        self.active_terms = tuple(name for name, w in terms.items() if w > 0)
        bags = inter_weight > 0 or swapped_weight > 0
        fields = {"image"} | ({"tokens"} if region_weight > 0 else set()) | ({"mil_weights"} if bags else set())
        fields |= {"pooled"} if koleo_weight > 0 else set()
        fields |= {"region_embedding", "prototypes"} if fused_chunk_size else {"region"} if region_weight > 0 or bags else set()
        self.student_outputs = frozenset(fields)
        fields = {"image"} | ({"region", "tokens"} if region_weight > 0 else set())
        fields |= {"region", "mil_weights"} if swapped_weight > 0 else {"mil_weights"} if inter_weight > 0 else set()
        self.teacher_outputs = frozenset(fields)

    @property
    def cross_weight(self) -> float:
        """Deprecated name of ``swapped_weight``."""
        warnings.warn("CMDLoss.cross_weight is now swapped_weight", DeprecationWarning, stacklevel=2)
        return self.swapped_weight

    @classmethod
    def from_preset(cls, name: str, **overrides) -> CMDLoss:
        """A loss with the weights of preset ``name`` ("dino", "esvit" or "cmd"); ``overrides`` win.

        Example:
            >>> CMDLoss.from_preset("esvit", out_dim=64).inter_weight
            0.0
        """
        if name not in cls.PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(cls.PRESETS)}")
        if "out_dim" not in overrides:
            raise TypeError("CMDLoss.from_preset() needs out_dim=..., e.g. from_preset('cmd', out_dim=65536)")
        return cls(**{**cls.PRESETS[name], **overrides})

    def teacher_temperature(self, epoch: int) -> float:
        """tau_t at ``epoch`` (`cmd.schedules.teacher_temperature_schedule`)."""
        return self.temperature_schedule[epoch]

    def forward(  # fmt: skip
        self, student: CrossLevelOutput | Sequence[CrossLevelOutput], teacher: CrossLevelOutput | Sequence[CrossLevelOutput],
        epoch: int | None = None, *, teacher_temp: float | None = None, update_centers: bool = True,
    ) -> CMDLossOutput:
        """The loss and its terms; then, by default, the update of both centers."""
        student, teacher, b = self._check(student, teacher)
        if (epoch is None) == (teacher_temp is None):
            raise TypeError("give exactly one of epoch (the schedule's temperature) and teacher_temp")
        tau_t = self.temperature_schedule[epoch] if teacher_temp is None else float(teacher_temp)
        tau_s = self.student_temp
        g, v, k = self.n_global_crops, self.n_crops, self.out_dim
        n_pairs, dev = g * (v - 1), teacher.image.device
        terms = dict.fromkeys(TERM_NAMES, torch.full((), float("nan"), device=dev))
        bags, fused = self.inter_weight > 0 or self.swapped_weight > 0, self.fused_chunk_size is not None

        with torch.autocast(device_type=dev.type, enabled=False):  # float32 throughout
            # image level: P_g [G * B, K]; log p_v [V * B, K]; aggregated targets T_v = sum_{g != v} P_g
            probs, log_probs = self._teacher_probs(teacher.image, self.center, tau_t)
            image_index = target_index(torch.zeros(v, b, 1, g, dtype=torch.long, device=dev), 0, b, 1)
            if bags:  # the bag terms need log p itself
                log_p = torch.log_softmax(torch.cat(list(map(attrgetter("image"), student))).float() / tau_s, dim=-1)
                image_target = aggregate_targets(probs, *image_index)
                terms["image"] = -(image_target * log_p).sum() / (b * n_pairs)
                loss = self.image_weight * terms["image"]
            else:  # the chunked kernel with N = 1 token per crop-image, one call per student group
                loss, image_sum, first = 0.0, 0.0, 0
                for o in student:
                    rows = o.image.shape[0]
                    part = region_cross_entropy(o.image.unsqueeze(1), probs, image_index[0][first : first + rows],
                                                image_index[1][first : first + rows], tau_s,
                                                ce_weight=self.image_weight / (b * n_pairs))
                    loss, image_sum, first = loss + part.loss, image_sum + part.cross_entropy, first + rows
                terms["image"] = image_sum / (b * n_pairs)
            with torch.no_grad():
                terms["teacher_entropy"] = -(probs * log_probs).sum(-1).mean()
                terms["teacher_student_kl"] = (terms["image"].detach() - terms["teacher_entropy"]).clamp_min(0.0)
                total = dist.all_reduce_sum(torch.cat([probs.sum(0), probs.new_full((1,), probs.shape[0])]))
                mean = total[:-1] / total[-1]
                terms["teacher_batch_entropy"] = -_xlogx(mean).sum()

            # teacher regions: Q [G * B * N_t, K] and bags beta_g [G * B, K]
            region_probs = beta = None
            if teacher.region is not None and (self.region_weight > 0 or self.swapped_weight > 0):
                n_t = teacher.region.shape[1]
                # no [M, K] log-probabilities: only their entropy is needed
                region_probs, region_entropy = self._teacher_probs_entropy(teacher.region.reshape(-1, k), tau_t)
                with torch.no_grad():
                    terms["teacher_region_entropy"] = region_entropy.mean()
                    if teacher.mil_weights is not None:
                        w_t = normalise_weights(teacher.mil_weights).unsqueeze(1)
                        beta = torch.bmm(w_t, region_probs.view(g * b, n_t, k)).squeeze(1)
                        kl_t = (_xlogx(beta) - beta * log_probs).sum(-1)
                        terms["inter_level_teacher"] = kl_t.mean()

            # region level and student bags, one student group at a time
            chunked = self.region_weight > 0 and self.swapped_weight == 0  # the swapped term needs the bags
            teacher_unit = unit_teacher_tokens(teacher.tokens, b) if self.region_weight > 0 else None
            region_sum, kl_sum, log_bags, first = 0.0, 0.0, [], 0
            for o in student:
                rows, n_s = o.image.shape[0], o.num_tokens
                w = normalise_weights(o.mil_weights) if bags else None
                if self.region_weight > 0:
                    matches, finite = match_regions(o.tokens, teacher.tokens, b, teacher_unit=teacher_unit)
                    index = target_index(matches, first // b, b, n_t)
                    bad = torch.where(finite, 0.0, float("nan"))  # non-finite tokens: a NaN term, not a silent one
                if chunked:  # one chunk of crop-images at a time, the gradient formed on the way (`cmd.losses.fused`)
                    lp = log_p[first : first + rows] if bags else None
                    source = (o.region_embedding, o.prototypes) if fused else (o.region,)
                    chunk_rows = {"chunk_rows": self.fused_chunk_size} if fused else {}
                    part = (fused_prototype_cross_entropy if fused else region_cross_entropy)(
                        *source, region_probs, *index, tau_s, weights=w, image_log_probs=lp,
                        ce_weight=self.region_weight / (b * n_s * n_pairs), kl_weight=self.inter_weight / (v * b), **chunk_rows,
                    )  # fmt: skip
                    loss = loss + part.loss + bad
                    region_sum, kl_sum = region_sum + part.cross_entropy / (b * n_s) + bad, kl_sum + part.kl
                elif self.region_weight > 0 or bags:
                    log_q = torch.log_softmax(o.region.float() / tau_s, dim=-1)
                    if self.region_weight > 0:
                        target = aggregate_targets(region_probs, *index).view_as(log_q)
                        region_sum = region_sum + -(target * log_q).sum() / (b * n_s) + bad
                    if bags:
                        log_bags.append(bag_log_prob(log_q, w))
                first += rows
            if self.region_weight > 0:
                terms["region"] = region_sum / n_pairs
            if bags and chunked:
                terms["inter_level"] = kl_sum / (v * b)
            elif bags:
                log_b = torch.cat(log_bags)  # [V * B, K]
                terms["inter_level"] = kl_rows(log_b, log_p).mean()
            if not chunked:  # the chunked path added its weighted terms to the loss already
                loss = loss + self.region_weight * terms["region"] if self.region_weight > 0 else loss
                loss = loss + self.inter_weight * terms["inter_level"] if self.inter_weight > 0 else loss
            if self.swapped_weight > 0:
                bag_target = aggregate_targets(beta, *image_index)  # sum_{g != v} beta_g
                h = -(image_target * log_b).sum() - (bag_target * log_p).sum()
                terms["swapped"] = 0.5 * h / (b * n_pairs)
                loss = loss + self.swapped_weight * terms["swapped"]
            if self.koleo_weight > 0:
                pooled = student[0].pooled[: g * b].unflatten(0, (g, b))
                terms["koleo"] = sum(koleo(x) for x in pooled) / g
                loss = loss + self.koleo_weight * terms["koleo"]

        if update_centers:
            self.update_centers(teacher)
        for name in TERM_NAMES:
            terms[name] = terms[name].detach()
        return CMDLossOutput(loss=loss, terms=_Terms(terms))

    def _teacher_probs(self, logits: torch.Tensor, center: Center, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher ``(P, log P)`` [R, K] float32 by centering or Sinkhorn-Knopp (log P finite: >= log tiny)."""
        if self.centering == "sinkhorn":
            probs = sinkhorn_knopp(logits, tau, self.sinkhorn_iterations)
            return probs, probs.clamp_min(_TINY).log()
        return center.softmax(logits, tau)

    def _teacher_probs_entropy(self, logits: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher region ``(Q [R, K], H(Q) [R])`` float32 by centering (``region_center``) or Sinkhorn-Knopp."""
        if self.centering == "sinkhorn":
            probs = sinkhorn_knopp(logits, tau, self.sinkhorn_iterations)
            return probs, -_xlogx(probs).sum(-1)
        return self.region_center.softmax_entropy(logits, tau)

    def accumulate_centers(self, teacher: Teacher) -> None:
        """Add the teacher's image (and region) logits to the running sums (no sync); a tensor is image logits."""
        self.update_centers(teacher, apply=False)

    def update_centers(self, teacher: Teacher | None = None, *, apply: bool = True) -> None:
        """Accumulate ``teacher`` (if given), then apply the pending update of both centers (a collective).

        With gradient accumulation: ``forward(..., update_centers=False)`` and ``accumulate_centers``
        per micro-batch, ``update_centers()`` once per step. With ``centering="sinkhorn"`` the centers
        are not used and nothing happens.
        """
        if self.centering == "sinkhorn":
            return
        for o in [teacher] if isinstance(teacher, (CrossLevelOutput, torch.Tensor)) else teacher or []:
            self.center.accumulate(o.image if isinstance(o, CrossLevelOutput) else o)
            if getattr(o, "region", None) is not None:
                self.region_center.accumulate(o.region)
        if not apply:
            return
        self.center.update()
        self.region_center.update()

    def _check(self, student, teacher) -> tuple[list[CrossLevelOutput], CrossLevelOutput, int]:
        """Normalise and check the inputs: ``(student groups, the teacher output, B)`` (ValueError naming the tensor)."""
        if isinstance(teacher, Sequence) and len(teacher) == 1:
            teacher = teacher[0]
        if not isinstance(teacher, CrossLevelOutput):
            raise TypeError("teacher must be one CrossLevelOutput of the G global crops (or a sequence of one); "
                            f"got {type(teacher).__name__}{f' of {len(teacher)}' if isinstance(teacher, Sequence) else ''}")
        student = [student] if isinstance(student, CrossLevelOutput) else student
        if not (isinstance(student, Sequence) and student and isinstance(student[0], CrossLevelOutput)):
            raise TypeError(f"student must be a CrossLevelOutput or a non-empty sequence of them; got {type(student).__name__}")
        g, v, k = self.n_global_crops, self.n_crops, self.out_dim
        rows_t = _check_shape("teacher.image", teacher.image, (None, k), f"([{g} crops x images, out_dim={k}])")[0]
        if rows_t == 0 or rows_t % g:
            raise ValueError(f"teacher outputs must hold {g} global crops x B images (crop-major), a positive "
                             f"multiple of {g} rows; got {rows_t} rows")
        b = rows_t // g
        rows = []
        for i, o in enumerate(student):
            if not isinstance(o, CrossLevelOutput):
                raise TypeError(f"student[{i}] must be a CrossLevelOutput; got {type(o).__name__}")
            rows.append(_check_shape(f"student[{i}].image", o.image, (None, k), "")[0])
        if sum(rows) != v * b or min(rows) == 0 or sum(map(b.__rmod__, rows)):
            raise ValueError(f"student outputs must hold {v} crops x B={b} images = {v * b} rows (B from the teacher's "
                             f"{rows_t} rows / {g} global crops), each group whole crops; got {sum(rows)} rows in {rows}")
        if rows[0] < g * b:
            raise ValueError(f"the first student group must start with the {g} global crops ({g * b} rows); it has "
                             f"{rows[0]} rows (global crops split across groups are not supported)")
        d = teacher.tokens.shape[-1] if teacher.tokens is not None and teacher.tokens.dim() == 3 else None
        need_t = self.teacher_outputs - ({"mil_weights"} if self.swapped_weight == 0 else set())
        need_t |= {"mil_weights"} if teacher.mil_weights is not None and teacher.region is not None else set()
        for i, o in enumerate([teacher, *student]):
            name, need = ("teacher", need_t) if i == 0 else (f"student[{i - 1}]", self.student_outputs)
            r, n = o.image.shape[0], o.num_tokens
            e = o.region_embedding.shape[-1] if o.region_embedding is not None else None
            shapes = {"region": ((r, n, k), f"([{r // b} crops x {b} images, tokens, out_dim={k}])"),
                      "tokens": ((r, n, d), f"([{r}, tokens, dim={d}])"), "mil_weights": ((r, n), f"([{r}, tokens])"),
                      "region_embedding": ((r, n, None), f"([{r}, tokens, bottleneck])"), "pooled": ((r, None), ""),
                      "image": ((r, k), ""), "prototypes": ((k, e), f"([out_dim={k}, bottleneck={e}])")}  # fmt: skip
            for f in sorted(need):
                if getattr(o, f) is None:
                    raise ValueError(f"{name}.{f} is None, but {_WHY[f]} needs it")
                _check_shape(f"{name}.{f}", getattr(o, f), *shapes[f])
                if self.validate and not bool(torch.isfinite(getattr(o, f)).all()):
                    bad = int((~torch.isfinite(getattr(o, f))).sum())
                    raise ValueError(f"{name}.{f} holds {bad} non-finite values (NaN or inf)")
            if self.validate and "mil_weights" in need:
                w = o.mil_weights.float()
                if bool((w < 0).any()) or not bool(torch.allclose(w.sum(-1), torch.ones_like(w[:, 0]), atol=1e-3)):
                    raise ValueError(f"{name}.mil_weights rows must sum to 1 with no negative weight (multi-instance weights)")
        return list(student), teacher, b

    def extra_repr(self) -> str:
        return (f"out_dim={self.out_dim}, crops={self.n_global_crops}+{self.n_local_crops}, centering={self.centering}, "
                f"terms={self.active_terms}, fused_chunk_size={self.fused_chunk_size}")


def _xlogx(x: torch.Tensor) -> torch.Tensor:
    """``x log x`` with ``0 log 0 = 0`` for probabilities (vectorised; ``torch.special.xlogy`` is several times slower on CPUs)."""
    return x * x.clamp_min(_TINY).log()


def _check_shape(name: str, tensor: object, expected: Sequence[int | None], meaning: str) -> torch.Size:
    """The shape of ``tensor``, a floating tensor of shape ``expected`` (None: any size there); else an error naming it."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {meaning}; got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor; got dtype {tensor.dtype}")
    bad = tensor.dim() != len(expected)
    for size, e in zip(tensor.shape, expected):
        bad = bad or (e is not None and size != e)
    if bad:
        want = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
        raise ValueError(f"{name} must have shape {want} {meaning}; got {list(tensor.shape)}")
    return tensor.shape


def _load_legacy_centers(module, state_dict, prefix, *args) -> None:
    """Checkpoints of the former layout hold the centers as ``center`` / ``region_center`` tensors."""
    for name in ("center", "region_center"):
        if prefix + name in state_dict:
            state_dict[f"{prefix}{name}.value"] = state_dict.pop(prefix + name)
