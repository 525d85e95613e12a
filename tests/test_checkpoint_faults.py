"""Checkpoints under faults: flipped bytes, a full disk, foreign and pickled files (issue 15)."""

from __future__ import annotations

import argparse
import errno
import os
import pickle
import struct
import zipfile

import numpy as np
import pytest
import torch

from cmd.backbones.checkpoints import read_checkpoint_file
from cmd.checkpoint import CheckpointError, read_checkpoint, restore_checkpoint, save_checkpoint


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _member_data_offsets(path) -> dict[str, tuple[int, int]]:
    """member name -> (offset of its data in the file, size)."""
    out = {}
    with zipfile.ZipFile(path) as archive, open(path, "rb") as f:
        for info in archive.infolist():
            f.seek(info.header_offset)
            header = f.read(30)
            name_len, extra_len = struct.unpack("<HH", header[26:30])
            out[info.filename] = (info.header_offset + 30 + name_len + extra_len, info.file_size)
    return out


@pytest.fixture
def good_checkpoint(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.LayerNorm(64))
    path = save_checkpoint(tmp_path / "good.pt", student=net, epoch=3, args={"lr": 5e-4})
    return path, torch.load(path, weights_only=True)


def test_random_byte_flips_are_rejected_or_harmless(good_checkpoint, tmp_path):
    """Issue 15 item 3: 0 of 40 flips used to be rejected and 16 silently changed weights."""
    path, original = good_checkpoint
    data = path.read_bytes()
    rng = np.random.default_rng(0)
    rejected = 0
    for trial in range(60):
        flipped = bytearray(data)
        pos = int(rng.integers(len(data)))
        flipped[pos] ^= int(rng.integers(1, 256))
        bad = tmp_path / f"flip{trial}.pt"
        bad.write_bytes(bytes(flipped))
        try:
            loaded = read_checkpoint(bad)
        except CheckpointError as err:
            assert "flip" in str(err)
            rejected += 1
            continue
        assert _same(loaded, original), f"byte {pos} changed the checkpoint silently"
    print(f"{rejected} of 60 flips rejected")
    assert rejected >= 50  # nearly every byte of the file is covered by a CRC-32


def test_a_flip_in_tensor_data_names_the_entry(good_checkpoint, tmp_path):
    path, original = good_checkpoint
    data = path.read_bytes()
    offsets = _member_data_offsets(path)
    weight = original["student"]["0.weight"]
    member = next(n for n, (_, size) in offsets.items() if "/data/" in n and size == weight.numel() * 4)
    start, size = offsets[member]
    for pos in (start, start + size // 2, start + size - 1):
        flipped = bytearray(data)
        flipped[pos] ^= 0x10
        bad = tmp_path / "bad.pt"
        bad.write_bytes(bytes(flipped))
        with pytest.raises(CheckpointError, match=r"bad\.pt is corrupted: corrupted entries \[student\['0\.weight'\]\]"):
            read_checkpoint(bad)
        with pytest.raises(CheckpointError, match="corrupted"):
            restore_checkpoint(bad, student=torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.LayerNorm(64)))
        with pytest.raises(RuntimeError, match=r"corrupted: corrupted entries \[student\['0\.weight'\]\]"):
            read_checkpoint_file(bad)


def test_checkpoints_without_checksums_still_load_and_are_still_checked(tmp_path):
    old = tmp_path / "old.pt"
    torch.save({"format": "cmd-fgvc", "format_version": 1, "student": {"w": torch.arange(256.0)}, "epoch": 2}, old)
    assert read_checkpoint(old)["epoch"] == 2
    start, size = _member_data_offsets(old)["old/data/0"]
    flipped = bytearray(old.read_bytes())
    flipped[start + 7] ^= 1
    old.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match=r"old\.pt is corrupted: \(zip member old/data/0 fails its CRC-32"):
        read_checkpoint(old)


def _swap_tensor_data(target, donor, tensor, out) -> str:
    """``target`` with the zip member holding ``tensor`` replaced by ``donor``'s, re-written with valid CRC-32s."""
    with zipfile.ZipFile(target) as a, zipfile.ZipFile(donor) as b, zipfile.ZipFile(out, "w") as new:
        wanted = tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        member = next(n for n in a.namelist() if "/data/" in n and a.read(n) == wanted)
        for info in a.infolist():
            donor_name = b.namelist()[0].split("/")[0] + "/" + info.filename.split("/", 1)[1]
            data = b.read(donor_name) if info.filename == member else a.read(info)
            new.writestr(info.filename, data, compress_type=zipfile.ZIP_STORED)
    return member


