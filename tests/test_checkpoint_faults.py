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
        with pytest.raises(RuntimeError, match=r"corrupted \(entries \[\"student\['0\.weight'\]\"\]"):
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
