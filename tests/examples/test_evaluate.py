"""examples/evaluate.py knn | linear | retrieval on the synthetic data."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SMALL = [
    "--synthetic_classes", "3", "--synthetic_per_class", "6", "--synthetic_image_size", "32",
    "--arch", "vit_tiny", "--backbone_kwargs", '{"depth": 1, "patch_size": 8, "embed_dim": 24, "num_heads": 2}',
    "--batch_size_per_gpu", "8", "--no_progress",
]


@pytest.fixture(scope="module")
def evaluate():
    spec = importlib.util.spec_from_file_location("evaluate_example", REPO / "examples" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    import cmd

    torch.manual_seed(1)
    backbone = cmd.create_backbone("vit_tiny", depth=1, patch_size=8, embed_dim=24, num_heads=2)
    path = tmp_path_factory.mktemp("w") / "backbone.pth"
    torch.save(backbone.model.state_dict(), path)  # a plain timm state dict
    return path


def test_knn_with_dump_and_reload(evaluate, weights, tmp_path):
    feats = tmp_path / "feats"
    res = evaluate.main(["knn", *SMALL, "--pretrained_weights", str(weights), "--nb_knn", "1", "5",
                         "--output_dir", str(tmp_path), "--dump_features", str(feats)])
    assert set(res) == {"k=1", "k=5"} and 0 <= res["k=5"]["top1"] <= 100
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["protocol"] == "knn" and saved["results"]["k=5"]["top1"] == res["k=5"]["top1"]
    again = evaluate.main(["knn", *SMALL, "--nb_knn", "1", "5", "--output_dir", str(tmp_path),
                           "--load_features", str(feats)])
    assert again == res


def test_retrieval(evaluate, weights, tmp_path):
    res = evaluate.main(["retrieval", *SMALL, "--pretrained_weights", str(weights), "--output_dir", str(tmp_path)])
    for key in ("rank1", "rank5", "mAP@100", "mAP"):
        assert key in res and 0 <= res[key] <= 100, res


def test_linear(evaluate, weights, tmp_path):
    res = evaluate.main(["linear", *SMALL, "--pretrained_weights", str(weights), "--epochs", "2",
                         "--n_last_blocks", "1", "--lrs", "0.01", "0.1", "--cache_features",
                         "--output_dir", str(tmp_path)])
    assert (tmp_path / "results.json").exists()
    assert "best" in json.dumps(res) or "top1" in json.dumps(res)


def test_dino_checkpoint_is_loaded_with_dino_numerics(evaluate, tmp_path, capsys):
    import cmd

    torch.manual_seed(2)
    backbone = cmd.create_backbone("vit_tiny", depth=1, patch_size=8, embed_dim=24, num_heads=2)
    path = tmp_path / "dino.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in backbone.model.state_dict().items()}}, path)
    args = evaluate.build_parser().parse_args(["knn", *SMALL, "--pretrained_weights", str(path)])
    loaded = evaluate.build_backbone(args)
    assert loaded.numerics == "dino"
    assert "dino checkpoint: loaded" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"16 of 18 model tensors would load; 2 shape mismatches.*pos_embed"):
        other = ["--backbone_kwargs", '{"depth": 1, "patch_size": 16, "embed_dim": 24, "num_heads": 2}']
        evaluate.build_backbone(evaluate.build_parser().parse_args(["knn", *SMALL, *other, "--pretrained_weights",
                                                                    str(path)]))
