"""pretrain --viz: region weights sampled across classes with titles and part outlines, embedding plot."""

from __future__ import annotations

import torch

from cmd import viz
from cmd.cli import pretrain
from tests.examples.test_pretrain import SMALL as PRETRAIN_SMALL


def test_save_visualisations_samples_classes_and_outlines_parts(tiny_run, monkeypatch):
    out, _ = tiny_run
    args = pretrain.parse_args([*PRETRAIN_SMALL, "--output_dir", str(out)])
    teacher = pretrain.build_network(args)
    teacher.load_state_dict(torch.load(out / "checkpoint.pth", weights_only=True)["teacher"])
    seen = {}
    original = viz.save_attention_grid

    def spy(model, images, path, **kwargs):
        seen.update(kwargs, images=images)
        return original(model, images, path, **kwargs)

    monkeypatch.setattr(viz, "save_attention_grid", spy)
    saved = pretrain._save_visualisations(args, teacher, torch.device("cpu"), out)
    assert sorted(seen["labels"]) == [0, 1, 2, 3]  # one image per class, not the first 8 of class 0
    assert "every class" in seen["title"]  # the figure says how the images were chosen
    assert seen["class_names"] == ["class_0", "class_1", "class_2", "class_3"]
    masks = seen["part_masks"]
    assert masks.shape == (4, 32, 32) and masks.dtype == torch.bool and bool(masks.flatten(1).any(1).all())
    names = {p.name for p in saved}
    assert {"training_curves.png", "region_weights.png", "embedding.png"} <= names
    for path in saved:
        assert path.stat().st_size > 1000, path


def test_save_visualisations_without_test_split_uses_train(tmp_path, monkeypatch):
    from PIL import Image

    root = tmp_path / "data"
    for c in ("a", "b", "c"):
        (root / "train" / c).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (32, 32), (40 * i, 60 * ("abc".index(c)), 90)).save(root / "train" / c / f"{i}.png")
    args = pretrain.parse_args([*PRETRAIN_SMALL, "--dataset", "imagefolder", "--data_path", str(root), "--no_knn",
                                "--output_dir", str(tmp_path / "out")])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "log.jsonl").write_text('{"epoch": 1, "step": 1, "loss": 1.0}\n')
    teacher = pretrain.build_network(args)
    monkeypatch.setattr(viz, "plot_embeddings", lambda *a, **k: None)  # 6 points: t-SNE is not the point
    saved = pretrain._save_visualisations(args, teacher, torch.device("cpu"), tmp_path / "out")
    assert (tmp_path / "out" / "region_weights.png") in saved


def test_region_weights_show_every_class_up_to_the_cap_and_say_so(tmp_path, monkeypatch):
    args = pretrain.parse_args([*PRETRAIN_SMALL, "--synthetic_classes", "24", "--synthetic_per_class", "2",
                                "--output_dir", str(tmp_path)])
    (tmp_path / "log.jsonl").write_text('{"epoch": 1, "step": 1, "loss": 1.0}\n')
    teacher = pretrain.build_network(args)
    seen = {}
    monkeypatch.setattr(viz, "save_attention_grid", lambda model, images, path, **kw: seen.update(kw, n=len(images)))
    monkeypatch.setattr(viz, "plot_embeddings", lambda *a, **k: None)
    pretrain._save_visualisations(args, teacher, torch.device("cpu"), tmp_path)
    assert seen["n"] == pretrain._MAX_HEATMAP_CLASSES == len(set(seen["labels"]))
    assert f"{pretrain._MAX_HEATMAP_CLASSES} of 24 classes" in seen["title"]