def test_a_tensor_swapped_between_checkpoints_is_refused_naming_the_entry(tmp_path):
    """Issue 24 item 2: the swapped file passed every zip CRC-32 and used to load (evaluate knn exited 0)."""
    from cmd.backbones import create_backbone, load_checkpoint

    def network(seed):
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16))

    a = save_checkpoint(tmp_path / "a.pt", student=network(0), epoch=1)
    b = save_checkpoint(tmp_path / "b.pt", student=network(1), epoch=1)
    swapped = tmp_path / "swapped.pt"
    weight = torch.load(a, weights_only=True)["student"]["0.weight"]
    _swap_tensor_data(a, b, weight, swapped)
    loaded = torch.load(swapped, weights_only=True)  # a valid zip: torch.load itself accepts it
    assert not torch.equal(loaded["student"]["0.weight"], weight)
    with zipfile.ZipFile(swapped) as archive:
        assert archive.testzip() is None  # every CRC-32 is valid
    entry = r"corrupted entries \[student\['0\.weight'\]\] \(.*data was replaced"
    with pytest.raises(CheckpointError, match=rf"swapped\.pt is corrupted: {entry}"):
        read_checkpoint(swapped)
    with pytest.raises(CheckpointError, match=entry):
        restore_checkpoint(swapped, student=network(2))
    with pytest.raises(RuntimeError, match=rf"swapped\.pt.*corrupted: {entry}"):
        read_checkpoint_file(swapped)  # what `evaluate` and cmd.load_checkpoint read files with
    # the same through a backbone checkpoint, as `cmd-fgvc evaluate knn` reads it
    bb = create_backbone("vit_tiny", depth=1, embed_dim=16, num_heads=1, img_size=32)
    good = save_checkpoint(tmp_path / "bb.pt", teacher={f"backbone.model.{k}": v for k, v in bb.model.state_dict().items()})
    other = save_checkpoint(tmp_path / "bb2.pt", teacher={
        f"backbone.model.{k}": v + 1 for k, v in bb.model.state_dict().items()})
    _swap_tensor_data(good, other, bb.model.state_dict()["cls_token"], tmp_path / "bb_swapped.pt")
    with pytest.raises(RuntimeError, match=r"corrupted entries \[teacher\['backbone\.model\.cls_token'\]\]"):
        load_checkpoint(bb, tmp_path / "bb_swapped.pt")
    assert load_checkpoint(bb, good).ok  # the intact files load


@pytest.mark.parametrize("failing", ["write", "fsync"])
def test_full_disk_names_enospc_and_the_path_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, failing):
    """Issue 15 item 13: a full disk used to say 'enforce fail at inline_container.cc: unexpected pos'."""
    net = torch.nn.Linear(64, 64)
    path = save_checkpoint(tmp_path / "last.pt", student=net, epoch=1)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, failing, no_space)
    with pytest.raises(OSError, match=r"ENOSPC.*last\.pt.*previous checkpoint .* is unchanged") as info:
        save_checkpoint(path, student=net, epoch=2)
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert read_checkpoint(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_foreign_and_pickled_files_get_plain_messages(tmp_path):
    """Issue 15 item 17: a DINO file is 'not a cmd-fgvc checkpoint', a raw pickle is named as such."""
    dino = tmp_path / "dino.pth"
    weights = {"module.backbone.w": torch.ones(2)}
    torch.save({"teacher": weights, "student": weights, "args": argparse.Namespace(arch="vit_small")}, dino)
    with pytest.raises(CheckpointError, match=r"dino\.pth is not a cmd-fgvc checkpoint.*cmd\.load_checkpoint"):
        restore_checkpoint(dino, student=torch.nn.Linear(2, 2))
    raw = tmp_path / "raw.pkl"
    with open(raw, "wb") as f:
        pickle.dump({"w": [1.0, 2.0]}, f, protocol=4)
    with pytest.raises(CheckpointError, match=r"raw\.pkl.*raw pickle .*weights_only=False"):
        read_checkpoint(raw)
    with pytest.raises(RuntimeError, match=r"raw\.pkl.*raw pickle .*trust_pickle=True"):
        read_checkpoint_file(raw)


def test_restore_with_weights_only_false_warns(tmp_path):
    net = torch.nn.Linear(2, 2)
    path = save_checkpoint(tmp_path / "c.pt", student=net, epoch=1)
    with pytest.warns(UserWarning, match=r"weights_only=False.*arbitrary code"):
        restore_checkpoint(path, student=net, weights_only=False)
