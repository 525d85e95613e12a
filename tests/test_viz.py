"""cmd.viz: overlays, training curves, attention grids and embedding plots (Agg backend)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")

from cmd import viz  # noqa: E402


def test_overlay_shape_range_and_peak_location():
    image = torch.zeros(3, 32, 32)
    weights = torch.zeros(16)
    weights[5] = 1.0  # grid (4, 4): row 1, column 1 -> pixels 8..15
    out = viz.instance_weight_overlay(image, weights, (4, 4), alpha=1.0, colormap="gray")
    assert out.shape == (32, 32, 3) and out.min() >= 0 and out.max() <= 1
    brightness = out.mean(-1)
    y, x = np.unravel_index(brightness.argmax(), brightness.shape)
    assert 8 <= y < 16 and 8 <= x < 16


def test_overlay_rejects_wrong_grid():
    with pytest.raises(ValueError, match="grid"):
        viz.instance_weight_overlay(torch.zeros(3, 8, 8), torch.ones(5), (2, 2))


def test_plot_training_log(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text(
        "\n".join(json.dumps({"epoch": e, "loss": 5 - e, "image": 3.0, "teacher_entropy": 2.0, "knn_top1": 10.0 * e})
                  for e in (1, 2, 3))
    )
    viz.plot_training_log(log, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 1000
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="no records"):
        viz.plot_training_log(empty)


def test_save_attention_grid_with_cmd_network(tmp_path):
    import cmd

    backbone = cmd.create_backbone("vit_tiny", depth=1, patch_size=8, embed_dim=24, num_heads=2)
    net = cmd.CMDNetwork(backbone, cmd.CrossLevelHead(backbone.embed_dim, out_dim=16, hidden_dim=32, bottleneck_dim=8))
    images = torch.randn(3, 3, 32, 32)
    weights, grid = viz.region_weights(net, images)
    assert weights.shape == (3, 16) and grid == (4, 4)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3))
    viz.save_attention_grid(net, images, tmp_path / "grid.png", n_cols=2)
    assert (tmp_path / "grid.png").stat().st_size > 1000


@pytest.mark.parametrize("method", ["pca", "tsne"])
def test_plot_embeddings(tmp_path, method):
    if method == "tsne":
        pytest.importorskip("sklearn")
    feats = torch.randn(40, 8)
    labels = torch.arange(40) % 4
    viz.plot_embeddings(feats, labels, tmp_path / "emb.png", method=method)
    assert (tmp_path / "emb.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="method"):
        viz.plot_embeddings(feats, labels, method="umap")
