"""Detect corrupted checkpoint files: the zip's CRC-32 of every member, and per-tensor checksums.

``torch.save`` writes a zip archive whose members (``data.pkl``, one ``data/<n>`` per storage, ...)
each carry a CRC-32, but ``torch.load`` never checks them, so a flipped byte inside tensor data
loads silently as a changed weight. `corrupt_member` checks them all (it reads the whole file
once: about as long as reading it from disk, ~1 s per GB). To say *which* tensor a corrupted
``data/<n>`` member holds, `tensor_checksums` records a CRC-32 of every tensor's bytes at save
time (a nested path such as ``student['head.weight']`` -> checksum) and `mismatched_tensors`
compares them after loading.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch

__all__ = ["corrupt_member", "tensor_checksums", "mismatched_tensors"]

_CHUNK = 1 << 22


def corrupt_member(path: str | os.PathLike) -> str | None:
    """The first member of a ``torch.save`` zip file whose CRC-32 does not match, or None.

    Returns None for files that are not zip archives (legacy ``torch.save`` format, safetensors):
    those are not checked. A damaged archive structure is reported as ``"<zip structure: ...>"``.
    """
    try:
        if not zipfile.is_zipfile(path):
            return None
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                try:
                    with archive.open(info) as member:
                        while member.read(_CHUNK):
                            pass
                except zipfile.BadZipFile:
                    return info.filename
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as err:
        return f"<zip structure: {type(err).__name__}: {err}>"
    return None


def _tensors(obj: Any, where: str) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        yield where, obj
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            yield from _tensors(value, f"{where}[{key!r}]")
    elif isinstance(obj, (list, tuple)):
        for index, value in enumerate(obj):
            yield from _tensors(value, f"{where}[{index}]")


def _crc(tensor: torch.Tensor) -> int | None:
    if tensor.layout != torch.strided or tensor.is_quantized or tensor.device.type == "meta":
        return None
    data = tensor.detach().to("cpu").contiguous().reshape(-1)
    if data.numel() == 0:
        return 0
    return zlib.crc32(data.view(torch.uint8).numpy())


def tensor_checksums(payload: Mapping[str, Any]) -> dict[str, int]:
    """CRC-32 of the bytes of every (dense) tensor in ``payload``, keyed by its path, e.g. ``student['w']``."""
    out = {}
    for key, value in payload.items():
        for where, tensor in _tensors(value, str(key)):
            crc = _crc(tensor)
            if crc is not None:
                out[where] = crc
    return out


def mismatched_tensors(payload: Mapping[str, Any], checksums: Any) -> list[str]:
    """Paths of the tensors of ``payload`` whose bytes differ from ``checksums`` (or that are missing)."""
    if not isinstance(checksums, Mapping):
        return []
    found = {}
    for key, value in payload.items():
        if key != "checksums":
            for where, tensor in _tensors(value, str(key)):
                found[where] = tensor
    bad = []
    for where, expected in checksums.items():
        tensor = found.get(where)
        if tensor is None or _crc(tensor) != expected:
            bad.append(str(where))
    return bad


_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


def is_raw_pickle(path: str | os.PathLike) -> bool:
    """True for a file written by ``pickle.dump`` (not ``torch.save``): ``torch.load(weights_only=True)``
    refuses those whatever they hold, with an obscure "Unsupported operand" message."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(_LEGACY_TORCH_MAGIC))
    except OSError:
        return False
    return head.startswith(b"\x80") and head != _LEGACY_TORCH_MAGIC and not zipfile.is_zipfile(path)
