"""LinearProbe / train_linear_probe on a stand-in backbone (and one tiny timm ViT)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from cmd.eval import LinearProbe, class_balanced_split, default_lr_sweep, train_linear_probe

N_CLASSES = 4


class StandInBackbone(nn.Module):
    """A frozen 'backbone' with the forward_last_blocks API and a BatchNorm that must not drift."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.norm = nn.BatchNorm1d(12)
        self.proj = nn.Linear(12, 16)

    def forward_last_blocks(self, x: torch.Tensor, n: int = 4, avgpool: bool = False) -> torch.Tensor:
        h = self.proj(self.norm(x.flatten(1)))
        blocks = [h * (i + 1) for i in range(n)]
        if avgpool:
            blocks.append(h.mean(dim=1, keepdim=True))
        return torch.cat(blocks, dim=1)


class Blobs(Dataset):
    """Gaussian class blobs as [3, 2, 2] 'images', with a `targets` list."""

    def __init__(self, n_per_class: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        centres = torch.randn(N_CLASSES, 12, generator=torch.Generator().manual_seed(123)) * 2
        self.targets = [c for c in range(N_CLASSES) for _ in range(n_per_class)]
        y = torch.tensor(self.targets)
        self.images = (centres[y] + torch.randn(len(y), 12, generator=g)).reshape(-1, 3, 2, 2)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.images[i], self.targets[i]


def _loaders(batch_size: int = 32):
    train = DataLoader(Blobs(40, seed=1), batch_size=batch_size, shuffle=True,
                       generator=torch.Generator().manual_seed(0))
    val = DataLoader(Blobs(20, seed=2), batch_size=64)
    return train, val


def test_cached_probe_learns_and_backbone_stays_frozen():
    backbone = StandInBackbone().train()
    stats = (backbone.norm.running_mean.clone(), backbone.norm.running_var.clone())
    weights = backbone.proj.weight.clone()
    train, val = _loaders()
    out = train_linear_probe(backbone, train, val, epochs=30, lrs=[1e-5, 0.05], cache_features=True, progress=False)
    assert out["feature_dim"] == 64 and out["num_train"] == 160 and out["num_val"] == 16  # 10 % of 40 per class
    assert out["per_lr"][0.05]["val_top1"] > 90.0
    assert out["per_lr"][1e-5]["val_top1"] < out["per_lr"][0.05]["val_top1"]
    assert out["lr"] == 0.05 and out["lr_selection"] == "validation" and out["refit"]
    assert out["top1"] > 90.0 and out["best_test_top1_over_epochs"] >= out["top1"]
    assert out["top5"] == 100.0  # 4 classes: top-5 is over all of them
    assert isinstance(out["probe"], LinearProbe)
    assert torch.equal(backbone.norm.running_mean, stats[0]) and torch.equal(backbone.norm.running_var, stats[1])
    assert torch.equal(backbone.proj.weight, weights)
    assert backbone.training  # mode restored


def test_streaming_probe_learns():
    backbone = StandInBackbone()
    stats = backbone.norm.running_mean.clone()
    train, val = _loaders()
    out = train_linear_probe(backbone, train, val, epochs=15, lr=0.05, n_last_blocks=2, avgpool=True, progress=False)
    assert out["feature_dim"] == 33 and out["lr_selection"] == "single" and out["num_val"] == 0
    assert out["top1"] > 90.0
    assert torch.equal(backbone.norm.running_mean, stats)


def test_cached_training_equals_a_plain_sgd_loop():
    """Momentum SGD with a cosine over epochs, written out by hand, gives the same head."""
    backbone = StandInBackbone()
    _, val = _loaders()
    train = DataLoader(Blobs(40, seed=1), batch_size=16)  # unshuffled: cached rows in dataset order
    epochs, lr, seed = 4, 0.2, 7
    out = train_linear_probe(
        backbone, train, val, epochs=epochs, lr=lr, batch_size=16, cache_features=True, seed=seed, progress=False
    )
    data = train.dataset
    with torch.no_grad():
        x = backbone.eval().forward_last_blocks(data.images, n=4)
    y = torch.tensor(data.targets)
    w = torch.empty(N_CLASSES, 64)
    nn.init.normal_(w, 0.0, 0.01, generator=torch.Generator().manual_seed(seed))
    b = torch.zeros(N_CLASSES)
    w.requires_grad_(True)
    b.requires_grad_(True)
    buffers = [torch.zeros_like(w), torch.zeros_like(b)]
    g = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        step_lr = lr * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
        perm = torch.randperm(len(y), generator=g)
        for start in range(0, len(y), 16):
            idx = perm[start : start + 16]
            loss = F.cross_entropy(x[idx] @ w.T + b, y[idx])
            grads = torch.autograd.grad(loss, [w, b])
            with torch.no_grad():
                for p, grad, buf in zip((w, b), grads, buffers):
                    buf.mul_(0.9).add_(grad)
                    p.sub_(step_lr * buf)
    torch.testing.assert_close(out["probe"].linear.weight, w.detach(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out["probe"].linear.bias, b.detach(), atol=1e-5, rtol=1e-4)


def test_default_lr_sweep_and_label_fraction():
    train, val = _loaders(batch_size=32)
    out = train_linear_probe(StandInBackbone(), train, val, epochs=1, progress=False, label_fraction=0.5)
    assert default_lr_sweep(32)[0] == pytest.approx(1e-3 * 32 / 256)  # the official rate comes first
    assert list(out["per_lr"]) == default_lr_sweep(32) and out["lr"] in default_lr_sweep(32)
    assert out["num_train"] == 80 and out["num_val"] == 8  # streaming: a class-balanced subset, 10 % held out
    cached = train_linear_probe(
        StandInBackbone(), train, val, epochs=1, cache_features=True, label_fraction=0.25, progress=False
    )
    assert cached["num_train"] == 40
    no_targets = DataLoader(TensorDataset(torch.randn(8, 3, 2, 2), torch.arange(8) % 4), batch_size=4)
    with pytest.raises(ValueError, match="targets"):
        train_linear_probe(StandInBackbone(), no_targets, val, epochs=1, label_fraction=0.5, progress=False)
    with pytest.raises(ValueError, match="several learning rates.*targets"):  # no labels to draw a split from
        train_linear_probe(StandInBackbone(), no_targets, val, epochs=1, progress=False)


def test_argument_errors():
    train, val = _loaders()
    with pytest.raises(TypeError, match="forward_last_blocks"):
        train_linear_probe(nn.Linear(2, 2), train, val, progress=False)
    with pytest.raises(ValueError, match="either lr or lrs"):
        train_linear_probe(StandInBackbone(), train, val, lr=0.1, lrs=[0.1], progress=False)
    with pytest.raises(ValueError, match="epochs"):
        train_linear_probe(StandInBackbone(), train, val, epochs=0, progress=False)
    with pytest.raises(ValueError, match="learning rates"):
        train_linear_probe(StandInBackbone(), train, val, lrs=[0.1, -1.0], progress=False)
    with pytest.raises(ValueError, match="training labels"):
        train_linear_probe(StandInBackbone(), train, val, num_classes=2, epochs=1, cache_features=True,
                           progress=False)


def test_linear_probe_module():
    a, b = LinearProbe(8, 3, seed=1), LinearProbe(8, 3, seed=1)
    assert torch.equal(a.linear.weight, b.linear.weight)
    assert a.linear.weight.std() < 0.05 and torch.equal(a.linear.bias, torch.zeros(3))
    assert a(torch.randn(5, 8)).shape == (5, 3)
    with pytest.raises(ValueError, match=r"\[B, 8\]"):
        a(torch.randn(5, 7))


def test_with_a_tiny_vit_backbone():
    backbones = pytest.importorskip("cmd.backbones")
    if not hasattr(backbones, "create_backbone"):
        pytest.skip("cmd.backbones.create_backbone is not available")
    torch.manual_seed(0)
    backbone = backbones.create_backbone("vit_tiny", depth=2)
    images = torch.rand(8, 3, 32, 32)
    labels = torch.arange(8) % 2
    loader = DataLoader(TensorDataset(images, labels), batch_size=4)
    out = train_linear_probe(backbone, loader, loader, num_classes=2, n_last_blocks=2, avgpool=True,
                             epochs=2, cache_features=True, progress=False)
    assert out["feature_dim"] == 3 * 192
    assert 0.0 <= out["top1"] <= 100.0


class _NoTargets(Dataset):
    """Blobs without a `targets` attribute (labels are only seen batch by batch)."""

    def __init__(self, inner: Dataset) -> None:
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int):
        return self.inner[i]


def test_streaming_probe_refuses_out_of_range_labels_and_bad_label_fractions():
    """Issue 15 item 17: 'IndexError: Target 2 is out of bounds' and 'missing targets' for label_fraction=0."""
    train, val = _loaders()
    with pytest.raises(ValueError, match=r"training labels must lie in \[0, num_classes=2\), got \[0, 3\]"):
        train_linear_probe(StandInBackbone(), train, val, num_classes=2, epochs=1, progress=False)
    hidden = DataLoader(_NoTargets(Blobs(5, seed=1)), batch_size=8)
    two_classes = DataLoader(torch.utils.data.Subset(Blobs(20, seed=2), range(40)), batch_size=64)  # labels 0, 1
    with pytest.raises(ValueError, match=r"training labels must lie in \[0, num_classes=2\)"):
        train_linear_probe(StandInBackbone(), hidden, two_classes, num_classes=2, epochs=1, lr=0.1, progress=False)
    for fraction in (0, 1.5):
        for cached in (False, True):
            with pytest.raises(ValueError, match=rf"label_fraction must be a number in \(0, 1\], got {fraction}"):
                train_linear_probe(StandInBackbone(), hidden, val, num_classes=4, epochs=1, progress=False,
                                   label_fraction=fraction, cache_features=cached)


class _FloatTargets(Dataset):
    """Blobs whose labels (and `targets`) are floats: y + shift."""

    def __init__(self, shift: float, expose_targets: bool) -> None:
        self.inner = Blobs(5, seed=1)
        if expose_targets:
            self.targets = [t + shift for t in self.inner.targets]
        self.shift = shift

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int):
        image, label = self.inner[i]
        return image, float(label) + self.shift


