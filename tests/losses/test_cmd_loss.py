"""CMDLoss: presets against per-pair reference loops, every term, gradients, stop-gradients, errors."""

from __future__ import annotations

import math

import pytest
import torch

from cmd.heads.output import CrossLevelOutput
from cmd.losses import TERM_NAMES, CMDLoss, DINOLoss
from tests.losses.reference import ReferenceCMD, as_float64, make_outputs

PRESET_WEIGHTS = {
    "dino": dict(image_weight=1.0, region_weight=0.0, inter_weight=0.0, swapped_weight=0.0),
    "esvit": dict(image_weight=0.5, region_weight=0.5, inter_weight=0.0, swapped_weight=0.0),
    "cmd": dict(image_weight=0.5, region_weight=0.5, inter_weight=0.1, swapped_weight=0.0),
}


def _case(step, batch, groups, teacher_groups, out_dim, **kw):
    g = torch.Generator().manual_seed(100 + step)
    s = make_outputs([c for c, _ in groups], batch, [n for _, n in groups], out_dim, 6, generator=g, **kw)
    t = make_outputs([c for c, _ in teacher_groups], batch, [n for _, n in teacher_groups], out_dim, 6, generator=g,
                     scale=1.0 + step, **kw)
    return s, t


@pytest.mark.parametrize("preset", ["esvit", "cmd"])
@pytest.mark.parametrize(
    ("batch", "groups", "teacher_groups", "out_dim"),
    [(2, [(2, 4), (4, 1)], [(2, 4)], 16), (3, [(2, 3), (1, 2)], [(2, 3)], 8)],
)
def test_preset_equals_per_pair_loops_over_successive_calls_and_epochs(preset, batch, groups, teacher_groups, out_dim):
    n_crops = sum(c for c, _ in groups)
    loss_fn = CMDLoss.from_preset(preset, out_dim=out_dim, n_local_crops=n_crops - 2)
    ref = ReferenceCMD(out_dim, 2, n_crops, **PRESET_WEIGHTS[preset])
    for step, epoch in enumerate([0, 15, 29, 30, 120]):
        s, t = _case(step, batch, groups, teacher_groups, out_dim, zero_weights=step % 2 == 1)
        expected, ref_terms = ref(as_float64(s), as_float64(t), epoch)
        out = loss_fn(s, t, epoch)
        torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loss_fn.center.value.double(), ref.center, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loss_fn.region_center.value.double(), ref.region_center, rtol=1e-5, atol=1e-6)
        for name in ("image", "region", "inter_level_teacher", "teacher_entropy", "teacher_student_kl",
                     "teacher_batch_entropy", "teacher_region_entropy") + (
            ("inter_level",) if preset == "cmd" else ()
        ):
            torch.testing.assert_close(out.terms[name].double(), torch.as_tensor(ref_terms[name]).double(),
                                       rtol=1e-4, atol=1e-5, msg=f"term {name}")


def test_dino_preset_equals_dino_loss_without_region_outputs():
    batch, out_dim = 3, 32
    cmd_loss = CMDLoss.from_preset("dino", out_dim=out_dim, n_local_crops=4)
    dino_loss = DINOLoss(out_dim, n_local_crops=4)
    for step, epoch in enumerate([0, 3, 40]):
        s = make_outputs([2, 4], batch, [1, 1], out_dim, 4, region=False)
        t = make_outputs([2], batch, [1], out_dim, 4, region=False, scale=2.0 + step)
        out = cmd_loss(s, t, epoch)
        expected = dino_loss(torch.cat([o.image for o in s]), t[0].image, epoch)
        torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(cmd_loss.center.value, dino_loss.center.value)
        assert torch.all(cmd_loss.region_center.value == 0)
        for name in ("region", "inter_level", "inter_level_teacher", "swapped"):
            assert torch.isnan(out.terms[name]), name
        assert set(out.terms) == set(TERM_NAMES)


def test_cross_term_equals_reference():
    batch, out_dim, groups = 2, 8, [(2, 3), (2, 2)]
    kw = dict(image_weight=0.3, region_weight=0.2, inter_weight=0.4, swapped_weight=0.7)
    loss_fn = CMDLoss(out_dim, n_global_crops=2, n_local_crops=2, **kw)
    ref = ReferenceCMD(out_dim, 2, 4, **kw)
    for step in range(2):
        s, t = _case(step, batch, groups, [(2, 3)], out_dim, zero_weights=step == 1)
        expected, terms = ref(as_float64(s), as_float64(t), 5)
        out = loss_fn(s, t, 5)
        torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.terms["swapped"].double(), terms["swapped"], rtol=1e-5, atol=1e-6)


