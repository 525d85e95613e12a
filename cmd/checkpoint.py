"""Training checkpoints that survive a crash mid-save and resume a run exactly.

``save_checkpoint(path, **state)`` writes ``{"format": "cmd-fgvc", "format_version": 1, **state}``
atomically: to a temporary file in the same folder, flushed and fsync'ed, then ``os.replace``d over
``path`` (and the folder fsync'ed), so a kill at any moment leaves either the previous checkpoint or
the new one, never a truncated file. ``restore_checkpoint`` loads it with ``weights_only=True`` and
puts everything back: network, EMA teacher (weights and schedule step), optimiser, loss centers,
gradient scaler and the RNG states of python, numpy and torch.

The usual contents, as the training loop passes them::

    save_checkpoint(path, student=model, teacher=ema, optimizer=opt, loss=criterion, scaler=mp.scaler,
                    epoch=epoch + 1, step=step, sampler_epoch=epoch + 1, args=vars(args))
    meta = restore_checkpoint(path, student=model, teacher=ema, optimizer=opt, loss=criterion,
                              scaler=mp.scaler)

Modules, optimisers, scalers and other objects with a ``state_dict()`` are stored as their state dict
(DDP / ``torch.compile`` wrappers removed, so keys are the plain module's: ``backbone.model.<timm key>``,
``head.*``); an [`EMATeacher`][cmd.teacher.EMATeacher] given as ``teacher`` as its teacher's weights under ``teacher``
plus its schedule state (step counter) under ``ema`` (``ema=ema`` or ``ema=ema.state_dict()`` stores
the schedule state alone, with ``teacher=ema.teacher``); the RNG states are added as ``rng`` unless given. Everything stored is made of
tensors, numbers, strings, lists, tuples, dicts and None (numpy arrays become tensors, numpy scalars
Python numbers, paths strings), so it loads with ``weights_only=True``; anything else raises a
TypeError naming its key rather than being dropped.

Exact resume: save at an epoch boundary, restore, then create the next epoch's DataLoader iterator.
The shuffling order (drawn from torch's RNG, or ``DistributedSampler.set_epoch(sampler_epoch)``),
the workers' seeds and the augmentations then repeat the uninterrupted run bit for bit on the same
hardware and thread count. Under ``torch.distributed`` call ``save_checkpoint`` on the main process
only; the RNG states stored are that process's (other ranks resume with rank 0's generators, which
changes their random streams but not the correctness of training).

Example:
    >>> import tempfile, torch
    >>> net = torch.nn.Linear(2, 2)
    >>> with tempfile.TemporaryDirectory() as d:
    ...     _ = save_checkpoint(f"{d}/last.pt", student=net, epoch=3, args={"lr": 5e-4})
    ...     meta = restore_checkpoint(f"{d}/last.pt", student=net)
    >>> meta["epoch"], meta["args"]
    (3, {'lr': 0.0005})
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import errno
import io
import os
import pickle
import random
import re
import socket
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cmd._integrity import check_loaded, corrupt_member, is_raw_pickle, tensor_checksums
from cmd._unwrap import unwrap_model
from cmd.teacher import EMATeacher

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "CheckpointError",
    "save_checkpoint",
    "read_checkpoint",
    "restore_checkpoint",
    "rng_state",
    "set_rng_state",
]

FORMAT = "cmd-fgvc"
FORMAT_VERSION = 1
_RESERVED = ("format", "format_version", "checksums")
_MAX_LISTED = 25


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be read, is not a cmd-fgvc checkpoint, or does not fit what it is loaded into."""