@pytest.mark.parametrize("shift", [0.5, 0.9])
@pytest.mark.parametrize("expose_targets", [False, True])
def test_streaming_probe_refuses_float_labels(shift, expose_targets):
    """Issue 24 item 10: float labels (y + 0.5, 0.9) were truncated to integers and the probe returned."""
    train = DataLoader(_FloatTargets(shift, expose_targets), batch_size=8)
    _, val = _loaders()
    with pytest.raises(ValueError, match=rf"labels must be integer class indices, got \d*{str(shift)[1:]}"):
        train_linear_probe(StandInBackbone(), train, val, num_classes=4, epochs=1, lr=0.1, progress=False)
    whole = DataLoader(_FloatTargets(0.0, expose_targets), batch_size=8)  # 0.0, 1.0, ...: exact, accepted
    assert train_linear_probe(StandInBackbone(), whole, val, num_classes=4, epochs=1, lr=0.1,
                              progress=False)["num_train"] == 20


def test_n_last_blocks_above_the_depth_names_the_option():
    """Issue 24 item 14: 'n must be an int in [1, 1] ... got 4' did not name n_last_blocks."""
    backbones = pytest.importorskip("cmd.backbones")
    backbone = backbones.create_backbone("vit_tiny", depth=1, patch_size=8, embed_dim=24, num_heads=2)
    loader = DataLoader(TensorDataset(torch.rand(4, 3, 16, 16), torch.arange(4) % 2), batch_size=4)
    with pytest.raises(ValueError, match=r"n_last_blocks must be an int in \[1, 1\] \(the backbone has 1 blocks\), got 4"):
        train_linear_probe(backbone, loader, loader, num_classes=2, epochs=1, lr=0.1, progress=False)


