"""Straightforward per-pair reference implementations of the losses, in float64, for the tests.

Written from the equations of method.md sections 2-3 (and DINO's / EsViT's per-pair loops), with
explicit Python loops over the teacher/student pairs, images and tokens, and no code of `cmd.losses`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from cmd.heads.output import CrossLevelOutput


def reference_teacher_temp(epoch: int, warmup: float = 0.04, final: float = 0.07, warmup_epochs: int = 30,
                           n_epochs: int = 100) -> float:
    """DINO's table, extended with the final value past ``n_epochs``."""
    table = np.concatenate((np.linspace(warmup, final, warmup_epochs), np.ones(max(n_epochs - warmup_epochs, 0)) * final))
    return float(table[epoch]) if epoch < len(table) else float(final)


def crops_of(outputs: list[CrossLevelOutput], batch: int, field: str) -> list[torch.Tensor]:
    """Split groups of crop-major tensors into a list of per-crop float64 tensors."""
    crops = []
    for o in outputs:
        t = getattr(o, field)
        if t is None:
            crops.extend([None] * (o.image.shape[0] // batch))
            continue
        crops.extend(c.detach().double() for c in t.split(batch, dim=0))
    return crops


def cross_entropy(p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """H(p, q) per row."""
    return -(p * log_q).sum(-1)


def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row from probabilities (0 log 0 = 0)."""
    ratio = torch.where(p > 0, p / q, torch.ones_like(p))
    return (p * ratio.log()).sum(-1)


class ReferenceCMD:
    """Per-pair loops of I, R, S, T, X with DINO/EsViT-style centers, all in float64.

    Call with float64 (or any) outputs; gradients flow to the student tensors passed in when they
    require grad (the reference keeps them in float64 by converting *before* the call).
    """

    def __init__(self, out_dim, n_global=2, n_crops=10, *, image_weight=0.5, region_weight=0.5, inter_weight=0.1,
                 swapped_weight=0.0, student_temp=0.1, center_momentum=0.9, warmup=0.04, final=0.07,
                 warmup_epochs=30, n_epochs=100):
        self.center = torch.zeros(1, out_dim, dtype=torch.float64)
        self.region_center = torch.zeros(1, out_dim, dtype=torch.float64)
        self.G, self.V = n_global, n_crops
        self.w = dict(I=image_weight, R=region_weight, S=inter_weight, X=swapped_weight)
        self.ts, self.m = student_temp, center_momentum
        self.sched = (warmup, final, warmup_epochs, n_epochs)

    def __call__(self, student: list[CrossLevelOutput], teacher: list[CrossLevelOutput], epoch: int):
        G, V = self.G, self.V
        B = sum(o.image.shape[0] for o in teacher) // G
        temp = reference_teacher_temp(epoch, *self.sched)
        # student tensors keep their graph (converted to float64 by the caller if needed)
        s_img = [c for o in student for c in o.image.split(B)]
        s_reg = [c for o in student for c in (o.region.split(B) if o.region is not None else [None] * (o.image.shape[0] // B))]
        s_fea = crops_of(student, B, "tokens")
        s_w = [c for o in student for c in (o.mil_weights.split(B) if o.mil_weights is not None else [None] * (o.image.shape[0] // B))]
        t_img = torch.cat([o.image for o in teacher]).detach().double()
        P = F.softmax((t_img - self.center) / temp, dim=-1).split(B)
        has_region = all(o.region is not None for o in teacher)
        if has_region:
            t_reg_all = [o.region.detach().double() for o in teacher]
            Q = [c for r in t_reg_all for c in F.softmax((r - self.region_center) / temp, dim=-1).split(B)]
            t_fea = crops_of(teacher, B, "tokens")
            t_w = crops_of(teacher, B, "mil_weights")
        log_p = [F.log_softmax(x.double() / self.ts, dim=-1) for x in s_img]

        terms = {k: 0.0 for k in ("image", "region", "swapped")}
        n_pairs = 0
        for g in range(G):
            for v in range(V):
                if v == g:
                    continue
                n_pairs += 1
                terms["image"] = terms["image"] + cross_entropy(P[g], log_p[v]).mean()
                if self.w["R"] > 0:
                    log_q = F.log_softmax(s_reg[v].double() / self.ts, dim=-1)  # [B, N_v, K]
                    per_image = []
                    for b in range(B):
                        fs = F.normalize(s_fea[v][b], dim=-1)
                        ft = F.normalize(t_fea[g][b], dim=-1)
                        tokens = []
                        for j in range(fs.shape[0]):
                            sims = torch.stack([torch.dot(fs[j], ft[i]) for i in range(ft.shape[0])])
                            m = int(torch.argmax(sims))
                            tokens.append(cross_entropy(Q[g][b, m], log_q[b, j]))
                        per_image.append(torch.stack(tokens).mean())
                    terms["region"] = terms["region"] + torch.stack(per_image).mean()
                if self.w["X"] > 0:
                    bag_v = self.student_bag(s_reg[v], s_w[v])
                    beta_g = (t_w[g].unsqueeze(-1) * Q[g]).sum(1)
                    x = 0.5 * (cross_entropy(P[g], bag_v.log()) + cross_entropy(beta_g, log_p[v]))
                    terms["swapped"] = terms["swapped"] + x.mean()
        for k in ("image", "region", "swapped"):
            terms[k] = terms[k] / n_pairs
        if self.w["S"] > 0:
            terms["inter_level"] = torch.stack(
                [kl(self.student_bag(s_reg[v], s_w[v]), log_p[v].exp()).mean() for v in range(V)]
            ).mean()
        else:
            terms["inter_level"] = 0.0
        if has_region and t_w[0] is not None:
            terms["inter_level_teacher"] = torch.stack(
                [kl((t_w[g].unsqueeze(-1) * Q[g]).sum(1), P[g]).mean() for g in range(G)]
            ).mean()
        terms["teacher_entropy"] = torch.stack([-(P[g] * P[g].log()).sum(-1).mean() for g in range(G)]).mean()
        mean_p = torch.cat(P).mean(0)
        terms["teacher_batch_entropy"] = -(mean_p * mean_p.log()).sum()
        if has_region:
            q_all = torch.cat([q.reshape(-1, q.shape[-1]) for q in Q])
            terms["teacher_region_entropy"] = -torch.special.xlogy(q_all, q_all).sum(-1).mean()
        terms["teacher_student_kl"] = torch.stack(
            [kl(P[g], log_p[v].exp()).mean() for g in range(G) for v in range(V) if v != g]
        ).mean()
        loss = (self.w["I"] * terms["image"] + self.w["R"] * terms["region"] + self.w["X"] * terms["swapped"]
                + self.w["S"] * terms["inter_level"])
        # centers, after the loss: mean over all teacher rows (image) and all tokens (region)
        self.center = self.center * self.m + t_img.mean(0, keepdim=True) * (1 - self.m)
        if has_region:
            flat = torch.cat([r.reshape(-1, r.shape[-1]) for r in t_reg_all])
            self.region_center = self.region_center * self.m + flat.mean(0, keepdim=True) * (1 - self.m)
        return loss, terms

    def student_bag(self, region: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """b_v = sum_j w_j softmax(r_j / tau_s), in probability space, [B, K]."""
        q = F.softmax(region.double() / self.ts, dim=-1)
        return (weights.double().unsqueeze(-1) * q).sum(1)


def reference_dino(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, n_crops: int, epoch: int,
                   *, n_global: int = 2, student_temp: float = 0.1, momentum: float = 0.9, **sched):
    """DINO's per-pair loop (float64); returns (loss, new center)."""
    temp = reference_teacher_temp(epoch, **sched)
    s = (student.double() / student_temp).chunk(n_crops)
    t = F.softmax((teacher.detach().double() - center) / temp, dim=-1).chunk(n_global)
    total, n = 0.0, 0
    for iq, q in enumerate(t):
        for v in range(len(s)):
            if v == iq:
                continue
            total = total + torch.sum(-q * F.log_softmax(s[v], dim=-1), dim=-1).mean()
            n += 1
    new_center = center * momentum + teacher.detach().double().mean(0, keepdim=True) * (1 - momentum)
    return total / n, new_center


def make_outputs(crops: list[int], batch: int, tokens: list[int], out_dim: int, dim: int, *, generator=None,
                 scale: float = 1.0, zero_weights: bool = False, region: bool = True, dtype=torch.float32,
                 requires_grad: bool = False) -> list[CrossLevelOutput]:
    """Random `CrossLevelOutput` groups: crops[i] crops of tokens[i] tokens each, for ``batch`` images."""
    outs = []
    for c, n in zip(crops, tokens):
        rows = c * batch
        image = torch.randn(rows, out_dim, generator=generator) * scale
        if not region:
            outs.append(CrossLevelOutput(image.to(dtype).requires_grad_(requires_grad)))
            continue
        reg = torch.randn(rows, n, out_dim, generator=generator) * scale
        fea = torch.randn(rows, n, dim, generator=generator)
        logits = torch.randn(rows, n, generator=generator)
        if zero_weights and n > 1:
            logits[:, ::2] = -float("inf")  # every other instance gets weight exactly 0
        w = torch.softmax(logits, dim=-1)
        outs.append(CrossLevelOutput(*(x.to(dtype).requires_grad_(requires_grad) for x in (image, reg, fea, w))))
    return outs


def as_float64(outputs: list[CrossLevelOutput], requires_grad: bool = False) -> list[CrossLevelOutput]:
    """Detached float64 copies (leaves) of every tensor."""
    def conv(t):
        return None if t is None else t.detach().double().requires_grad_(requires_grad)
    return [CrossLevelOutput(conv(o.image), conv(o.region), conv(o.tokens), conv(o.mil_weights)) for o in outputs]