# --------------------------------------------------------------------------------------------- RNG state
def rng_state() -> dict[str, Any]:
    """The RNG states of python's ``random``, numpy's global RNG, torch (CPU) and CUDA (when initialised).

    The result holds only lists, numbers, strings and tensors (it loads with ``weights_only=True``).

    Example:
        >>> import torch
        >>> state = rng_state(); a = torch.rand(2)
        >>> set_rng_state(state); torch.equal(a, torch.rand(2))
        True
    """
    version, internal, gauss_next = random.getstate()
    bit_generator, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)  # noqa: NPY002
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss_next],
        "numpy": {
            "bit_generator": str(bit_generator),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64).copy()),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore RNG states saved by `rng_state` (entries that are absent are left alone).

    CUDA states are restored for as many devices as both the state and this machine have.
    """
    if "python" in state:
        version, internal, gauss_next = state["python"]
        random.setstate((int(version), tuple(int(v) for v in internal), gauss_next))
    if "numpy" in state:
        s = state["numpy"]
        keys = s["keys"].numpy() if isinstance(s["keys"], torch.Tensor) else np.asarray(s["keys"])
        np.random.set_state(  # noqa: NPY002 - the legacy global RNG is what user code seeds
            (
                s["bit_generator"],
                keys.astype(np.uint32),
                int(s["pos"]),
                int(s["has_gauss"]),
                float(s["cached_gaussian"]),
            )
        )
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        for device, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s.cpu(), device)


# -------------------------------------------------------------------------------------------- saving
def _storable(value: Any, where: str) -> Any:
    """``value`` made of weights_only-loadable types; raises TypeError naming ``where`` otherwise."""
    if value is None or isinstance(
        value, (bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size)
    ):
        return value
    if isinstance(value, torch.Tensor):
        if type(value) in (torch.Tensor, nn.Parameter):
            return value
        return value.as_subclass(torch.Tensor)
    if isinstance(value, np.generic):
        return _storable(value.item(), where)
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise TypeError(f"{where}: numpy arrays of dtype object cannot be stored")
        return torch.from_numpy(np.ascontiguousarray(value).copy())
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, argparse.Namespace):
        return _storable(vars(value), where)
    if isinstance(value, nn.Module):
        return _storable(unwrap_model(value).state_dict(), where)
    if isinstance(value, Mapping):
        out = collections.OrderedDict() if isinstance(value, collections.OrderedDict) else {}
        for k, v in value.items():
            key = _storable(k, f"{where} key {k!r}")
            out[key] = _storable(v, f"{where}[{k!r}]")
        metadata = getattr(value, "_metadata", None)  # state dicts carry per-module versions
        if metadata is not None:
            out._metadata = metadata  # type: ignore[attr-defined]
        return out
    if isinstance(value, (list, tuple)):
        items = [_storable(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    state_dict = getattr(value, "state_dict", None)
    if callable(state_dict):  # optimizer, GradScaler, lr scheduler, ...
        return _storable(state_dict(), where)
    raise TypeError(
        f"{where}: cannot store a {type(value).__module__}.{type(value).__qualname__} in a weights_only "
        "checkpoint; pass tensors, numbers, strings, lists, dicts, None or objects with state_dict()"
    )


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.tmp-"


def _temp_name(path: Path) -> Path:
    host = socket.gethostname().replace(".", "_").replace("-", "_")
    return path.with_name(f"{_temp_prefix(path)}{host}-{os.getpid()}-{uuid.uuid4().hex}")


def _remove_stale_temps(path: Path) -> None:
    """Delete temporary files that earlier saves of ``path`` on this host left when their process died."""
    host = socket.gethostname().replace(".", "_").replace("-", "_")
    prefix = _temp_prefix(path)
    with contextlib.suppress(OSError):
        for entry in path.parent.iterdir():
            if not entry.name.startswith(prefix):
                continue
            parts = entry.name[len(prefix) :].split("-")
            if len(parts) != 3 or parts[0] != host or not parts[1].isdigit():
                continue
            pid = int(parts[1])
            if pid == os.getpid():
                continue
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                with contextlib.suppress(OSError):
                    entry.unlink()
            except PermissionError:  # alive, someone else's
                pass


def _fsync_dir(folder: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _RawFile(io.RawIOBase):
    """An unbuffered file written with ``os.write``; remembers the first OSError (torch.save hides it)."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd
        self.error: OSError | None = None

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        try:
            return os.write(self.fd, data)
        except OSError as err:
            self.error = self.error or err
            raise

    def close(self) -> None:
        if not self.closed:
            super().close()
            os.close(self.fd)


