"""cmd.eval.train_supervised / gap_closed, against a plain training loop written here."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cmd.eval import SupervisedResult, gap_closed, train_supervised


def _backbone(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def _data(n: int = 24, classes: int = 3, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    images = torch.randn(n, 3, 8, 8, generator=g) + labels.view(-1, 1, 1, 1).float()  # class = brightness
    return TensorDataset(images, labels)


def _reference_lr(step: int, steps: int, lr: float, min_lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * step / (warmup - 1) if warmup > 1 else lr
    i, n = step - warmup, steps - warmup
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * i / n))


def _reference_training(backbone, loader, classes, steps, lr, min_lr, wd, warmup, seed):
    classifier = nn.Linear(6, classes)
    with torch.no_grad():
        classifier.weight.copy_(torch.randn(classes, 6, generator=torch.Generator().manual_seed(seed)) * 0.01)
        classifier.bias.zero_()
    opt = torch.optim.AdamW([*backbone.parameters(), *classifier.parameters()], lr=lr, weight_decay=wd)
    step = 0
    while step < steps:
        for images, labels in loader:
            for group in opt.param_groups:
                group["lr"] = _reference_lr(step, steps, lr, min_lr, warmup)
            loss = F.cross_entropy(classifier(backbone(images)), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step == steps:
                return float(loss.detach())
    return float(loss.detach())


def test_matches_a_plain_training_loop():
    loader = DataLoader(_data(), batch_size=8, shuffle=False)  # 3 batches: 7 steps cycle the loader
    ours, theirs = _backbone(), _backbone()
    result = train_supervised(ours, loader, 3, steps=7, lr=1e-2, min_lr=1e-4, weight_decay=0.05, warmup_steps=2,
                              seed=5, progress=False)
    last = _reference_training(theirs, loader, 3, 7, 1e-2, 1e-4, 0.05, 2, 5)
    assert isinstance(result, SupervisedResult) and result.steps == 7
    assert result.final_loss == pytest.approx(last, rel=1e-5)
    for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not ours.training  # left in eval mode for feature extraction


def test_learns_an_easy_task():
    backbone = _backbone()
    start = copy.deepcopy(backbone)
    loader = DataLoader(_data(n=60), batch_size=12, shuffle=True, generator=torch.Generator().manual_seed(0))
    result = train_supervised(backbone, loader, 3, steps=60, lr=3e-2, progress=False)
    assert result.final_loss < math.log(3) and result.train_top1 > 60.0
    assert any(not torch.equal(a, b) for a, b in zip(backbone.state_dict().values(), start.state_dict().values()))


def test_accepts_a_backbone_output_with_pooled():
    class WithPooled(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = _backbone()

        def forward(self, x):
            return type("Out", (), {"pooled": self.inner(x)})()

    result = train_supervised(WithPooled(), DataLoader(_data(), batch_size=8), 3, steps=2, lr=1e-3, progress=False)
    assert result.steps == 2 and math.isfinite(result.final_loss)


@pytest.mark.parametrize("kwargs, match", [
    ({"steps": 0}, "steps"),
    ({"lr": 0.0}, "lr"),
    ({"lr": float("nan")}, "lr"),
    ({"min_lr": -1.0}, "min_lr"),
    ({"weight_decay": -0.1}, "weight_decay"),
    ({"warmup_steps": 5}, "warmup_steps"),
    ({"num_classes": 1}, "num_classes"),
])
def test_options_out_of_range_are_refused(kwargs, match):
    options = {"num_classes": 3, "steps": 4, "lr": 1e-3, **kwargs}
    classes = options.pop("num_classes")
    with pytest.raises(ValueError, match=match):
        train_supervised(_backbone(), DataLoader(_data(), batch_size=8), classes, progress=False, **options)


def test_bad_data_is_refused():
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\)"):  # 3 classes in the data, 2 declared
        train_supervised(_backbone(), DataLoader(_data(), batch_size=24), 2, steps=1, lr=1e-3, progress=False)
    empty = DataLoader(TensorDataset(torch.zeros(0, 3, 8, 8), torch.zeros(0, dtype=torch.long)), batch_size=4)
    with pytest.raises(ValueError, match="no batch"):
        train_supervised(_backbone(), empty, 3, steps=1, lr=1e-3, progress=False)
    tokens = nn.Sequential(nn.Flatten(2), nn.Identity())  # [B, 3, 64]: not an image vector
    with pytest.raises(ValueError, match=r"\[B=8, D\]"):
        train_supervised(tokens, DataLoader(_data(), batch_size=8), 3, steps=1, lr=1e-3, progress=False)


def test_a_non_finite_loss_stops_with_a_message():
    data = _data()
    data.tensors[0][0, 0, 0, 0] = float("inf")
    with pytest.raises(RuntimeError, match="non-finite"):
        train_supervised(_backbone(), DataLoader(data, batch_size=8), 3, steps=2, lr=1e-3, progress=False)


def test_gap_closed():
    assert gap_closed(40.0, 55.0, 70.0) == pytest.approx(0.5)
    assert gap_closed(40.0, 40.0, 70.0) == 0.0
    assert gap_closed(40.0, 80.0, 70.0) == pytest.approx(4 / 3)  # better than the reference
    assert gap_closed(40.0, 30.0, 70.0) == pytest.approx(-1 / 3)
    assert math.isnan(gap_closed(50.0, 60.0, 50.0)) and math.isnan(gap_closed(50.0, 60.0, 45.0))


def _labelled(labels, n: int = 8) -> list[tuple[torch.Tensor, object]]:
    """One batch of n images with the given labels (a list is a re-iterable loader)."""
    return [(torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(0)), labels)]


@pytest.mark.parametrize("labels", [
    torch.full((8,), 0.9),                          # all 0.9: truncated to class 0
    (torch.arange(8) % 3).float() + 0.5,            # y + 0.5: truncated to y
])
def test_float_labels_are_refused_not_truncated(labels):
    """Issue 24 item 10: float labels were cast to integers and training returned normally."""
    with pytest.raises(ValueError, match=r"labels must be integer class indices, got 0\.9|got 0\.5"):
        train_supervised(_backbone(), _labelled(labels), 3, steps=2, lr=1e-3, progress=False)
    whole = (torch.arange(8) % 3).float()           # 0.0, 1.0, 2.0: exact, accepted
    assert train_supervised(_backbone(), _labelled(whole), 3, steps=2, lr=1e-3, progress=False).steps == 2


def test_nan_and_string_labels_have_clear_messages():
    """Issue 24 item 17: 'values in [-9223372036854775808, ...]' and "too many dimensions 'str'"."""
    nan = torch.zeros(8)
    nan[3] = float("nan")
    with pytest.raises(ValueError, match=r"integer class indices, got a non-finite value \(nan\)") as err:
        train_supervised(_backbone(), _labelled(nan), 3, steps=1, lr=1e-3, progress=False)
    assert "9223372036854775808" not in str(err.value)
    with pytest.raises(TypeError, match=r"integer class indices, got strings such as 'cat'.*class_to_idx"):
        train_supervised(_backbone(), _labelled(["cat"] * 8), 3, steps=1, lr=1e-3, progress=False)


def test_a_one_shot_generator_shorter_than_steps_says_so():
    """Issue 24 item 17: a 2-batch generator with steps=5 reported 'the loader yielded no batch'."""
    batches = (batch for batch in DataLoader(_data(16), batch_size=8))
    with pytest.raises(ValueError, match=r"exhausted after 2 of steps=5 steps: a one-shot iterator") as err:
        train_supervised(_backbone(), batches, 3, steps=5, lr=1e-3, progress=False)
    assert "yielded no batch" not in str(err.value)


def test_nan_images_are_blamed_not_the_lr():
    """Issue 24 item 17: NaN images got the advice 'lower the lr'."""
    data = _data()
    data.tensors[0][2] = float("nan")
    with pytest.raises(RuntimeError, match=r"images hold NaN or inf.*check the data") as err:
        train_supervised(_backbone(), DataLoader(data, batch_size=8), 3, steps=2, lr=1e-3, progress=False)
    assert "lower the lr" not in str(err.value)
