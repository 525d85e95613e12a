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


def test_overlay_is_nearest_neighbour_on_a_shared_scale():
    image = torch.zeros(3, 32, 32)
    weights = torch.full((16,), 1 / 16)
    weights[5] = 2 / 16
    weights = weights / weights.sum()
    out = viz.instance_weight_overlay(image, weights, (4, 4), alpha=1.0, colormap="gray", vmin=0.0, vmax=0.5)
    assert np.allclose(out[8:16, 8:16], out[8, 8])  # one token: one flat block (no bilinear blur)
    assert np.allclose(out[:8, :8], out[0, 0]) and not np.allclose(out[0, 0], out[8, 8])
    # a shared scale: near-uniform weights stay dark when the scale's top is another image's peak
    assert out.max() < 0.3
    uniform = viz.instance_weight_overlay(image, torch.full((16,), 1 / 16), (4, 4), alpha=1.0, colormap="gray",
                                          vmin=0.0, vmax=0.5)
    assert np.allclose(uniform, 1 / 8, atol=0.01)


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


def test_plot_embeddings_rejects_bad_input():
    feats, labels = torch.randn(10, 4), torch.arange(10) % 2
    with pytest.raises(ValueError, match="N == len"):
        viz.plot_embeddings(feats, labels[:9], method="pca")
    with pytest.raises(ValueError, match="N, D"):
        viz.plot_embeddings(torch.randn(10), labels, method="pca")
    with pytest.raises(ValueError, match="at least 3"):
        viz.plot_embeddings(feats[:2], labels[:2], method="pca")
    bad = feats.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        viz.plot_embeddings(bad, labels, method="pca")


def test_plot_embeddings_pca_separates_classes_and_names_them(tmp_path):
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(60) % 3
    feats = 10 * torch.eye(3, 16)[labels] + 0.1 * torch.randn(60, 16, generator=g)
    fig = viz.plot_embeddings(feats, labels, method="pca", class_names=["a", "b", "c"])
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a", "b", "c"]
    fig.canvas.draw()
    legend_box = ax.get_legend().get_window_extent()
    assert legend_box.x0 >= ax.get_window_extent().x1  # outside the data, right of the axes
    assert sum(len(c.get_offsets()) for c in ax.collections) == 60


def _write_csv(path, text):
    path.write_text(text)
    return path


def test_plot_step_curves(tmp_path):
    csv_path = _write_csv(
        tmp_path / "steps.csv", "step,loss,lr,teacher_temperature\n1,5.0,0.1,0.04\n2,4.5,0.2,\n3,4.0,0.3,0.05\n"
    )
    fig = viz.plot_step_curves(csv_path, tmp_path / "steps.png")
    assert (tmp_path / "steps.png").stat().st_size > 1000
    assert [ax.get_title() for ax in fig.axes] == ["loss terms (unweighted)", "lr", "teacher_temperature"]
    assert [ax.get_ylabel() for ax in fig.axes] == ["loss (nats)", "learning rate", "temperature"]
    xs, ys = fig.axes[2].lines[0].get_data()
    assert list(xs) == [1.0, 3.0] and list(ys) == [0.04, 0.05]  # the empty cell is skipped
    fig = viz.plot_step_curves(csv_path, columns=["lr"])
    assert [ax.get_title() for ax in fig.axes] == ["lr"]


def test_plot_step_curves_drops_constants_and_groups_terms_and_entropies(tmp_path):
    header = "step,loss,image,region,teacher_entropy,teacher_batch_entropy,weight_decay,lr\n"
    rows = "".join(f"{s},{5 - s / 10},{3 - s / 10},{2 - s / 10},{1 + s / 10},{4 - s / 10},0.04,{s / 100}\n"
                   for s in range(1, 6))
    fig = viz.plot_step_curves(_write_csv(tmp_path / "steps.csv", rows and header + rows), out_dim=128)
    assert [ax.get_title() for ax in fig.axes] == ["loss terms (unweighted)", "teacher entropies", "lr"]
    assert [line.get_label() for line in fig.axes[0].lines][:3] == ["loss", "image", "region"]
    log_k = [line for line in fig.axes[1].lines if line.get_label().startswith("log K")]
    assert len(log_k) == 1 and log_k[0].get_ydata()[0] == pytest.approx(np.log(128))
    assert "weight_decay = 0.04" in fig._suptitle.get_text()  # the constant is named, not drawn


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("epoch,loss\n1,2.0\n", "no 'step' column"),
        ("step,loss\n", "no data rows"),
        ("step,loss\n1,abc\n", "not a number"),
        ("step\n1\n", "no scalar column"),
    ],
)
def test_plot_step_curves_rejects_bad_files(tmp_path, text, match):
    with pytest.raises(ValueError, match=match):
        viz.plot_step_curves(_write_csv(tmp_path / "bad.csv", text))
    good = _write_csv(tmp_path / "good.csv", "step,loss\n1,1.0\n")
    with pytest.raises(ValueError, match="not in"):
        viz.plot_step_curves(good, columns=["lr"])