def _write_error(err: OSError, path: Path, tmp: Path) -> OSError:
    code = errno.errorcode.get(err.errno or 0, "")
    reason = os.strerror(err.errno) if err.errno else str(err)
    hint = "; free some space (or save elsewhere)" if err.errno in (errno.ENOSPC, errno.EDQUOT) else ""
    return OSError(
        err.errno,
        f"{reason}{f' ({code})' if code else ''} while writing checkpoint {path} (temporary file {tmp.name}, "
        f"removed); any previous checkpoint at {path} is unchanged{hint}",
    )


def save_checkpoint(path: str | os.PathLike, **state: Any) -> Path:
    """Write ``{"format": "cmd-fgvc", "format_version": 1, **state}`` to ``path`` atomically.

    The data goes to a temporary file next to ``path`` (created exclusively, so concurrent writers
    never share one), is flushed and fsync'ed, then replaces ``path`` with ``os.replace`` and the folder
    is fsync'ed: a crash or kill at any moment leaves the previous checkpoint or the new one, complete.
    Temporary files left by writers on this host that have since died are removed. The folder is
    created if needed. See the module docstring for what ``state`` may hold. A CRC-32 of every
    tensor's bytes is stored under ``checksums`` (one pass over the weights, about 1 s per GB on
    the CPU) so that `read_checkpoint` can name a corrupted tensor.

    Args:
        path: the checkpoint file.
        **state: the contents; ``rng`` is added (`rng_state`) unless given.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        TypeError: a value cannot be stored in a weights_only checkpoint (the key is named).
        OSError: the write failed (a full disk gives ``errno.ENOSPC``): the message names the error and
            ``path``; the previous checkpoint at ``path`` is left intact.
        ValueError: ``state`` uses a reserved key ("format", "format_version", "checksums").
    """
    reserved = [k for k in _RESERVED if k in state]
    if reserved:
        raise ValueError(f"save_checkpoint: {reserved} are reserved keys")
    payload: dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION}
    for key, value in state.items():
        if key == "teacher" and isinstance(value, EMATeacher):
            payload["teacher"] = _storable(value.teacher, "teacher")
            if "ema" not in state:
                payload["ema"] = _storable(value.state_dict(), "ema")
        else:
            payload[key] = _storable(value, key)
    if "rng" not in payload:
        payload["rng"] = rng_state()
    payload["checksums"] = tensor_checksums(payload)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    tmp = _temp_name(path)
    raw: _RawFile | None = None
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        raw = _RawFile(fd)
        with io.BufferedWriter(raw, buffer_size=1 << 20) as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(fd)
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        cause = raw.error if raw is not None and raw.error is not None else err
        if isinstance(cause, OSError) and not isinstance(cause, FileExistsError):
            raise _write_error(cause, path, tmp) from err
        raise
    _fsync_dir(path.parent)
    return path


# ------------------------------------------------------------------------------------------- loading
def _load_error(path: Path, err: Exception) -> CheckpointError:
    """A CheckpointError saying why ``torch.load`` failed on ``path``, in plain words."""
    detail = str(err).strip()
    found = re.search(r"GLOBAL (\S+)", detail)
    if found is not None:
        return CheckpointError(
            f"cannot load checkpoint {path}: it holds a pickled Python object ({found.group(1)}) that "
            "torch.load(weights_only=True) refuses; if you trust the file, pass weights_only=False"
        )
    if isinstance(err, pickle.UnpicklingError) and is_raw_pickle(path):
        return CheckpointError(
            f"cannot load checkpoint {path}: it is a raw pickle (written by pickle.dump, not torch.save), which "
            "torch.load(weights_only=True) refuses; if you trust the file, pass weights_only=False"
        )
    first = detail.splitlines()[0] if detail else "no message"
    return CheckpointError(
        f"cannot load checkpoint {path}: the file is truncated, corrupted or holds objects that "
        f"weights_only=True refuses ({type(err).__name__}: {first})"
    )


def _not_ours(path: Path, ckpt: Any) -> str:
    found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
    hint = ""
    if isinstance(ckpt, dict):
        hint = (
            f" (top-level keys {_listing(sorted(str(k) for k in ckpt))}); to load a backbone's weights from "
            "a DINO, EsViT or timm file use cmd.load_checkpoint(backbone, path)"
        )
    return f"{path} is not a {FORMAT} checkpoint (format: {found!r}){hint}"