def test_cross_term_without_region_term_equals_reference():
    kw = dict(image_weight=0.5, region_weight=0.0, inter_weight=0.0, swapped_weight=1.0)
    s, t = _case(0, 2, [(2, 3), (1, 2)], [(2, 3)], 8)
    expected, _ = ReferenceCMD(8, 2, 3, **kw)(as_float64(s), as_float64(t), 0)
    out = CMDLoss(8, n_global_crops=2, n_local_crops=1, **kw)(s, t, 0)
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("swapped_weight", [0.0, 0.5])
def test_gradients_equal_reference_autograd(swapped_weight):
    batch, out_dim, groups = 2, 8, [(2, 3), (2, 2)]
    kw = dict(image_weight=0.5, region_weight=0.5, inter_weight=0.3, swapped_weight=swapped_weight)
    s, t = _case(0, batch, groups, [(2, 3)], out_dim, zero_weights=True)
    for o in s:
        for x in (o.image, o.region, o.mil_weights):
            x.requires_grad_()
    CMDLoss(out_dim, n_global_crops=2, n_local_crops=2, **kw)(s, t, 4).loss.backward()
    s64 = as_float64(s, requires_grad=True)
    expected, _ = ReferenceCMD(out_dim, 2, 4, **kw)(s64, as_float64(t), 4)
    expected.backward()
    for ours, theirs in zip(s, s64):
        for name in ("image", "region"):
            torch.testing.assert_close(getattr(ours, name).grad.double(), getattr(theirs, name).grad,
                                       rtol=1e-4, atol=1e-5, msg=name)
        # The loss sees the weights renormalised (w / sum w): the reference gradient projected on the simplex.
        # A weight of exactly 0 gets gradient 0 (bag_log_prob's docstring): compared where w > 0.
        ref_w = theirs.mil_weights.grad - (theirs.mil_weights * theirs.mil_weights.grad).sum(-1, keepdim=True)
        positive = theirs.mil_weights > 0
        torch.testing.assert_close(ours.mil_weights.grad.double()[positive], ref_w[positive], rtol=1e-4, atol=1e-5)
        assert torch.isfinite(ours.mil_weights.grad).all()


def test_inter_level_gradient_reaches_region_weights_and_image_but_never_the_teacher():
    s, t = _case(0, 2, [(2, 3), (2, 2)], [(2, 3)], 8, requires_grad=True)
    out = CMDLoss(8, n_global_crops=2, n_local_crops=2, image_weight=0.0, region_weight=0.0, inter_weight=1.0)(s, t, 0)
    out.loss.backward()
    for o in s:
        for name in ("image", "region", "mil_weights"):
            grad = getattr(o, name).grad
            assert grad is not None and grad.abs().sum() > 0, name
        assert o.tokens.grad is None
    for o in t:
        assert all(getattr(o, name).grad is None for name in ("image", "region", "tokens", "mil_weights"))


def test_teacher_gets_no_gradient_with_every_term_on():
    s, t = _case(0, 2, [(2, 3), (2, 2)], [(2, 3)], 8, requires_grad=True)
    out = CMDLoss(8, n_global_crops=2, n_local_crops=2, swapped_weight=0.5)(s, t, 0)
    out.loss.backward()
    for o in t:
        assert all(getattr(o, name).grad is None for name in ("image", "region", "tokens", "mil_weights"))
    assert all(not v.requires_grad for v in out.terms.values())


def test_forward_never_synchronises_with_the_host(monkeypatch):
    s, t = _case(0, 2, [(2, 3), (2, 2)], [(2, 3)], 8)
    loss_fn = CMDLoss(8, n_global_crops=2, n_local_crops=2, swapped_weight=0.5)

    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronisation inside forward")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    out = loss_fn(s, t, 0)
    monkeypatch.undo()
    assert math.isfinite(float(out.loss))


def test_terms_are_nan_only_where_not_computed():
    s, t = _case(0, 2, [(2, 3), (2, 2)], [(2, 3)], 8)
    esvit = CMDLoss.from_preset("esvit", out_dim=8, n_local_crops=2)(s, t, 0).terms
    assert torch.isnan(esvit["inter_level"]) and torch.isnan(esvit["swapped"])
    assert all(torch.isfinite(esvit[n]) for n in ("image", "region", "inter_level_teacher", "teacher_entropy"))
    no_teacher_weights = [CrossLevelOutput(o.image, o.region, o.tokens) for o in t]
    terms = CMDLoss.from_preset("cmd", out_dim=8, n_local_crops=2)(s, no_teacher_weights, 0).terms
    assert torch.isnan(terms["inter_level_teacher"]) and torch.isfinite(terms["inter_level"])


def test_from_preset_overrides_and_errors():
    loss_fn = CMDLoss.from_preset("cmd", out_dim=16, inter_weight=0.2, n_local_crops=6)
    assert (loss_fn.image_weight, loss_fn.region_weight, loss_fn.inter_weight, loss_fn.swapped_weight) == (0.5, 0.5, 0.2, 0.0)
    assert loss_fn.n_crops == 8
    with pytest.raises(ValueError, match="unknown preset 'byol'"):
        CMDLoss.from_preset("byol", out_dim=16)
    with pytest.raises(TypeError, match="out_dim"):
        CMDLoss.from_preset("cmd")
    with pytest.raises(ValueError, match="inter_weight"):
        CMDLoss(16, inter_weight=-1.0)
    assert set(loss_fn.state_dict()) == {"center.value", "region_center.value"}