def test_class_balanced_split():
    labels = torch.tensor([0] * 10 + [1] * 5 + [2] * 2 + [3])
    kept, held = class_balanced_split(labels, 0.2, seed=3)
    assert sorted(kept.tolist() + held.tolist()) == list(range(18))
    assert torch.bincount(labels[held], minlength=4).tolist() == [2, 1, 1, 0]  # >= 1 held, >= 1 kept, 1-sample kept
    again, _ = class_balanced_split(labels, 0.2, seed=3)
    assert torch.equal(kept, again)
    assert not torch.equal(class_balanced_split(labels, 0.2, seed=4)[1], held)
    for bad in (0, 1, 1.5, True):
        with pytest.raises(ValueError, match="fraction"):
            class_balanced_split(labels, bad)


def _cached(dataset: Dataset, batch_size: int = 16) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size)  # unshuffled: cached rows in dataset order


def test_the_rate_is_picked_on_held_out_training_samples_never_on_the_test_split():
    """Item 6 of issue 22: a garbage test split (labels reversed) changes neither the choice nor the head."""
    train = Blobs(40, seed=1)
    good = DataLoader(Blobs(20, seed=2), batch_size=64)
    flipped = Blobs(20, seed=2)
    flipped.targets = [N_CLASSES - 1 - t for t in flipped.targets]
    bad = DataLoader(flipped, batch_size=64)
    rates = [1e-4, 1e-2, 0.3]
    kwargs = dict(epochs=5, lrs=rates, batch_size=16, cache_features=True, seed=1, progress=False)
    a = train_linear_probe(StandInBackbone(), _cached(train), good, **kwargs)
    b = train_linear_probe(StandInBackbone(), _cached(train), bad, **kwargs)
    assert a["lr"] == b["lr"] and a["per_lr"] == b["per_lr"]
    assert torch.equal(a["probe"].linear.weight, b["probe"].linear.weight)
    assert a["top1"] > 90.0 and b["top1"] < 10.0  # only the report differs