def test_plot_knn_over_epochs(tmp_path):
    log = tmp_path / "log.jsonl"
    rows = [{"epoch": 0, "knn_top1": 5.0}, {"epoch": 1, "loss": 3.0}, {"epoch": 2, "loss": 2.0, "knn_top1": 20.0}]
    log.write_text("\n".join(json.dumps(r) for r in rows))
    fig = viz.plot_knn_over_epochs(log, tmp_path / "knn.png")
    assert (tmp_path / "knn.png").stat().st_size > 1000
    assert _measured(fig.axes[0]) == ([0, 2], [5.0, 20.0])
    assert _joined(fig.axes[0]) == []  # epochs 0 and 2: markers only, no line across epoch 1
    log.write_text(json.dumps({"epoch": 1, "loss": 3.0}))
    with pytest.raises(ValueError, match="knn_top1"):
        viz.plot_knn_over_epochs(log)
    # cmd-fgvc pretrain's log: the value before training on the first row, drawn at epoch 0
    rows = [{"epoch": 1, "loss": 3.0, "knn_top1_before": 5.0}, {"epoch": 2, "loss": 2.0, "knn_top1": 20.0}]
    log.write_text("\n".join(json.dumps(r) for r in rows))
    fig = viz.plot_knn_over_epochs(log)
    assert _measured(fig.axes[0]) == ([0, 2], [5.0, 20.0]) and _joined(fig.axes[0]) == []
    assert "no line" in fig.axes[0].get_title()
    ax = viz.plot_training_log(log).axes[3]
    assert _measured(ax) == ([0, 2], [5.0, 20.0]) and _joined(ax) == []
    # measured at consecutive epochs: joined by a line
    rows = [{"epoch": e, "loss": 1.0, "knn_top1": 10.0 * e} for e in (1, 2, 3)]
    log.write_text("\n".join(json.dumps(r) for r in rows))
    assert _joined(viz.plot_knn_over_epochs(log).axes[0]) == [[1, 2, 3]]


def _measured(ax):
    """(epochs, values) of every marker drawn on ``ax``, in epoch order."""
    points = sorted((float(x), float(y)) for line in ax.lines if line.get_marker() not in (None, "None", "")
                    for x, y in zip(*line.get_data()))
    return [p[0] for p in points], [p[1] for p in points]


def _joined(ax):
    """The x values of each line (not markers only) drawn on ``ax``."""
    return [[float(x) for x in line.get_xdata()] for line in ax.lines if line.get_linestyle() not in ("None", "")]


def test_plot_training_log_weighted_terms_diagnostics_and_log_k(tmp_path):
    log = tmp_path / "log.jsonl"
    rows = [{"epoch": e, "loss": 0.5 * 4 + 0.5 * 2 + 0.1 * 1, "image": 4.0, "region": 2.0, "inter_level": 1.0,
             "inter_level_teacher": 7.0, "teacher_entropy": 2.0, "teacher_batch_entropy": 4.0} for e in (1, 2)]
    log.write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "args.json").write_text(json.dumps([{"args": {"loss": "cmd", "image_weight": None, "out_dim": 64}}]))
    fig = viz.plot_training_log(log)  # weights and K from the run's args.json (the "cmd" preset)
    loss_ax, diag_ax, entropy_ax, knn_ax = fig.axes
    lines = {line.get_label(): list(line.get_ydata()) for line in loss_ax.lines}
    assert set(lines) == {"loss (total)", "0.5 x image", "0.5 x region", "0.1 x inter_level"}
    assert lines["0.5 x image"] == [2.0, 2.0] and lines["0.1 x inter_level"] == [0.1, 0.1]
    total = sum(v[0] for k, v in lines.items() if k != "loss (total)")
    assert total == pytest.approx(lines["loss (total)"][0])  # the weighted terms add up to the loss
    assert [line.get_label() for line in diag_ax.lines] == ["inter_level_teacher"]  # a diagnostic, not a loss term
    log_k = [line for line in entropy_ax.lines if line.get_label().startswith("log K")]
    assert len(log_k) == 1 and log_k[0].get_ydata()[0] == pytest.approx(np.log(64))
    assert all(ax.get_ylabel() for ax in fig.axes)
    assert "nats" in entropy_ax.get_ylabel() and "%" in knn_ax.get_ylabel()


