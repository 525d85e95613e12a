"""The identity of a training set, stored in every checkpoint so that a resume can tell other data.

A run resumed in the middle of an epoch continues that epoch's shuffled order, which is a
permutation of the dataset's indices: on a dataset that grew, shrank or was re-ordered, the rest
of the epoch would train some images twice and others never. `data_identity` records:

- ``size``: the number of training images;
- ``files_sha256``: for file-based datasets (``samples`` of ``(path, label)``), a SHA-256 of the
  sorted list of ``relative path, label`` pairs (paths relative to ``--data_path``; file contents
  are not read, so replacing an unreadable image by a good one under the same name keeps it);
- ``synthetic``: for ``--dataset synthetic``, the options that generate the images.

`describe_change` names what differs. The policy (in `cmd.cli.run_state.resume_plan`): a mid-epoch
resume on other data is refused; at an epoch boundary the run goes on with the new data (a note
names the change; the steps per epoch and every schedule follow the new size).

Example:
    >>> a = {"size": 48, "files_sha256": "ab12"}
    >>> describe_change(a, {"size": 56, "files_sha256": "cd34"})
    'the training set has 56 images (the checkpoint: 48) and another file list'
    >>> describe_change(a, dict(a)) is None
    True
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from typing import Any

__all__ = ["SYNTHETIC_KEYS", "data_identity", "describe_change"]

# the options that generate --dataset synthetic's images (with the seed, which is checked on its own)
SYNTHETIC_KEYS = ("synthetic_classes", "synthetic_per_class", "synthetic_image_size", "synthetic_difficulty",
                  "synthetic_class_hue", "synthetic_clutter")


def data_identity(args: Any, dataset: Any) -> dict[str, Any]:
    """``{"size": n, "files_sha256": hex}`` (file lists) or ``{"size": n, "synthetic": {...}}``."""
    identity: dict[str, Any] = {"size": len(dataset)}
    if getattr(args, "dataset", None) == "synthetic":
        identity["synthetic"] = {k: getattr(args, k, None) for k in SYNTHETIC_KEYS}
        return identity
    samples = getattr(dataset, "samples", None)
    if samples is not None:
        root = os.fspath(getattr(args, "data_path", None) or "")
        digest = hashlib.sha256()
        for path, label in sorted((_relative(os.fspath(p), root), int(y)) for p, y in samples):
            digest.update(f"{path}\t{label}\n".encode("utf-8", "surrogateescape"))
        identity["files_sha256"] = digest.hexdigest()
    return identity


def _relative(path: str, root: str) -> str:
    if root:
        try:
            return os.path.relpath(path, root)
        except ValueError:  # another drive (Windows)
            return path
    return path


def describe_change(saved: Mapping[str, Any] | None, current: Mapping[str, Any]) -> str | None:
    """What differs between the checkpoint's training set and this run's (None: the same, or unknown)."""
    if not saved:
        return None  # a checkpoint of an older version: nothing recorded
    parts = []
    if saved.get("size") != current.get("size"):
        parts.append(f"the training set has {current.get('size')} images (the checkpoint: {saved.get('size')})")
    if "files_sha256" in saved and saved.get("files_sha256") != current.get("files_sha256"):
        parts.append("another file list")
    if "synthetic" in saved and saved.get("synthetic") != current.get("synthetic"):
        old, new = saved["synthetic"], current.get("synthetic") or {}
        changed = [f"--{k} {old.get(k)} -> {new.get(k)}" for k in SYNTHETIC_KEYS if old.get(k) != new.get(k)]
        parts.append("other synthetic data (" + "; ".join(changed) + ")")
    if not parts:
        return None
    text = " and ".join(parts)
    return text if parts[0].startswith("the training set") else "the training set has " + text