def test_missing_fields_and_validate_errors_name_the_tensor():
    s, t = _case(0, 2, [(2, 3), (2, 2)], [(2, 3)], 8)
    no_weights = [CrossLevelOutput(o.image, o.region, o.tokens) for o in s]
    with pytest.raises(ValueError, match=r"student\[0\]\.mil_weights is None, but inter_weight > 0"):
        CMDLoss(8, n_global_crops=2, n_local_crops=2)(no_weights, t, 0)
    no_region = [CrossLevelOutput(o.image) for o in s]
    with pytest.raises(ValueError, match=r"student\[0\]\.region is None, but region_weight > 0"):
        CMDLoss.from_preset("esvit", out_dim=8, n_local_crops=2)(no_region, t, 0)
    bad = [CrossLevelOutput(o.image, o.region.clone(), o.tokens, o.mil_weights) for o in s]
    bad[1].region[0, 0, 0] = float("inf")
    CMDLoss(8, n_global_crops=2, n_local_crops=2)(bad, t, 0)  # not validated: no error, no synchronisation
    with pytest.raises(ValueError, match=r"student\[1\]\.region holds 1 non-finite"):
        CMDLoss(8, n_global_crops=2, n_local_crops=2, validate=True)(bad, t, 0)
    unnormalised = [CrossLevelOutput(o.image, o.region, o.tokens, o.mil_weights * 2) for o in s]
    with pytest.raises(ValueError, match=r"student\[0\]\.mil_weights rows must sum to 1"):
        CMDLoss(8, n_global_crops=2, n_local_crops=2, validate=True)(unnormalised, t, 0)
    wrong_tokens = [CrossLevelOutput(s[0].image, s[0].region, s[0].tokens, s[0].mil_weights[:, :2]), s[1]]
    with pytest.raises(ValueError, match=r"student\[0\]\.mil_weights must have shape \[4, 3\].*got \[4, 2\]"):
        CMDLoss(8, n_global_crops=2, n_local_crops=2)(wrong_tokens, t, 0)
    with pytest.raises(ValueError, match=r"teacher outputs must hold 2 global crops"):
        CMDLoss(8, n_global_crops=2, n_local_crops=2)(s, [CrossLevelOutput(o.image[:3]) for o in t], 0)


def test_gradient_accumulation_centers_and_resume():
    s1, t1 = _case(0, 2, [(2, 3), (2, 2)], [(2, 3)], 8)
    s2, t2 = _case(1, 2, [(2, 3), (2, 2)], [(2, 3)], 8)
    a = CMDLoss(8, n_global_crops=2, n_local_crops=2)
    a(s1, t1, 0, update_centers=False)
    a.accumulate_centers(t1)
    a(s2, t2, 0, update_centers=False)
    a.update_centers(t2)
    whole = [CrossLevelOutput.cat([t1[0], t2[0]])]
    b = CMDLoss(8, n_global_crops=2, n_local_crops=2)
    b.update_centers(whole)
    torch.testing.assert_close(a.center.value, b.center.value)
    torch.testing.assert_close(a.region_center.value, b.region_center.value)
    c = CMDLoss(8, n_global_crops=2, n_local_crops=2)
    c.load_state_dict(a.state_dict())
    torch.testing.assert_close(c(s1, t1, 3).loss, a(s1, t1, 3).loss)


def test_former_term_names_still_work_with_a_deprecation_warning():
    """inter_student / inter_teacher / cross and cross_weight were renamed (issue 26): old code keeps working."""
    from cmd.losses.cmd import DEPRECATED_TERM_NAMES

    with pytest.warns(DeprecationWarning, match="swapped_weight"):
        loss_fn = CMDLoss(8, n_global_crops=2, n_local_crops=2, cross_weight=0.5)
    assert loss_fn.swapped_weight == 0.5 and "swapped" in loss_fn.active_terms
    with pytest.warns(DeprecationWarning):
        assert loss_fn.cross_weight == 0.5
    s, t = _case(0, 2, [(2, 3), (2, 2)], [(2, 3)], 8)
    terms = loss_fn(s, t, 0).terms
    assert set(terms) == set(TERM_NAMES) and not set(DEPRECATED_TERM_NAMES) & set(terms)
    for old, new in DEPRECATED_TERM_NAMES.items():
        assert old in terms
        with pytest.warns(DeprecationWarning, match=new):
            torch.testing.assert_close(terms[old], terms[new], equal_nan=True)
        with pytest.warns(DeprecationWarning):
            assert terms.get(old) is terms[new]
    with pytest.raises(KeyError):
        terms["no_such_term"]
