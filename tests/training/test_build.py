"""cmd.training.build: a loop built from a recipe with the library's blocks trains as ``cmd-fgvc pretrain``.

The reference is the program itself (one epoch, tiny settings): after it, the loop's teacher and
student equal the checkpoint's bit for bit (same initial weights, data order, crops, loss,
optimiser and schedules).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from types import SimpleNamespace

import pytest
import torch

import cmd
from cmd import training

TINY = dict(arch="vit_tiny", backbone_kwargs={"depth": 1, "patch_size": 8, "embed_dim": 48, "num_heads": 3},
            out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16, local_crops_number=2, global_size=32,
            local_size=16, batch_size_per_gpu=8, epochs=2)
DATA = dict(n_classes=4, n_per_class=8, image_size=32, difficulty="demo")


def _flags(cfg) -> list[str]:
    """The program's command line for the config's values (every option the builders read)."""
    names = ["arch", "out_dim", "head_hidden_dim", "head_bottleneck_dim", "norm_last_layer", "mil_pooling",
             "image_input", "head_bn", "share_prototypes", "loss", "teacher_temp", "warmup_teacher_temp",
             "warmup_teacher_temp_epochs", "student_temp", "center_momentum", "centering", "koleo_weight", "epochs",
             "batch_size_per_gpu", "lr", "min_lr", "warmup_epochs", "weight_decay", "weight_decay_end",
             "momentum_teacher", "clip_grad", "freeze_last_layer", "global_size", "local_size", "local_crops_number"]
    flags = ["--backbone_kwargs", json.dumps(cfg.backbone_kwargs)]
    for name in names:
        flags += [f"--{name}", str(getattr(cfg, name)).lower() if isinstance(getattr(cfg, name), bool)
                  else str(getattr(cfg, name))]
    flags += ["--global_crops_scale", *map(str, cfg.global_crops_scale)]
    flags += ["--local_crops_scale", *map(str, cfg.local_crops_scale)]
    return flags


def _library_loop(cfg, seed: int, epochs_run: int):
    torch.manual_seed(seed)
    data = cmd.SyntheticFineGrained(split="train", seed=seed, **DATA)
    loader = training.build_train_loader(cfg, data, seed=seed)
    iters = len(loader)
    criterion = training.build_loss(cfg)
    student = training.build_network(cfg, outputs=criterion.student_outputs)
    ema = training.build_teacher(cfg, student, total_steps=cfg.epochs * iters)
    optimizer = training.build_optimizer(cfg, student)
    lrs, wds = training.build_schedules(cfg, iters)
    torch.manual_seed(seed)
    loader.sampler.set_epochs(0, epochs_run)
    batches, step = iter(loader), 0
    for epoch in range(epochs_run):
        for crops, _ in itertools.islice(batches, iters):
            cmd.set_schedules(optimizer, lr=float(lrs[step]), weight_decay=float(wds[step]))
            with torch.no_grad():
                t_out = ema.teacher(crops[:2], outputs=criterion.teacher_outputs)
            out = criterion(student(crops, outputs=criterion.student_outputs), t_out, epoch)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            cmd.clip_gradients(student, cfg.clip_grad)
            cmd.cancel_last_layer_gradients(student, epoch, cfg.freeze_last_layer)
            optimizer.step()
            ema.update(student)
            step += 1
    return student, ema.teacher


@pytest.mark.slow
def test_recipe_loop_equals_the_program_bit_for_bit(tmp_path):
    from cmd.checkpoint import read_checkpoint
    from cmd.cli import pretrain

    cfg = dataclasses.replace(cmd.recipes.get("demo"), **TINY)
    argv = [*_flags(cfg), "--synthetic_classes", "4", "--synthetic_per_class", "8", "--synthetic_image_size", "32",
            "--synthetic_difficulty", "demo", "--seed", "0", "--num_workers", "0", "--no_knn", "--no_progress",
            "--logger", "none", "--max_steps", "4", "--output_dir", str(tmp_path)]  # one epoch of 4 steps
    pretrain.main(argv)
    saved = read_checkpoint(tmp_path / "checkpoint.pth")
    student, teacher = _library_loop(cfg, seed=0, epochs_run=1)
    for name, state in (("student", student.state_dict()), ("teacher", teacher.state_dict())):
        assert state.keys() == saved[name].keys()
        for key, value in state.items():
            assert torch.equal(value, saved[name][key]), f"{name}.{key}"


def test_builders_read_the_recipe():
    cfg = dataclasses.replace(cmd.recipes.get("demo"), **TINY)
    loss = training.build_loss(cfg)
    assert loss.out_dim == cfg.out_dim and loss.teacher_temperature(0) == pytest.approx(cfg.teacher_temp)
    net = training.build_network(cfg, outputs=loss.student_outputs)
    assert net.head.pooling is not None
    lr, wd = training.build_schedules(cfg, iters_per_epoch=5, world_size=2)
    assert len(lr) == cfg.epochs * 5
    assert lr.max() == pytest.approx(cfg.lr * cfg.batch_size_per_gpu * 2 / 256)  # scaled by the total batch
    assert wd[0] == pytest.approx(cfg.weight_decay)
    opt = training.build_optimizer(cfg, net)
    decayed = [g for g in opt.param_groups if g["weight_decay"] > 0]
    assert decayed and len(opt.param_groups) == 2


def test_drop_path_goes_to_the_student_only():
    cfg = dataclasses.replace(cmd.recipes.get("demo"), **{**TINY, "backbone_kwargs": {**TINY["backbone_kwargs"],
                                                                                       "depth": 2}}, drop_path=0.2)
    student = training.build_network(cfg)
    ema = training.build_teacher(cfg, student, total_steps=10)
    assert [m.drop_prob for m in student.modules() if type(m).__name__ == "DropPath"]
    assert all(m.drop_prob == 0 for m in ema.teacher.modules() if type(m).__name__ == "DropPath")


def test_build_data_and_loader_errors():
    opts = SimpleNamespace(dataset="cub", data_path=None)
    with pytest.raises(ValueError, match="data_path is required"):
        training.build_data(opts, "train")
    cfg = dataclasses.replace(cmd.recipes.get("demo"), **TINY)
    with pytest.raises(ValueError, match="smaller than one batch"):
        training.build_train_loader(cfg, [(torch.zeros(3, 8, 8), 0)] * 3, seed=0)