def test_selection_and_refit_equal_single_rate_runs_on_the_split():
    """An independent re-run: the validation accuracy of each rate is that of a one-rate probe trained on the kept
    samples and measured on the held-out ones; the refitted head is a one-rate probe on the whole training set."""
    train = Blobs(10, seed=1)
    _, test = _loaders()
    rates, seed, epochs = [1e-3, 0.05, 0.5], 2, 3
    kept, held = class_balanced_split(torch.tensor(train.targets), 0.2, seed)
    common = dict(epochs=epochs, batch_size=8, cache_features=True, seed=seed, progress=False)
    picked = train_linear_probe(StandInBackbone(), _cached(train), test, lrs=rates, val_fraction=0.2, refit=False,
                                **common)
    held_loader = DataLoader(torch.utils.data.Subset(train, held.tolist()), batch_size=64)
    for rate in rates:
        alone = train_linear_probe(StandInBackbone(), _cached(torch.utils.data.Subset(train, kept.tolist())),
                                   held_loader, num_classes=N_CLASSES, lr=rate, **common)
        assert picked["per_lr"][rate]["val_top1"] == pytest.approx(alone["top1"])
        if rate == picked["lr"]:
            torch.testing.assert_close(picked["probe"].linear.weight, alone["probe"].linear.weight)
    assert picked["num_train"] == len(kept) and picked["num_val"] == len(held) and not picked["refit"]
    refit = train_linear_probe(StandInBackbone(), _cached(train), test, lrs=rates, val_fraction=0.2, **common)
    full = train_linear_probe(StandInBackbone(), _cached(train), test, lr=picked["lr"], **common)
    assert refit["refit"] and refit["num_train"] == len(train) and refit["lr"] == picked["lr"]
    torch.testing.assert_close(refit["probe"].linear.weight, full["probe"].linear.weight)
    assert refit["top1"] == full["top1"] and refit["best_test_top1_over_epochs"] == full["best_test_top1_over_epochs"]


def test_best_test_over_epochs_is_the_official_number():
    """The official protocol's 'best test accuracy over the epochs': the max of the test top-1 after each epoch."""
    train, test = Blobs(10, seed=1), DataLoader(Blobs(20, seed=2), batch_size=64)
    common = dict(lr=0.05, batch_size=8, cache_features=True, seed=0, progress=False)
    one = train_linear_probe(StandInBackbone(), _cached(train), test, epochs=1, **common)
    assert one["best_test_top1_over_epochs"] == one["top1"]
    many = train_linear_probe(StandInBackbone(), _cached(train), test, epochs=6, **common)
    assert many["best_test_top1_over_epochs"] >= many["top1"]


def test_a_diverged_rate_is_never_picked():
    train, test = _loaders()
    out = train_linear_probe(StandInBackbone(), train, test, epochs=3, lrs=[0.05, 1e38], cache_features=True,
                             progress=False)
    assert math.isnan(out["per_lr"][1e38]["val_top1"]) and out["lr"] == 0.05
    with pytest.raises(RuntimeError, match="every head diverged"):
        train_linear_probe(StandInBackbone(), train, test, epochs=3, lrs=[1e38, 3e38], cache_features=True,
                           progress=False)
