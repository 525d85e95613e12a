"""Checkpoints: weights_only round trip, RNG states, clear errors, atomic writes under SIGKILL, exact resume."""

from __future__ import annotations

import argparse
import multiprocessing
import os
import pathlib
import random
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from torch import nn

from cmd.checkpoint import (
    CheckpointError,
    read_checkpoint,
    restore_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from cmd.teacher import EMATeacher

REPO = pathlib.Path(__file__).resolve().parents[1]


class Net(nn.Module):
    def __init__(self, width: int = 5) -> None:
        super().__init__()
        self.fc = nn.Linear(3, width)
        self.bn = nn.BatchNorm1d(width)
        self.out = nn.Linear(width, 2)

    def forward(self, x):
        return self.out(self.bn(self.fc(x)))


class Centers(nn.Module):
    """Stands for a loss with centers (buffers), like CMDLoss."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("center", torch.zeros(1, 4))
        self.register_buffer("region_center", torch.zeros(1, 4))


def _train_a_little(model, opt, steps=2):
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(8, 3)).pow(2).mean().backward()
        opt.step()


def test_round_trip_restores_everything(tmp_path):
    model, loss = Net(), Centers()
    ema = EMATeacher(model, total_steps=10)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    _train_a_little(model, opt)
    ema.update(model)
    ema.update(model)
    loss.center.add_(torch.randn(1, 4))
    path = save_checkpoint(
        tmp_path / "sub" / "last.pt",
        student=model, teacher=ema, optimizer=opt, loss=loss, scaler=scaler,
        epoch=np.int64(3), step=6, sampler_epoch=3,
        args=argparse.Namespace(lr=np.float32(0.5), out=pathlib.Path("/x/y"), sizes=np.arange(3), name="cub"),
    )  # fmt: skip
    assert path == tmp_path / "sub" / "last.pt"
    raw = torch.load(path, weights_only=True)  # everything stored loads safely
    assert raw["format"] == "cmd-fgvc" and raw["format_version"] == 1
    assert set(raw["teacher"]) == set(model.state_dict()) and raw["ema"]["step"] == 2

    model2, loss2 = Net(), Centers()
    ema2 = EMATeacher(model2, total_steps=10)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    scaler2 = torch.amp.GradScaler("cpu")
    meta = restore_checkpoint(path, student=model2, teacher=ema2, optimizer=opt2, loss=loss2, scaler=scaler2)
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), name
    for (name, a), b in zip(ema.teacher.state_dict().items(), ema2.teacher.state_dict().values()):
        assert torch.equal(a, b), name
    assert ema2.step == 2 and torch.equal(loss2.center, loss.center)
    assert scaler2.get_scale() == 1024.0
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for k in s1["state"]:
        for field in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(s1["state"][k][field], s2["state"][k][field])
    assert (
        meta["epoch"] == 3 and type(meta["epoch"]) is int and meta["step"] == 6 and meta["sampler_epoch"] == 3
    )
    assert (
        meta["args"]["lr"] == pytest.approx(0.5)
        and meta["args"]["out"] == "/x/y"
        and meta["args"]["name"] == "cub"
    )
    assert torch.equal(meta["args"]["sizes"], torch.arange(3))
    assert not {"format", "format_version", "student", "teacher", "ema", "rng"} & set(meta)


def test_ema_schedule_state_lives_under_ema(tmp_path):
    model = Net()
    ema = EMATeacher(model, total_steps=10)
    for _ in range(4):
        ema.update(model)
    # the state-dict convention: teacher weights and the EMA schedule passed separately
    a = save_checkpoint(tmp_path / "a.pt", teacher=ema.teacher.state_dict(), ema=ema.state_dict())
    b = save_checkpoint(tmp_path / "b.pt", teacher=ema.teacher, ema=ema)  # objects work too
    for path in (a, b):
        fresh = EMATeacher(Net(), total_steps=10)
        meta = restore_checkpoint(path, teacher=fresh.teacher, ema=fresh)
        assert fresh.step == 4 and "ema" not in meta
        assert torch.equal(fresh.teacher.fc.weight, ema.teacher.fc.weight)
    fresh = EMATeacher(Net())
    with pytest.raises(CheckpointError, match="no 'ema' entry"):
        restore_checkpoint(save_checkpoint(tmp_path / "c.pt", teacher=ema.teacher), teacher=fresh)
    with pytest.raises(TypeError, match="EMATeacher"):
        restore_checkpoint(a, ema=ema.teacher)


def test_rng_states_are_restored(tmp_path):
    random.seed(1)
    np.random.seed(2)  # noqa: NPY002
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached gaussian in python's state
    path = save_checkpoint(tmp_path / "c.pt", step=1)
    want = (random.random(), random.gauss(0, 1), np.random.rand(3), torch.rand(3))  # noqa: NPY002
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)  # noqa: NPY002
    restore_checkpoint(path)
    got = (random.random(), random.gauss(0, 1), np.random.rand(3), torch.rand(3))  # noqa: NPY002
    assert got[0] == want[0] and got[1] == want[1]
    assert np.array_equal(got[2], want[2]) and torch.equal(got[3], want[3])
    # restore_rng=False leaves the generators alone
    before = torch.get_rng_state()
    meta = restore_checkpoint(path, restore_rng=False)
    assert torch.equal(torch.get_rng_state(), before) and "rng" in meta
    state = rng_state()
    a = torch.rand(2)
    set_rng_state(state)
    assert torch.equal(a, torch.rand(2))


def test_missing_truncated_and_corrupted_files_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.pt"):
        restore_checkpoint(tmp_path / "nothere.pt")
    good = save_checkpoint(tmp_path / "good.pt", student=Net(), step=1)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.pt"):
        restore_checkpoint(truncated, student=Net())
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint" * 100)
    with pytest.raises(CheckpointError, match="garbage.pt"):
        read_checkpoint(garbage)
    flipped = bytearray(data)
    flipped[len(flipped) // 2 : len(flipped) // 2 + 64] = bytes(64)
    corrupted = tmp_path / "corrupted.pt"
    corrupted.write_bytes(bytes(flipped))
    try:  # zeroed bytes inside a tensor's storage may still load; they must never pass as a good file
        read_checkpoint(corrupted)
    except CheckpointError as e:
        assert "corrupted.pt" in str(e)
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": {}}, foreign)
    with pytest.raises(CheckpointError, match="foreign.pt is not a cmd-fgvc checkpoint"):
        read_checkpoint(foreign)
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"format": "cmd-fgvc", "format_version": 1, "obj": argparse.Namespace(a=1)}, unsafe)
    with pytest.raises(CheckpointError, match="unsafe.pt.*weights_only"):
        read_checkpoint(unsafe)
    with pytest.warns(UserWarning, match="weights_only=False.*arbitrary code"):
        assert read_checkpoint(unsafe, weights_only=False)["obj"].a == 1  # explicit opt-out
    newer = tmp_path / "newer.pt"
    torch.save({"format": "cmd-fgvc", "format_version": 2}, newer)
    with pytest.raises(CheckpointError, match="format_version 2"):
        read_checkpoint(newer)


def test_key_mismatch_lists_missing_and_unexpected(tmp_path):
    path = save_checkpoint(
        tmp_path / "c.pt", student=Net(), optimizer=torch.optim.SGD(Net().parameters(), lr=1)
    )

    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 5)
            self.extra = nn.Linear(2, 2)

    with pytest.raises(CheckpointError) as info:
        restore_checkpoint(path, student=Other())
    message = str(info.value)
    assert "c.pt" in message and "missing keys [extra.weight, extra.bias]" in message
    assert "unexpected keys [bn.weight, bn.bias, bn.running_mean" in message and "out.weight" in message
    other = Other()
    with pytest.warns(UserWarning, match="missing keys"):
        restore_checkpoint(path, student=other, strict=False)
    assert torch.equal(other.fc.weight, torch.load(path, weights_only=True)["student"]["fc.weight"])
    with pytest.raises(CheckpointError, match="(?s)cannot load 'student' into Net.*size mismatch"):
        restore_checkpoint(path, student=Net(width=7))
    with pytest.raises(CheckpointError, match="no 'teacher' entry"):
        restore_checkpoint(path, teacher=Net())
    with pytest.warns(UserWarning, match="no 'loss' entry"):
        restore_checkpoint(path, loss=Centers(), strict=False)
    with pytest.raises(CheckpointError, match="cannot load 'optimizer'"):
        restore_checkpoint(path, optimizer=torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1))


def test_wrapped_modules_and_prefixed_state_dicts(tmp_path):
    model = Net()
    prefixed = {f"module.{k}": v for k, v in model.state_dict().items()}
    path = save_checkpoint(tmp_path / "c.pt", student=prefixed, teacher=model)
    fresh = Net()
    restore_checkpoint(path, student=fresh)  # "module." prefix of a DDP state dict is removed
    assert torch.equal(fresh.fc.weight, model.fc.weight)
    assert set(torch.load(path, weights_only=True)["teacher"]) == set(model.state_dict())


def test_unstorable_values_and_reserved_keys(tmp_path):
    with pytest.raises(TypeError, match=r"args\['fn'\]"):
        save_checkpoint(tmp_path / "c.pt", args={"fn": lambda x: x})
    with pytest.raises(TypeError, match="object"):
        save_checkpoint(tmp_path / "c.pt", data=np.array([object()]))
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(tmp_path / "c.pt", format="mine")
    assert not list(tmp_path.iterdir())  # nothing written


def test_failed_save_keeps_previous_and_leaves_no_temp(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "c.pt", step=1)
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, step=2)
    monkeypatch.undo()
    assert restore_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_stale_temporary_files_of_dead_writers_are_removed(tmp_path):
    host = socket.gethostname().replace(".", "_").replace("-", "_")
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".c.pt.tmp-{host}-{dead_pid}-abc"
    alive = tmp_path / f".c.pt.tmp-{host}-{os.getppid()}-abc"
    other = tmp_path / f".other.pt.tmp-{host}-{dead_pid}-abc"
    for f in (stale, alive, other):
        f.write_bytes(b"partial")
    save_checkpoint(tmp_path / "c.pt", step=1)
    assert not stale.exists() and alive.exists() and other.exists()


# ------------------------------------------------------------------ atomicity under SIGKILL (20 kills)
_BLOB_ELEMENTS = 1_000_000  # 4 MB per checkpoint


def _save_forever(path: str, first_step: int, blobs: list[torch.Tensor]) -> None:
    step = first_step
    while True:
        k = step % len(blobs)
        save_checkpoint(path, step=step, kind=k, blob=blobs[k], rng={})
        step += 1


@pytest.mark.slow
def test_sigkill_during_saves_never_loses_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    blobs = [torch.full((_BLOB_ELEMENTS,), float(k)) for k in range(3)]  # made before forking
    save_checkpoint(path, step=0, kind=0, blob=blobs[0], rng={})
    ctx = multiprocessing.get_context("fork")
    delays = random.Random(0)
    last_step, killed_mid_write = 0, 0
    start = time.monotonic()
    for _ in range(20):
        child = ctx.Process(target=_save_forever, args=(str(path), last_step + 1, blobs), daemon=True)
        child.start()
        time.sleep(delays.uniform(0.01, 0.25))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        assert child.exitcode == -signal.SIGKILL
        killed_mid_write += any(p.name.startswith(".last.pt.tmp-") for p in tmp_path.iterdir())
        ckpt = restore_checkpoint(path, restore_rng=False)  # must always load, complete
        assert ckpt["step"] >= last_step
        assert ckpt["blob"].shape == (_BLOB_ELEMENTS,) and torch.all(ckpt["blob"] == float(ckpt["kind"]))
        assert ckpt["kind"] == ckpt["step"] % 3
        last_step = ckpt["step"]
    assert last_step > 0  # the children did write
    assert killed_mid_write >= 1, "no kill landed inside a save: the test did not exercise the race"
    assert time.monotonic() - start < 60


# ------------------------------------------------ exact resume: 6 steps == 3 + checkpoint + fresh process + 3
def _cmd_available() -> bool:
    try:
        import cmd

        cmd.CMDLoss  # noqa: B018 - being written concurrently: the resume test needs it
        cmd.CrossLevelHead  # noqa: B018
    except (AttributeError, ImportError):
        return False
    return True


class _PatchBackbone(nn.Module):
    """A tiny backbone: 4x4 patches -> conv -> BatchNorm -> dropout tokens [B, N, D], pooled = token mean."""

    def __init__(self, dim: int = 12) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, kernel_size=4, stride=4)
        self.norm = nn.BatchNorm2d(dim)
        self.drop = nn.Dropout(0.1)  # consumes torch's RNG
        self.num_features = dim

    def forward_multicrop(self, crops):
        from itertools import groupby

        from cmd.backbones.output import BackboneOutput

        outs = []
        for (h, w), group in groupby(crops, key=lambda c: tuple(c.shape[-2:])):
            x = self.norm(self.embed(torch.cat(list(group))))
            tokens = self.drop(x.flatten(2).transpose(1, 2))
            outs.append(BackboneOutput(tokens.mean(1), tokens, (h // 4, w // 4)))
        return outs


class _Images(torch.utils.data.Dataset):
    def __init__(self, n: int, augmentation) -> None:
        g = torch.Generator().manual_seed(1234)
        self.images = torch.randint(0, 256, (n, 3, 24, 24), generator=g, dtype=torch.uint8)
        self.augmentation = augmentation

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return self.augmentation(self.images[i]), i


_EPOCHS, _BATCH, _N_IMAGES = 2, 4, 12  # 3 steps per epoch


def _training_setup(seed: int) -> dict:
    import cmd

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    np.random.seed(seed)  # noqa: NPY002
    random.seed(seed)
    head = cmd.CrossLevelHead(12, out_dim=16, pooling="attention", hidden_dim=16, bottleneck_dim=8)
    student = cmd.CMDNetwork(_PatchBackbone(12), head)
    iters = _N_IMAGES // _BATCH
    ema = cmd.EMATeacher(student, momentum=0.9, total_steps=_EPOCHS * iters)
    loss = cmd.CMDLoss.from_preset(
        "cmd", out_dim=16, n_global_crops=2, n_local_crops=2, warmup_teacher_temp_epochs=1
    )
    optimizer = torch.optim.AdamW(cmd.param_groups(student, weight_decay=0.04))
    augmentation = cmd.MultiCropAugmentation(global_size=16, local_size=8, n_global=2, n_local=2)
    loader = torch.utils.data.DataLoader(
        _Images(_N_IMAGES, augmentation), batch_size=_BATCH, shuffle=True, collate_fn=cmd.multicrop_collate
    )
    return {
        "student": student,
        "ema": ema,
        "loss": loss,
        "optimizer": optimizer,
        "precision": cmd.mixed_precision("cpu"),
        "loader": loader,
        "lr": cmd.cosine_schedule(cmd.scale_lr(5e-3, _BATCH), 1e-5, _EPOCHS, iters, warmup_epochs=1),
        "wd": cmd.cosine_schedule(0.04, 0.4, _EPOCHS, iters),
    }


def _train_epochs(run: dict, epochs: range) -> None:
    import cmd

    student, ema, criterion, optimizer, mp = (
        run[k] for k in ("student", "ema", "loss", "optimizer", "precision")
    )
    iters = len(run["loader"])
    for epoch in epochs:
        for i, (crops, _) in enumerate(run["loader"]):  # the shuffle order comes from torch's RNG
            step = epoch * iters + i
            cmd.set_schedules(optimizer, run["lr"][step], run["wd"][step])
            crops = [c * (1 + 0.01 * random.random()) + 0.01 * float(np.random.randn()) for c in crops]  # noqa: NPY002
            with mp.autocast():
                with torch.no_grad():
                    teacher_out = ema.teacher(crops[:2])
                out = criterion(student(crops), teacher_out, epoch)
            optimizer.zero_grad(set_to_none=True)
            mp.backward(out.loss)
            mp.unscale_(optimizer)
            cmd.clip_gradients(student, 0.5)
            cmd.cancel_last_layer_gradients(student, epoch, 1)
            mp.step(optimizer)
            ema.update(student)


def _final_state(run: dict) -> dict:
    return {
        "student": run["student"].state_dict(),
        "teacher": run["ema"].teacher.state_dict(),
        "ema": run["ema"].state_dict(),
        "loss": run["loss"].state_dict(),
        "optimizer": run["optimizer"].state_dict(),
        "rng": {"torch": torch.get_rng_state(), "numpy": float(np.random.rand()), "python": random.random()},  # noqa: NPY002
    }


def _resume_in_fresh_process(checkpoint: str, out: str) -> None:
    """Entry point of the child process: restore into differently seeded objects, train 1 epoch, save."""
    run = _training_setup(seed=999)
    meta = restore_checkpoint(
        checkpoint,
        student=run["student"],
        teacher=run["ema"],
        optimizer=run["optimizer"],
        loss=run["loss"],
        scaler=run["precision"].scaler,
    )
    _train_epochs(run, range(meta["epoch"], _EPOCHS))
    torch.save(_final_state(run), out)


def _assert_same(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.slow
@pytest.mark.skipif(not _cmd_available(), reason="needs cmd.CMDLoss and cmd.CrossLevelHead")
def test_resume_in_a_fresh_process_is_bit_exact(tmp_path):
    threads = torch.get_num_threads()
    try:
        uninterrupted = _training_setup(seed=0)
        _train_epochs(uninterrupted, range(_EPOCHS))
        want = _final_state(uninterrupted)

        first_half = _training_setup(seed=0)
        _train_epochs(first_half, range(1))
        centers_after_epoch_0 = {k: v.clone() for k, v in first_half["loss"].state_dict().items()}
        save_checkpoint(
            tmp_path / "ckpt.pt",
            student=first_half["student"],
            teacher=first_half["ema"],
            optimizer=first_half["optimizer"],
            loss=first_half["loss"],
            scaler=first_half["precision"].scaler,
            epoch=1,
            step=len(first_half["loader"]),
            sampler_epoch=1,
        )
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "resumed.pt"
    code = "import sys; from tests.test_checkpoint import _resume_in_fresh_process as f; f(sys.argv[1], sys.argv[2])"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "ckpt.pt"), str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(out, weights_only=True)
    assert got["ema"]["step"] == want["ema"]["step"] == 6
    assert any(not torch.equal(v, centers_after_epoch_0[k]) for k, v in want["loss"].items()), (
        "centers must move"
    )
    assert any(torch.count_nonzero(v) for v in centers_after_epoch_0.values())
    _assert_same(want, got, "state")