def test_sample_across_classes():
    labels = torch.arange(100) % 10  # 10 classes, 10 images each
    idx = viz.sample_across_classes(labels, per_class=2, max_images=16)
    assert len(idx) == 16 and len(set(idx)) == 16
    picked = labels[idx]
    assert len(set(picked.tolist())) == 8 and all((picked == c).sum() == 2 for c in set(picked.tolist()))
    assert set(labels[viz.sample_across_classes(labels, per_class=1, max_images=32)].tolist()) == set(range(10))
    assert viz.sample_across_classes(labels, seed=1) == viz.sample_across_classes(labels, seed=1)
    with pytest.raises(ValueError, match="per_class"):
        viz.sample_across_classes(labels, per_class=0)


def test_attention_grid_titles_colorbar_and_part_outline(tmp_path):
    import cmd
    from cmd.data import SyntheticFineGrained

    data = SyntheticFineGrained(n_classes=4, n_per_class=3, image_size=32, split="test", return_part_mask=True)
    idx = viz.sample_across_classes(data.targets, per_class=1, max_images=4)
    samples = [data[i] for i in idx]
    images = torch.stack([torch.tensor(np.array(s[0]), dtype=torch.float32).permute(2, 0, 1) / 255 for s in samples])
    labels = [s[1] for s in samples]
    masks = torch.stack([s[2] for s in samples])
    backbone = cmd.create_backbone("vit_tiny", depth=1, patch_size=8, embed_dim=24, num_heads=2)
    net = cmd.CMDNetwork(backbone, cmd.CrossLevelHead(backbone.embed_dim, out_dim=16, hidden_dim=32, bottleneck_dim=8))
    fig = viz.save_attention_grid(net, images, labels=labels, class_names=data.classes, part_masks=masks, n_cols=2)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles[::2] == [data.classes[y] for y in labels]  # image | overlay ("max 1.4 x 1/N")
    assert all(t.startswith("max ") and t.endswith("x 1/N") for t in titles[1::2])
    assert any(ax.get_label() == "<colorbar>" for ax in fig.axes)
    outlined = [ax for ax in fig.axes if any(type(c).__name__ in ("QuadContourSet", "ContourSet") or
                                             "Contour" in type(c).__name__ for c in ax.collections)]
    assert len(outlined) == 2 * len(idx)  # image and overlay of every sample
    weights, grid = viz.region_weights(net, images)
    bar = next(ax for ax in fig.axes if ax.get_label() == "<colorbar>")
    assert bar.get_ylim()[1] == pytest.approx(float(weights.max()))  # one scale: the batch's largest weight
    uniform = [line for line in bar.lines if np.allclose(line.get_ydata(), 1 / 16)]
    assert uniform, "the uniform level 1/N is not marked on the colorbar"
    legend = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    assert any("part" in t for t in legend) and any("1/N" in t for t in legend)
    viz.save_attention_grid(net, images, tmp_path / "grid.png", labels=labels, part_masks=masks[:, ::2, ::2])
    assert (tmp_path / "grid.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="labels"):
        viz.save_attention_grid(net, images, labels=labels[:2])
    with pytest.raises(ValueError, match="part_masks"):
        viz.save_attention_grid(net, images, part_masks=masks[:2])


def test_logs_written_before_the_terms_rename_are_read(tmp_path):
    """inter_student / inter_teacher / cross (old log.jsonl and steps.csv) are drawn as the new names."""
    log = tmp_path / "log.jsonl"
    log.write_text(json.dumps({"epoch": 1, "loss": 2.1, "image": 4.0, "inter_student": 1.0, "inter_teacher": 7.0}))
    fig = viz.plot_training_log(log, weights={"image": 0.5, "inter_level": 0.1})
    assert {line.get_label() for line in fig.axes[0].lines} == {"loss (total)", "0.5 x image", "0.1 x inter_level"}
    assert [line.get_label() for line in fig.axes[1].lines] == ["inter_level_teacher"]
    csv_path = _write_csv(tmp_path / "steps.csv", "step,loss,inter_student,cross\n1,2.0,1.0,0.5\n2,1.5,0.8,0.4\n")
    labels = [line.get_label() for line in viz.plot_step_curves(csv_path).axes[0].lines]
    assert labels[:3] == ["loss", "inter_level", "swapped"]
