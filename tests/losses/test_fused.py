"""The chunked region terms (cross-entropy + bag, the gradient formed in the forward pass; logits given or the
prototype layer fused) against a straightforward autograd reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cmd.heads import CrossLevelHead
from cmd.heads.output import CrossLevelOutput
from cmd.losses import CMDLoss
from cmd.losses.functional import target_index
from cmd.losses.fused import fused_prototype_cross_entropy, region_cross_entropy


def _plain_terms(z, protos, teacher_probs, index, valid, tau, weights, image_log_probs):
    """Straightforward reference: full logits, explicit target sums, per-row loop for the bags."""
    r, n, d = z.shape
    log_q = torch.log_softmax(z.reshape(r * n, d) @ protos.T / tau, dim=-1)
    target = torch.zeros_like(log_q)
    for g in range(index.shape[1]):
        target = target + valid[:, g : g + 1] * teacher_probs[index[:, g]]
    ce = -(target * log_q).sum()
    kl = torch.zeros(())
    for row in range(r):
        b = (weights[row].unsqueeze(-1) * log_q.view(r, n, -1)[row].exp()).sum(0)
        kl = kl + (b * (b.log() - image_log_probs[row])).sum()
    return ce, kl


def _inputs(r=5, n=3, d=8, k=32, m=7, g=2, seed=0, zero_weight=False):
    gen = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(r, n, d, generator=gen), dim=-1, eps=1e-6).requires_grad_()
    protos = torch.randn(k, d, generator=gen).requires_grad_()
    teacher_probs = torch.softmax(3 * torch.randn(m, k, generator=gen), -1)
    index = torch.randint(0, m, (r * n, g), generator=gen)
    valid = (torch.rand(r * n, g, generator=gen) > 0.3).float()
    w = torch.softmax(torch.randn(r, n, generator=gen), -1)
    if zero_weight:
        w = w.clone()
        w[0, 0] = 0.0
        w = w / w.sum(-1, keepdim=True)
    weights = w.requires_grad_()
    image_log_probs = torch.log_softmax(torch.randn(r, k, generator=gen), -1).requires_grad_()
    return z, protos, teacher_probs, index, valid, weights, image_log_probs


def _run(source, z, protos, tp, index, valid, tau, **kw):
    """The chunked terms with the prototype layer fused ("fused") or of the given logits ("logits")."""
    if source == "fused":
        return fused_prototype_cross_entropy(z, protos, tp, index, valid, tau, **kw)
    return region_cross_entropy(z @ protos.T, tp, index, valid, tau, **kw)


@pytest.mark.parametrize("source", ["fused", "logits"])
@pytest.mark.parametrize("chunk_rows", [1, 2, 5, 64])
@pytest.mark.parametrize("zero_weight", [False, True])
def test_chunked_terms_match_plain_values_and_gradients(source, chunk_rows, zero_weight):
    z, protos, tp, index, valid, w, lp = _inputs(zero_weight=zero_weight)
    out = _run(source, z, protos, tp, index, valid, 0.1, weights=w, image_log_probs=lp, chunk_rows=chunk_rows,
               ce_weight=0.7, kl_weight=1.3)
    ce_ref, kl_ref = _plain_terms(z, protos, tp, index, valid, 0.1, w, lp)
    torch.testing.assert_close(out.cross_entropy, ce_ref.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.kl, kl_ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, (0.7 * ce_ref + 1.3 * kl_ref).detach(), rtol=1e-5, atol=1e-4)
    assert not out.cross_entropy.requires_grad and not out.kl.requires_grad
    grads = torch.autograd.grad(3.0 * out.loss, (z, protos, w, lp))  # the incoming gradient scales the stored ones
    inputs = [t.detach().double().requires_grad_() for t in (z, protos, w, lp)]  # the reference in float64
    ce64, kl64 = _plain_terms(inputs[0], inputs[1], tp.double(), index, valid.double(), 0.1, inputs[2], inputs[3])
    grads_ref = torch.autograd.grad(3.0 * (0.7 * ce64 + 1.3 * kl64), inputs)
    for name, a, b in zip(("embedding", "prototypes", "weights", "image_log_probs"), grads, grads_ref):
        # float32 sums of large terms: an error relative to the gradient's scale (as float32 autograd's own)
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=2e-6 * float(b.abs().max()), msg=f"gradient of {name}")


@pytest.mark.parametrize("source", ["fused", "logits"])
def test_chunked_terms_without_bags(source):
    z, protos, tp, index, valid, *_ = _inputs(seed=1)
    out = _run(source, z, protos, tp, index, valid, 0.2, chunk_rows=2)
    assert float(out.kl) == 0.0
    ce_ref = -(
        (valid.unsqueeze(-1) * tp[index]).sum(1) * torch.log_softmax(z.reshape(15, 8) @ protos.T / 0.2, -1)
    ).sum()
    torch.testing.assert_close(out.cross_entropy, ce_ref.detach(), rtol=1e-5, atol=1e-4)
    (gz,) = torch.autograd.grad(out.loss, z)
    (gz_ref,) = torch.autograd.grad(ce_ref, z)
    torch.testing.assert_close(gz, gz_ref, rtol=1e-4, atol=1e-5)


def test_chunked_terms_hand_out_gradients_once_and_skip_them_without_grad():
    z, protos, tp, index, valid, w, lp = _inputs(seed=3)
    x = (z @ protos.T).detach().requires_grad_()
    out = region_cross_entropy(x, tp, index, valid, 0.1, weights=w, image_log_probs=lp)
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        out.loss.backward()
    with torch.no_grad():
        again = region_cross_entropy(x, tp, index, valid, 0.1, weights=w, image_log_probs=lp)
    assert not again.loss.requires_grad
    torch.testing.assert_close(again.loss, out.loss.detach())


@pytest.mark.parametrize("source", ["fused", "logits"])
def test_chunked_terms_are_finite_for_large_logits_and_bf16_inputs(source):
    z, protos, tp, index, valid, w, lp = _inputs(seed=2)
    big = (protos.detach() * 1e3).requires_grad_()  # logits of magnitude ~1e4 at tau 0.1
    z16 = z.detach().to(torch.bfloat16).requires_grad_()
    if source == "fused":
        out = fused_prototype_cross_entropy(z16, big, tp, index, valid, 0.1, weights=w, image_log_probs=lp, chunk_rows=2)
        grads = torch.autograd.grad(out.loss, (z16, big, w))
        assert grads[0].dtype == torch.bfloat16
    else:
        x16 = (z16 @ big.to(torch.bfloat16).T).detach().requires_grad_()
        out = region_cross_entropy(x16, tp, index, valid, 0.1, weights=w, image_log_probs=lp, chunk_rows=2)
        grads = torch.autograd.grad(out.loss, (x16, w))
        assert grads[0].dtype == torch.bfloat16
    assert torch.isfinite(out.cross_entropy) and torch.isfinite(out.kl) and torch.isfinite(out.loss)
    assert all(torch.isfinite(g.float()).all() for g in grads)


def test_target_index_drops_own_view_only():
    c, b, n, g, n_t = 3, 2, 2, 2, 4
    matches = torch.randint(0, n_t, (c, b, n, g))
    index, valid = target_index(matches, 0, b, n_t)
    assert index.shape == valid.shape == (c * b * n, g)
    v = valid.view(c, b, n, g)
    for crop in range(c):
        for teacher in range(g):
            assert bool((v[crop, ..., teacher] == float(crop != teacher)).all())
    i = index.view(c, b, n, g)
    assert int(i[2, 1, 0, 1]) == (1 * b + 1) * n_t + int(matches[2, 1, 0, 1])


def test_chunked_terms_errors_name_the_argument():
    z, protos, tp, index, valid, w, lp = _inputs()
    with pytest.raises(ValueError, match=r"logits must be \[R, N, K = 32\]"):
        region_cross_entropy(z, tp, index, valid, 0.1)
    with pytest.raises(ValueError, match=r"target_index and target_valid must be \[R \* N = 15, G\]"):
        region_cross_entropy(z @ protos.T, tp, index[:-1], valid[:-1], 0.1)
    with pytest.raises(ValueError, match=r"weights must be \[R, N\]"):
        region_cross_entropy(z @ protos.T, tp, index, valid, 0.1, weights=w[:, :2], image_log_probs=lp)
    with pytest.raises(ValueError, match=r"prototypes \[K, d\]"):
        fused_prototype_cross_entropy(z, protos[:, :4], tp, index, valid, 0.1)
    with pytest.raises(ValueError, match="go together"):
        fused_prototype_cross_entropy(z, protos, tp, index, valid, 0.1, weights=w)
    with pytest.raises(ValueError, match="chunk_rows"):
        fused_prototype_cross_entropy(z, protos, tp, index, valid, 0.1, chunk_rows=0)


# ----------------------------------------------------------------------------- CMDLoss: fused against plain
def _head_outputs(head, token_groups, tokens_per_group, gen):
    outs = []
    for rows, n in zip(token_groups, tokens_per_group):
        tokens = torch.randn(rows, n, head.in_dim, generator=gen)
        outs.append(head(tokens, pooled=tokens.mean(1)))
    return outs


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_cmd_loss_fused_equals_plain_loss_values_and_gradients(chunk):
    torch.manual_seed(0)
    b, k, d = 3, 24, 10
    plain_head = CrossLevelHead(d, out_dim=k, hidden_dim=16, bottleneck_dim=6)
    fused_head = CrossLevelHead(d, out_dim=k, hidden_dim=16, bottleneck_dim=6, region_output="embedding")
    fused_head.load_state_dict(plain_head.state_dict())
    gen = torch.Generator().manual_seed(1)
    student_tokens = [torch.randn(2 * b, 4, d, generator=gen), torch.randn(3 * b, 2, d, generator=gen)]
    teacher_tokens = torch.randn(2 * b, 4, d, generator=gen)
    with torch.no_grad():
        teacher = [plain_head(teacher_tokens * 0.5, pooled=teacher_tokens.mean(1))]
    results = {}
    for name, head in (("plain", plain_head), ("fused", fused_head)):
        loss_fn = CMDLoss.from_preset("cmd", out_dim=k, n_local_crops=3, fused_chunk_size=chunk if name == "fused" else None)
        student = [head(t, pooled=t.mean(1)) for t in student_tokens]
        assert (student[0].prototypes is not None) == (name == "fused")
        out = loss_fn(student, teacher, epoch=3)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in head.named_parameters() if p.grad is not None}
        results[name] = (out, grads, loss_fn.region_center.value.clone())
    (p_out, p_grads, p_center), (f_out, f_grads, f_center) = results["plain"], results["fused"]
    torch.testing.assert_close(f_out.loss, p_out.loss, rtol=1e-5, atol=1e-6)
    for term in ("image", "region", "inter_level", "inter_level_teacher", "teacher_entropy", "teacher_region_entropy"):
        torch.testing.assert_close(f_out.terms[term], p_out.terms[term], rtol=1e-5, atol=1e-6, msg=term)
    assert set(f_grads) == set(p_grads) and any("pooling" in n for n in f_grads)
    for n in p_grads:
        torch.testing.assert_close(f_grads[n], p_grads[n], rtol=1e-4, atol=1e-6, msg=f"gradient of {n}")
    torch.testing.assert_close(f_center, p_center)


def test_embedding_head_output_reproduces_region_logits():
    head = CrossLevelHead(8, out_dim=12, hidden_dim=16, bottleneck_dim=4)
    tokens = torch.randn(2, 3, 8)
    logits = head(tokens, pooled=tokens.mean(1)).region
    out = head(tokens, pooled=tokens.mean(1), outputs={"image", "region_embedding", "prototypes"})
    assert out.region is None and out.region_embedding.shape == (2, 3, 4) and out.num_tokens == 3
    assert out.mil_weights is None and out.prototypes.shape == (12, 4)
    torch.testing.assert_close(out.region_embedding @ head.region_head.prototypes.T, logits, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="region_output"):
        CrossLevelHead(8, out_dim=12, region_output="probs")


def test_cmd_loss_fused_errors():
    with pytest.raises(ValueError, match="swapped_weight"):
        CMDLoss(8, n_global_crops=2, n_local_crops=1, swapped_weight=0.5, fused_chunk_size=4)
    with pytest.raises(ValueError, match="fused_chunk_size"):
        CMDLoss(8, n_global_crops=2, n_local_crops=1, fused_chunk_size=0)
    loss_fn = CMDLoss(8, n_global_crops=2, n_local_crops=1, fused_chunk_size=4)
    assert loss_fn.student_outputs == {"image", "tokens", "mil_weights", "region_embedding", "prototypes"}
    s = [CrossLevelOutput(torch.randn(3, 8), None, torch.randn(3, 2, 5), torch.full((3, 2), 0.5), torch.randn(3, 2, 4))]
    t = [CrossLevelOutput(torch.randn(2, 8), torch.randn(2, 2, 8), torch.randn(2, 2, 5), torch.full((2, 2), 0.5))]
    with pytest.raises(ValueError, match=r"student\[0\]\.prototypes is None, but the fused region path"):
        loss_fn(s, t, epoch=0)
    s[0].prototypes = torch.randn(8, 4)
    assert torch.isfinite(loss_fn(s, t, epoch=0).loss)
    s[0].prototypes = torch.randn(8, 3)
    with pytest.raises(ValueError, match=r"student\[0\]\.prototypes must have shape \[8, 4\]"):
        loss_fn(s, t, epoch=0)
    s[0].prototypes = torch.full((8, 4), float("nan"))
    validating = CMDLoss(8, n_global_crops=2, n_local_crops=1, fused_chunk_size=4, validate=True)
    with pytest.raises(ValueError, match=r"student\[0\]\.prototypes holds 32 non-finite"):
        validating(s, t, epoch=0)


@pytest.mark.parametrize("source", ["fused", "logits"])
def test_chunked_terms_with_one_weight_zero(source):
    z, protos, tp, index, valid, w, lp = _inputs(seed=4)
    ce_ref, kl_ref = _plain_terms(z, protos, tp, index, valid, 0.1, w, lp)
    for ce_weight, kl_weight, ref in ((0.0, 1.0, kl_ref), (1.0, 0.0, ce_ref)):
        out = _run(source, z, protos, tp, index, valid, 0.1, weights=w, image_log_probs=lp,
                   ce_weight=ce_weight, kl_weight=kl_weight, chunk_rows=2)
        torch.testing.assert_close(out.cross_entropy, ce_ref.detach(), rtol=1e-5, atol=1e-4)  # both sums, always
        torch.testing.assert_close(out.kl, kl_ref.detach(), rtol=1e-5, atol=1e-5)
        grads = torch.autograd.grad(out.loss, (z, w), allow_unused=True)
        grads_ref = torch.autograd.grad(ref, (z, w), retain_graph=True, allow_unused=True)
        for a, b in zip(grads, grads_ref):
            b = torch.zeros_like(a) if b is None else b
            torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-6 * float(b.abs().max()) + 1e-7)


def test_chunked_terms_with_frozen_logits_give_the_bag_gradients():
    z, protos, tp, index, valid, w, lp = _inputs(seed=5)
    x = (z @ protos.T).detach()  # a frozen head: only the MIL weights and the image log-probs learn
    out = region_cross_entropy(x, tp, index, valid, 0.1, weights=w, image_log_probs=lp, kl_weight=1.3)
    grads = torch.autograd.grad(out.loss, (w, lp))
    ce_ref, kl_ref = _plain_terms(x.reshape(5, 3, 32), torch.eye(32), tp, index, valid, 0.1, w, lp)
    grads_ref = torch.autograd.grad(1.3 * kl_ref + ce_ref.detach(), (w, lp))
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-6 * float(b.abs().max()))