def _foreign_format(path: Path) -> Any:
    """The object in ``path`` when it loads with ``argparse.Namespace`` allowed (as DINO and EsViT files
    store their arguments) and is not a cmd-fgvc checkpoint; None otherwise."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    return obj if not (isinstance(obj, dict) and obj.get("format") == FORMAT) else None


def read_checkpoint(
    path: str | os.PathLike, map_location: Any = "cpu", *, weights_only: bool = True
) -> dict[str, Any]:
    """Load a cmd-fgvc checkpoint as a dict, without applying it.

    Every tensor is compared with the checksum `save_checkpoint` stored for it, on every load: a
    corrupted tensor, or one whose data was replaced (e.g. by another checkpoint's, in a zip re-written
    with valid CRC-32s), is refused, naming the entry (e.g. ``student['head.weight']``). The CRC-32
    that the zip format keeps for every member is checked too (for the tensor data only when a
    checksum is missing or differs: the checksums cover it). Checkpoints written before checksums
    were stored still load (every member's CRC-32 is checked, and a damaged one is named by its
    member). The verification costs about as much as the load itself (one CRC-32 over the weights;
    numbers in ``docs/blocks/checkpoints.md``).

    Args:
        path: the checkpoint file.
        map_location: where tensors are loaded.
        weights_only: keep True unless you trust the file; False runs arbitrary pickled code (it warns).

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: the file is truncated, corrupted (the damaged entry is named), not loadable with
            ``weights_only=True`` (a pickled object or a raw pickle: the message says which), not a
            cmd-fgvc checkpoint (e.g. a DINO file: use `cmd.load_checkpoint` for a backbone), or of
            a newer format version (the file is named).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if not weights_only:
        warnings.warn(
            f"loading {path} with weights_only=False: unpickling can run arbitrary code; only for files you trust",
            stacklevel=2,
        )
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as e:  # truncated zip, bad pickle, disallowed global, ...
        damaged = corrupt_member(path)
        if damaged is not None:
            raise CheckpointError(f"checkpoint {path} is corrupted: zip member {damaged} is damaged") from e
        foreign = _foreign_format(path) if "argparse.Namespace" in str(e) else None
        if foreign is not None:
            raise CheckpointError(_not_ours(path, foreign)) from e
        raise _load_error(path, e) from e
    damage = check_loaded(path, ckpt)  # stored per-tensor checksums, zip CRC-32s
    if damage is not None:
        raise CheckpointError(
            f"checkpoint {path} is corrupted: {damage.describe(_MAX_LISTED)}; "
            "restore it from a copy or an earlier checkpoint"
        )
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(_not_ours(path, ckpt))
    version = ckpt.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format_version {version!r}; this library reads versions up to {FORMAT_VERSION}"
        )
    return ckpt


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return "[" + shown + (f", ... ({len(keys)} in all)" if len(keys) > _MAX_LISTED else "") + "]"


def _strip_wrapper_prefix(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    """Remove a ``module.`` / ``_orig_mod.`` prefix that every key carries (a wrapped model's state dict)."""
    for prefix in ("module.", "_orig_mod."):
        if state_dict and all(isinstance(k, str) and k.startswith(prefix) for k in state_dict):
            state_dict = collections.OrderedDict((k[len(prefix) :], v) for k, v in state_dict.items())
    return state_dict


def _load_module(path: Path, name: str, module: nn.Module, state_dict: Any, strict: bool) -> None:
    target = unwrap_model(module)
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"{path}: {name!r} holds a {type(state_dict).__name__}, not a state dict")
    try:
        result = target.load_state_dict(_strip_wrapper_prefix(state_dict), strict=False)
    except RuntimeError as e:  # shape mismatches
        raise CheckpointError(f"{path}: cannot load {name!r} into {type(target).__name__}: {e}") from e
    if result.missing_keys or result.unexpected_keys:
        message = (
            f"{path}: {name!r} does not match {type(target).__name__}: "
            f"missing keys {_listing(list(result.missing_keys))}, "
            f"unexpected keys {_listing(list(result.unexpected_keys))}"
        )
        if strict:
            raise CheckpointError(message)
        warnings.warn(message, stacklevel=3)


