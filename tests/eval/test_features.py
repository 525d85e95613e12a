"""extract_features in a single process (the distributed case is in tests/distributed)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from cmd.backbones.output import BackboneOutput
from cmd.eval import extract_features


class _WithPartMask(Dataset):
    """(image, label, part mask): an extra item the extractor must ignore."""

    def __init__(self, n: int = 10) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, 3, 4, 4, generator=g)
        self.labels = torch.arange(n) % 3

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i]), torch.zeros(4, 4, dtype=torch.bool)


class _TokenModel(nn.Module):
    """Returns a BackboneOutput whose pooled vector is the flattened image times a matrix."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(48, 6)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> BackboneOutput:
        pooled = self.drop(self.proj(x.flatten(1)))
        return BackboneOutput(pooled, pooled[:, None].repeat(1, 4, 1), (2, 2))

    def other(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :5]


def test_backbone_output_extra_items_and_order():
    data = _WithPartMask(10)
    model = _TokenModel().train()
    feats, labels = extract_features(model, DataLoader(data, batch_size=3), progress=False)
    expected = F.normalize(model.proj(data.images.flatten(1)), dim=1)  # eval: dropout off
    torch.testing.assert_close(feats, expected.detach())
    assert labels.dtype == torch.int64 and labels.tolist() == data.labels.tolist()
    assert feats.dtype == torch.float32
    assert model.training  # the mode is restored


def test_forward_selects_what_to_extract_without_normalisation():
    data = _WithPartMask(7)
    model = _TokenModel()
    feats, _ = extract_features(
        model, DataLoader(data, batch_size=4), normalize=False, progress=False, forward=lambda m, x: m.other(x)
    )
    torch.testing.assert_close(feats, data.images.flatten(1)[:, :5])


def test_plain_callable_and_amp_flag_on_cpu():
    images = torch.randn(5, 3, 2, 2)
    data = TensorDataset(images, torch.arange(5))
    feats, labels = extract_features(lambda x: x.flatten(1).double(), DataLoader(data, batch_size=2), progress=False)
    assert feats.dtype == torch.float32  # features come back in float32 whatever the model's dtype
    torch.testing.assert_close(feats, F.normalize(images.flatten(1), dim=1))


def test_bad_outputs_and_batches_raise():
    data = TensorDataset(torch.randn(4, 3, 2, 2), torch.arange(4))
    loader = DataLoader(data, batch_size=2)
    with pytest.raises(ValueError, match=r"features \[B=2, D\]"):
        extract_features(lambda x: x, loader, progress=False)  # 4-D output
    with pytest.raises(TypeError, match="BackboneOutput"):
        extract_features(lambda x: [x], loader, progress=False)
    images_only = DataLoader(TensorDataset(torch.randn(4, 3, 2, 2)), batch_size=2)
    with pytest.raises(TypeError, match=r"\(images, labels\)"):
        extract_features(lambda x: x.flatten(1), images_only, progress=False)
    with pytest.raises(ValueError, match="no batch"):
        extract_features(lambda x: x.flatten(1), [], progress=False)


def test_drop_last_loader_raises_in_one_process():
    """Issue 15 item 6: 6 images with batch size 4 and drop_last=True used to give 4 rows silently."""
    data = TensorDataset(torch.randn(6, 3, 4, 4), torch.arange(6) % 2)
    model = torch.nn.Flatten()
    with pytest.raises(ValueError, match=r"drops its last batch.*6 samples, batch size 4.*drop_last=False"):
        extract_features(model, DataLoader(data, batch_size=4, drop_last=True), progress=False)
    feats, _ = extract_features(model, DataLoader(data, batch_size=3, drop_last=True), progress=False)
    assert feats.shape[0] == 6  # nothing to drop: accepted


def test_labels_that_a_cast_would_change_are_refused():
    """Float labels such as 0.9 were cast to class 0 without a word (issue 24 item 10, the shared helper)."""
    model = torch.nn.Flatten()
    for labels, error, match in [
        (torch.full((4,), 0.9), ValueError, r"integer class indices, got 0\.9"),
        (torch.tensor([0.0, float("nan"), 1.0, 2.0]), ValueError, "non-finite"),
        (["a", "b", "c", "d"], TypeError, "strings such as 'a'"),
    ]:
        with pytest.raises(error, match=match):
            extract_features(model, [(torch.zeros(4, 3, 2, 2), labels)], progress=False)
    _, y = extract_features(model, [(torch.zeros(4, 3, 2, 2), torch.tensor([0.0, 1.0, 2.0, 3.0]))], progress=False)
    assert y.dtype == torch.long and y.tolist() == [0, 1, 2, 3]
