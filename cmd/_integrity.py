"""Detect corrupted checkpoint files: the zip's CRC-32 of every member, and per-tensor checksums.

``torch.save`` writes a zip archive whose members (``data.pkl``, one ``data/<n>`` per storage, ...)
each carry a CRC-32, but ``torch.load`` never checks them, so a flipped byte inside tensor data
loads silently as a changed weight. `corrupt_member` checks them all (it reads the whole file
once: about as long as reading it from disk, ~1 s per GB). `tensor_checksums` records a CRC-32
of every tensor's bytes at save time (a nested path such as ``student['head.weight']`` -> checksum)
and `mismatched_tensors` compares them after loading: that names the tensor a corrupted ``data/<n>``
member holds, and it catches what the zip CRC-32s cannot, a tensor whose data was replaced (e.g. by
another checkpoint's) in a zip re-written with valid CRC-32s.

`check_loaded` is what every reader calls after ``torch.load``: when the file stores checksums, every
tensor is compared with them and only the small members (``data.pkl``, ``version``, ...) are checked
by their zip CRC-32 (the tensor checksums cover the tensor data: no second read of the weights);
without checksums every member's zip CRC-32 is checked. Cost, measured by
``benchmarks/checkpoint_verify.py``: see ``docs/blocks/checkpoints.md``.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Damage", "check_loaded", "corrupt_member", "tensor_checksums", "mismatched_tensors"]

_CHUNK = 1 << 22


def _is_tensor_data(name: str) -> bool:
    """True for the ``<archive>/data/<n>`` members of a ``torch.save`` zip (one per storage)."""
    parts = name.split("/")
    return len(parts) == 3 and parts[1] == "data"


def corrupt_member(path: str | os.PathLike, *, tensor_data: bool = True) -> str | None:
    """The first member of a ``torch.save`` zip file whose CRC-32 does not match, or None.

    Returns None for files that are not zip archives (legacy ``torch.save`` format, safetensors):
    those are not checked. A damaged archive structure is reported as ``"<zip structure: ...>"``.
    ``tensor_data=False`` skips the ``data/<n>`` members (the storages), for files whose tensors are
    verified against stored checksums instead.
    """
    try:
        if not zipfile.is_zipfile(path):
            return None
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if not tensor_data and _is_tensor_data(info.filename):
                    continue
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


def _crc_applies(tensor: torch.Tensor) -> bool:
    return tensor.layout == torch.strided and not tensor.is_quantized and tensor.device.type != "meta"


def _crc(tensor: torch.Tensor) -> int | None:
    if not _crc_applies(tensor):
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


@dataclass(frozen=True)
class Damage:
    """Why a loaded checkpoint cannot be trusted.

    Attributes:
        entries: tensors (``student['head.weight']``) whose bytes differ from the stored checksums.
        member: the first zip member failing its CRC-32 (or ``"<zip structure: ...>"``), else None.
    """

    entries: list[str]
    member: str | None

    def describe(self, shown: int = 25) -> str:
        """The entries and the member, e.g. ``"corrupted entries [student['w']] (zip member a/data/0 fails
        its CRC-32 check)"``; when every member passes its CRC-32, says the data was replaced."""
        listed = ", ".join(self.entries[:shown])
        more = f", ... ({len(self.entries)} in all)" if len(self.entries) > shown else ""
        text = f"corrupted entries [{listed}{more}] " if self.entries else ""
        if self.member is not None:
            return text + f"(zip member {self.member} fails its CRC-32 check)"
        return text + (
            "(their bytes differ from the checksums stored in the file, although every zip member passes its "
            "CRC-32 check: the data was replaced after saving, e.g. by another checkpoint's tensor)"
        )


def check_loaded(path: str | os.PathLike, obj: Any) -> Damage | None:
    """Verify what ``torch.load(path)`` returned: stored per-tensor checksums, and zip CRC-32s.

    With a ``checksums`` entry (written by `cmd.save_checkpoint`), every tensor listed there is
    compared with its checksum and the members other than the tensor data are checked by their
    CRC-32 (all members when a tensor is missing from the checksums, or one differs, to name the
    damaged member); without one, every member is checked by its CRC-32. Returns None when all agree.

    Example:
        >>> import tempfile, torch
        >>> with tempfile.TemporaryDirectory() as d:
        ...     payload = {"w": torch.ones(3)}
        ...     payload["checksums"] = tensor_checksums(payload)
        ...     torch.save(payload, f"{d}/a.pt")
        ...     loaded = torch.load(f"{d}/a.pt", weights_only=True)
        ...     ok = check_loaded(f"{d}/a.pt", loaded)
        ...     loaded["w"][0] = 2.0
        ...     bad = check_loaded(f"{d}/a.pt", loaded)
        >>> ok is None, bad.entries
        (True, ['w'])
    """
    checksums = obj.get("checksums") if isinstance(obj, Mapping) else None
    if not isinstance(checksums, Mapping) or not checksums:
        member = corrupt_member(path)
        return None if member is None else Damage([], member)
    entries = mismatched_tensors(obj, checksums)
    covered = not entries and all(
        where in checksums
        for key, value in obj.items()
        if key != "checksums"
        for where, tensor in _tensors(value, str(key))
        if _crc_applies(tensor)
    )
    member = corrupt_member(path, tensor_data=not covered)
    if not entries and member is None:
        return None
    return Damage(entries, member)


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