def restore_checkpoint(
    path: str | os.PathLike,
    *,
    student: nn.Module | None = None,
    teacher: nn.Module | EMATeacher | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    loss: Any = None,
    scaler: torch.amp.GradScaler | None = None,
    ema: EMATeacher | None = None,
    strict: bool = True,
    restore_rng: bool = True,
    map_location: Any = "cpu",
    weights_only: bool = True,
) -> dict[str, Any]:
    """Restore a checkpoint written by [`save_checkpoint`][cmd.checkpoint.save_checkpoint] into what is given; return the rest.

    Each given object is loaded from its key (``student``, ``teacher``, ``optimizer``, ``loss``,
    ``scaler``); wrapped modules (DDP, ``torch.compile``) are unwrapped. An [`EMATeacher`][cmd.teacher.EMATeacher]
    given as ``teacher`` gets its teacher's weights and its schedule state (step counter, from the
    ``ema`` entry); ``ema=`` restores the schedule state alone (pass ``teacher=ema.teacher`` or
    ``teacher=ema`` for the weights). The RNG states are restored
    (``restore_rng=True``). Call it before creating the DataLoader iterator of the next epoch.

    Args:
        path: the checkpoint file.
        student, teacher, optimizer, loss, scaler, ema: what to restore; None skips it.
        strict: raise when a module's keys differ from the stored ones (else warn), and when a given
            object has no entry in the checkpoint.
        restore_rng: restore python / numpy / torch / CUDA RNG states.
        map_location: where tensors are loaded before being copied into the objects.
        weights_only: keep True unless you trust the file (it refuses arbitrary pickled objects);
            False warns, as ``trust_pickle=True`` of `cmd.load_checkpoint` does.

    Returns:
        Everything else stored (``epoch``, ``step``, ``sampler_epoch``, ``args``, entries not restored,
        ...), without ``format`` / ``format_version``.

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: unreadable file, missing entry (strict), or keys that do not match a module
            (the message lists the missing and unexpected keys).
    """
    path = Path(path)
    ckpt = read_checkpoint(path, map_location=map_location, weights_only=weights_only)
    consumed = set(_RESERVED)
    targets = {"student": student, "teacher": teacher, "optimizer": optimizer, "loss": loss, "scaler": scaler}
    if ema is not None and not isinstance(ema, EMATeacher):
        raise TypeError(f"ema must be an EMATeacher, got {type(ema).__name__}")
    for name, target in targets.items():
        if target is None:
            continue
        if name not in ckpt:
            message = (
                f"{path} has no {name!r} entry (it holds {sorted(k for k in ckpt if k not in _RESERVED)})"
            )
            if strict:
                raise CheckpointError(message)
            warnings.warn(message, stacklevel=2)
            continue
        consumed.add(name)
        state = ckpt[name]
        if isinstance(target, EMATeacher):
            _load_module(path, name, target.teacher, state, strict)
            if ema is None:
                ema = target
        elif isinstance(target, nn.Module):
            _load_module(path, name, target, state, strict)
        elif isinstance(target, torch.amp.GradScaler):
            if target.is_enabled() and not state:
                warnings.warn(
                    f"{path}: the stored grad scaler was disabled (not fp16); the scaler keeps its fresh state",
                    stacklevel=2,
                )
            else:
                target.load_state_dict(state)
        else:
            try:
                target.load_state_dict(state)
            except (ValueError, KeyError, RuntimeError) as e:
                raise CheckpointError(
                    f"{path}: cannot load {name!r} into {type(target).__name__}: {e}"
                ) from e
    if ema is not None:
        if "ema" in ckpt:
            ema.load_state_dict(ckpt["ema"])
            consumed.add("ema")
        else:
            message = f"{path} has no 'ema' entry: the EMA schedule step is not restored"
            if strict:
                raise CheckpointError(message)
            warnings.warn(message, stacklevel=2)
    if restore_rng and "rng" in ckpt:
        set_rng_state(ckpt["rng"])
        consumed.add("rng")
    return {k: v for k, v in ckpt.items() if k not in consumed}
