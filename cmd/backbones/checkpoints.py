"""Load backbone weights from DINO, EsViT/CMD, timm and this library's checkpoints; export them back.

Recognised sources (a path or an in-memory dict), `LoadReport.source_format` in brackets:

* this library's training checkpoints ``{"format": "cmd-fgvc", "format_version": 1, "student": ...,
  "teacher": ..., ...}`` whose networks have keys ``backbone.model.<timm key>`` and ``head.<...>``
  [``"cmd-fgvc"``];
* DINO checkpoints ``{"teacher": ..., "student": ...}`` holding the state dict of DINO's
  ``MultiCropWrapper`` (``backbone.*`` keys, possibly behind ``module.``), the DINO head (``head.*``)
  dropped [``"dino"``]; a plain timm state dict under ``"teacher"`` is ``"timm"``;
* EsViT and CMD Swin checkpoints in the original Swin layout (patch merging at the *end* of stage i,
  ``layers.{i}.downsample``; timm puts it at the *start* of stage i + 1), with or without a
  ``backbone.`` prefix, heads ``head.*`` / ``head_dense.*`` dropped; converted by timm's own
  ``timm.models.swin_transformer.checkpoint_filter_fn`` (``relative_position_index`` and
  ``attn_mask`` buffers are recomputed, not loaded), window 7 and 14 [``"esvit"``]. The converted
  weights reproduce EsViT's features (within 1e-5 at 224 and 96 px) only with EsViT's numerics
  (``numerics="esvit"``: LayerNorm eps 1e-6 and pad-then-shift windows, see `cmd.backbones.numerics`);
  with timm's they differ by ~1e-4 at 224 px and up to ~1 on 96 px tokens (Swin-T, random weights);
* plain timm state dicts, bare or under ``"state_dict"`` / ``"model"``, classifier heads dropped
  [``"timm"``].

`LoadReport.suggested_numerics` names the numerics that match the source: the stored
``"backbone_numerics"`` entry of a cmd-fgvc checkpoint (or of a wrapped `export_checkpoint` file),
``"esvit"`` for EsViT/CMD Swin checkpoints, ``"dino"`` for DINO ViT checkpoints, else ``"timm"``. A
stored value that is not one of ``"timm"``, ``"esvit"``, ``"dino"`` is never taken for ``"timm"``:
`cmd.backbones.create_backbone` refuses it (unless ``numerics=`` is given), `load_checkpoint` warns.
`create_backbone` applies the suggested numerics; `load_checkpoint` on an existing backbone keeps the
backbone's, and warns when the source implies others (``backbone.set_numerics(...)`` switches).
`export_checkpoint` records the numerics in a wrapped file and warns when a bare state dict cannot
carry them (a reload would compute other numerics).

Prefixes ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) are removed wherever they lead a key.
Files are read with ``torch.load(..., map_location="cpu", weights_only=True)`` (``argparse.Namespace``
allowed, as DINO and EsViT store their arguments that way); ``trust_pickle=True`` opts out for old
pickled checkpoints, with a warning. ``.safetensors`` files are read with safetensors.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from cmd._integrity import check_loaded, corrupt_member, is_raw_pickle

from .backbone import Backbone

__all__ = ["LoadReport", "load_checkpoint", "export_checkpoint", "read_checkpoint_file"]

FORMAT_NAME = "cmd-fgvc"
#: the entry of a cmd-fgvc checkpoint (or a wrapped `export_checkpoint` file) naming the backbone's numerics
NUMERICS_KEY = "backbone_numerics"
SUPPORTED_FORMAT_VERSION = 1
_WRAPPER_KEYS = ("state_dict", "model")
_STRIP_EVERYWHERE = ("module.", "_orig_mod.")
_HEAD_ROOTS = frozenset({"head", "head_dense", "head_dist", "fc", "classifier"})
_SHOWN = 8  # how many keys an error message lists
_NUMERICS_EFFECT = {  # measured in cmd.backbones.numerics, random weights
    "esvit": "Swin-T tokens of 96 px crops by up to ~1",
    "dino": "ViT-S/16 tokens of 96 px crops by up to ~4",
    "timm": "crops of other sizes than 224 px differ most",
}


@dataclass
class LoadReport:
    """What `load_checkpoint` did.

    Attributes:
        missing: model keys the checkpoint did not provide.
        unexpected: checkpoint keys the model does not have.
        source_format: ``"cmd-fgvc"``, ``"dino"``, ``"esvit"`` or ``"timm"``.
        mismatched: ``"key: checkpoint [shape] vs model [shape]"`` for keys whose shapes differ (not loaded).
        dropped: keys deliberately not loaded: heads (DINO/EsViT/CMD heads, timm classifiers) and the
            original Swin ``relative_position_index`` / ``attn_mask`` buffers that timm recomputes.
        loaded: how many tensors were copied into the model.
        expected: how many tensors the model's state dict has.
        suggested_numerics: the numerics matching the source (module docstring); ``"timm"`` when the
            source implies none.
        implied_numerics: the numerics the source implies (a stored ``backbone_numerics``, or the
            format ``"esvit"`` / ``"dino"``), None when it implies none (a timm state dict, a
            cmd-fgvc checkpoint without the entry).
        numerics_source: what implies them (``"the checkpoint format 'esvit'"``, ...).
        where: the file (or ``"<state dict>"``).
        numerics: the numerics the backbone computes after loading.
        numerics_reason: why (``"chosen from the checkpoint format 'esvit'"``, ``"explicit"``, ...).

    Example:
        >>> LoadReport(missing=[], unexpected=[], source_format="timm").ok
        True
    """

    missing: list[str]
    unexpected: list[str]
    source_format: str
    mismatched: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    loaded: int = 0
    expected: int = 0
    suggested_numerics: str = "timm"
    numerics: str = "timm"
    numerics_reason: str = ""
    implied_numerics: str | None = field(default=None, repr=False)
    numerics_source: str = field(default="", repr=False)
    where: str = field(default="", repr=False)

    @property
    def ok(self) -> bool:
        """True when every model key was loaded and nothing was left over (heads aside)."""
        return not (self.missing or self.unexpected or self.mismatched)

    def problems(self, shown: int = 8) -> str:
        """The counts and the first ``shown`` keys of each problem, ``""`` when `ok`."""
        parts = []
        if self.mismatched:
            hint = "another architecture?"
            if any("relative_position_bias_table" in m for m in self.mismatched):
                hint = "another architecture or Swin window size? e.g. pass window_size=14 to create_backbone"
            parts.append(f"{len(self.mismatched)} shape mismatches ({hint}): {self.mismatched[:shown]}")
        if self.missing:
            parts.append(f"{len(self.missing)} missing keys: {self.missing[:shown]}")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected keys: {self.unexpected[:shown]}")
        return "; ".join(parts)

    def summary(self) -> str:
        """One line: format, tensors loaded, numerics and why, and any problems.

        Example:
            >>> LoadReport([], [], "esvit", loaded=4, expected=4, numerics="esvit",
            ...            numerics_reason="chosen from the checkpoint format 'esvit'").summary()
            "esvit checkpoint: loaded 4 of 4 tensors; numerics 'esvit' (chosen from the checkpoint format 'esvit')"
        """
        text = f"{self.source_format} checkpoint: loaded {self.loaded} of {self.expected} tensors"
        reason = self.numerics_reason
        if not reason and self.suggested_numerics != self.numerics:
            reason = (f"the checkpoint format suggests {self.suggested_numerics!r}: "
                      f"backbone.set_numerics({self.suggested_numerics!r}) switches")
        text += f"; numerics {self.numerics!r}" + (f" ({reason})" if reason else "")
        problems = self.problems()
        return text + (f"; {problems}" if problems else "")


# ---------------------------------------------------------------------------------------- reading
def read_checkpoint_file(path: str | os.PathLike[str], *, trust_pickle: bool = False) -> Any:
    """Read a checkpoint file safely (``weights_only=True``) onto the CPU.

    Args:
        path: a ``torch.save`` file or a ``.safetensors`` file.
        trust_pickle: allow arbitrary pickled objects (``weights_only=False``); only for files you trust.

    Raises:
        FileNotFoundError: no such file.
        RuntimeError: the file is truncated or corrupted (a ``torch.save`` zip member whose CRC-32 fails
            is named; in a file that stores per-tensor checksums, as `cmd.save_checkpoint` writes, every
            tensor is verified on every read and one that differs is named, even when its data was
            replaced in a zip re-written with valid CRC-32s), or holds pickled objects
            (or is a raw ``pickle.dump`` file) and ``trust_pickle`` is False.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path!r}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except Exception as err:  # safetensors raises its own error types
            raise RuntimeError(
                f"could not read checkpoint file {path!r}: truncated or corrupted ({err})"
            ) from err
    if trust_pickle:
        warnings.warn(
            f"loading {path!r} with weights_only=False (trust_pickle=True): unpickling can run arbitrary code",
            stacklevel=3,
        )
        loader = {"weights_only": False}
    else:
        loader = {"weights_only": True}
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", **loader)
    except pickle.UnpicklingError as err:
        damaged = corrupt_member(path)  # torch.load does not check the zip's CRC-32s
        found = re.search(r"GLOBAL (\S+)", str(err))
        if found is not None and damaged is None:
            raise RuntimeError(
                f"checkpoint file {path!r} holds a pickled Python object ({found.group(1)}) that "
                "torch.load(weights_only=True) refuses; if you trust the file, pass trust_pickle=True"
            ) from err
        if is_raw_pickle(path):
            raise RuntimeError(
                f"checkpoint file {path!r} is a raw pickle (written by pickle.dump, not torch.save) that "
                "torch.load(weights_only=True) refuses; if you trust the file, pass trust_pickle=True"
            ) from err
        raise RuntimeError(
            f"could not read checkpoint file {path!r}: truncated or corrupted ({_first_line(err)})"
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as err:
        raise RuntimeError(
            f"could not read checkpoint file {path!r}: truncated or corrupted ({_first_line(err)})"
        ) from err
    damage = check_loaded(path, obj)  # stored per-tensor checksums (cmd-fgvc files), zip CRC-32s
    if damage is not None:
        raise RuntimeError(f"could not read checkpoint file {path!r}: corrupted: {damage.describe(_SHOWN)}")
    return obj


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


# ---------------------------------------------------------------------------------------- unwrapping
def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())
    )


def _unwrap(obj: Any, checkpoint_key: str, where: str) -> tuple[Mapping[str, torch.Tensor], str]:
    """The state dict inside ``obj`` and the wrapper it came from ("cmd-fgvc", the key, or "")."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{where}: unknown checkpoint format: expected a dict, got {type(obj).__name__}")
    if obj.get("format") == FORMAT_NAME:
        version = obj.get("format_version")
        if not isinstance(version, int) or version > SUPPORTED_FORMAT_VERSION:
            raise ValueError(
                f"{where}: {FORMAT_NAME} checkpoint format_version {version!r} is not supported "
                f"(this version reads <= {SUPPORTED_FORMAT_VERSION})"
            )
        if checkpoint_key not in obj:
            nets = [k for k in ("teacher", "student") if k in obj]
            raise ValueError(
                f"{where}: checkpoint_key {checkpoint_key!r} not in this {FORMAT_NAME} checkpoint (it has {nets})"
            )
        return _checked(obj[checkpoint_key], where, checkpoint_key), FORMAT_NAME
    if _is_state_dict(obj):
        return obj, ""
    if checkpoint_key in obj:
        return _checked(obj[checkpoint_key], where, checkpoint_key), checkpoint_key
    for key in _WRAPPER_KEYS:
        if key in obj and isinstance(obj[key], Mapping):
            return _checked(obj[key], where, key), key
    keys = sorted(str(k) for k in obj)[:_SHOWN]
    raise ValueError(
        f"{where}: unknown checkpoint format: checkpoint_key {checkpoint_key!r} not found and it is not a state "
        f"dict (top-level keys {keys}); pass checkpoint_key= naming the network's state dict"
    )


def _is_multicrop_wrapper(sd: Mapping[str, torch.Tensor]) -> bool:
    """True for the state dict of DINO's / EsViT's ``MultiCropWrapper`` (keys ``backbone.<key>``, the
    backbone's own timm-style keys, and ``head.*``), possibly behind ``module.``: what DINO saves as
    ``teacher`` / ``student``. A plain timm state dict (``cls_token``, ``blocks.0...``) saved under
    ``"teacher"`` is not one, nor is a cmd network's (``backbone.model.<key>``)."""
    keys = [_strip_leading(k, _STRIP_EVERYWHERE) for k in sd]
    inner = [k[len("backbone.") :] for k in keys if k.startswith("backbone.")]
    return bool(inner) and not all(_strip_leading(k, _STRIP_EVERYWHERE).startswith("model.") for k in inner)


def _checked(sd: Any, where: str, key: str) -> Mapping[str, torch.Tensor]:
    if not isinstance(sd, Mapping) or len(sd) == 0:
        raise ValueError(f"{where}: checkpoint[{key!r}] is not a non-empty state dict ({type(sd).__name__})")
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(
            f"{where}: checkpoint[{key!r}] is not a state dict: non-tensor values at {bad[:_SHOWN]}"
        )
    return sd


# ---------------------------------------------------------------------------------------- key handling
def _strip_leading(key: str, prefixes: tuple[str, ...]) -> str:
    changed = True
    while changed:
        changed = False
        for p in prefixes:
            if key.startswith(p):
                key, changed = key[len(p) :], True
    return key


def _normalise_keys(
    sd: Mapping[str, torch.Tensor], model_keys: set[str]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Strip wrapper prefixes and split off the non-backbone parts of a network state dict."""
    out = {_strip_leading(k, _STRIP_EVERYWHERE): v for k, v in sd.items()}
    dropped: list[str] = []
    if any(k.startswith("backbone.") for k in out):
        dropped = [k for k in out if not k.startswith("backbone.")]
        out = {
            _strip_leading(k[len("backbone.") :], _STRIP_EVERYWHERE): v
            for k, v in out.items()
            if k.startswith("backbone.")
        }
    # a Backbone's own state dict (or a CMD network's backbone) has keys "model.<timm key>"
    if all(k.startswith("model.") for k in out) and not any(k.startswith("model.") for k in model_keys):
        out = {_strip_leading(k[len("model.") :], _STRIP_EVERYWHERE): v for k, v in out.items()}
    return out, dropped


def _is_original_swin_layout(sd: Mapping[str, torch.Tensor]) -> bool:
    # timm's own criterion: original Swin has a patch merging at the end of stage 0, timm has none there
    return "layers.0.downsample.reduction.weight" in sd


def _convert_swin(sd: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Original-Swin layout -> timm, with timm's converter; it must not silently resize tensors."""
    from timm.models.swin_transformer import checkpoint_filter_fn

    model_sd = model.state_dict()
    aside = {}
    for k, v in sd.items():
        if k.endswith("relative_position_bias_table") or k == "patch_embed.proj.weight":
            # timm would interpolate these to the model's shape: keep them out so a mismatch is reported
            if k not in model_sd or model_sd[k].shape != v.shape:
                aside[k] = v
    converted = checkpoint_filter_fn({k: v for k, v in sd.items() if k not in aside}, model)
    converted.update(aside)
    return converted


# ---------------------------------------------------------------------------------------- loading
def load_checkpoint(
    backbone: Backbone,
    source: str | os.PathLike[str] | Mapping[str, Any],
    *,
    checkpoint_key: str = "teacher",
    strict: bool = True,
    trust_pickle: bool = False,
) -> LoadReport:
    """Load backbone weights from a checkpoint file or dict in any recognised format (module docstring).

    Args:
        backbone: the `Backbone` to fill (its ``model`` gets the weights).
        source: a path (``torch.save`` or ``.safetensors`` file) or an already loaded dict.
        checkpoint_key: the network to take from a training checkpoint (``"teacher"``, ``"student"``,
            or e.g. ``"state_dict_ema"``); a bare state dict ignores it.
        strict: raise on missing, unexpected or shape-mismatched keys; if False, load what fits and
            return the report.
        trust_pickle: read the file with ``weights_only=False`` (warns; only for files you trust).

    Numerics: the backbone keeps the numerics it has. When the source implies others (an EsViT/CMD
    Swin or DINO ViT checkpoint, or a stored ``backbone_numerics`` entry naming others) a UserWarning
    says so and how to switch; a stored ``backbone_numerics`` that is not a known value warns too.
    `cmd.create_backbone` (``checkpoint=...``) applies the implied numerics instead.

    Returns:
        A `LoadReport` (missing, unexpected, source_format, mismatched, dropped, loaded).

    Raises:
        FileNotFoundError: no such file.
        RuntimeError: a truncated or corrupted file, or pickled objects without ``trust_pickle``.
        ValueError: an unknown format, a missing ``checkpoint_key``, or (strict) weights that do not
            fit this architecture; the message names the source, the key and the problem.

    Example:
        >>> from cmd.backbones import create_backbone
        >>> a = create_backbone("vit_tiny", depth=1)
        >>> b = create_backbone("vit_tiny", depth=1)
        >>> load_checkpoint(b, {"teacher": a.model.state_dict()}).source_format  # timm keys under "teacher"
        'timm'
        >>> dino = {"teacher": {f"backbone.{k}": v for k, v in a.model.state_dict().items()}}  # DINO's layout
        >>> c = create_backbone("vit_tiny", depth=1, numerics="dino")
        >>> load_checkpoint(c, dino).source_format, c.numerics
        ('dino', 'dino')
    """
    report, bad_numerics = _load(backbone, source, checkpoint_key, strict, trust_pickle)
    if bad_numerics is not None:
        warnings.warn(
            f"{bad_numerics}; {backbone.name} keeps the numerics it has ({backbone.numerics!r}), which may not be "
            "those the weights were trained with",
            stacklevel=2,
        )
    elif report.implied_numerics is not None and report.implied_numerics != backbone.numerics:
        warnings.warn(
            f"{report.where}: {report.numerics_source} implies {report.implied_numerics!r} numerics, but "
            f"{backbone.name} computes {backbone.numerics!r}: its features differ from the reference's "
            f"({_NUMERICS_EFFECT.get(report.implied_numerics, 'other sizes than 224 px differ')}). Create the backbone with cmd.create_backbone(..., checkpoint=...), "
            f"which applies them, or switch a backbone with timm's numerics with "
            f"backbone.set_numerics({report.implied_numerics!r})",
            stacklevel=2,
        )
    return report


def _load(
    backbone: Backbone,
    source: str | os.PathLike[str] | Mapping[str, Any],
    checkpoint_key: str,
    strict: bool,
    trust_pickle: bool,
) -> tuple[LoadReport, str | None]:
    """`load_checkpoint` without its numerics warnings; also returns why a stored numerics is invalid."""
    if not isinstance(backbone, Backbone):
        raise TypeError(f"backbone must be a cmd Backbone, got {type(backbone).__name__}")
    if isinstance(source, (str, os.PathLike)):
        where = os.fspath(source)
        obj = read_checkpoint_file(source, trust_pickle=trust_pickle)
    elif isinstance(source, Mapping):
        where, obj = "<state dict>", source
    else:
        raise TypeError(f"source must be a path or a dict, got {type(source).__name__}")

    raw, wrapper = _unwrap(obj, checkpoint_key, where)
    # a cmd-fgvc checkpoint, or a wrapped export_checkpoint file, records the numerics it was computed with
    has_stored = wrapper != "" and NUMERICS_KEY in obj
    stored_numerics = obj.get(NUMERICS_KEY) if has_stored else None
    model = backbone.model
    model_sd = model.state_dict()
    sd, dropped = _normalise_keys(raw, set(model_sd))

    original_swin = _is_original_swin_layout(sd)
    if wrapper == FORMAT_NAME:
        source_format = FORMAT_NAME
    elif original_swin:
        source_format = "esvit"
    elif wrapper in ("teacher", "student") and _is_multicrop_wrapper(raw):
        source_format = "dino"
    else:  # bare, or under "state_dict" / "model" / another key such as timm's "state_dict_ema"
        source_format = "timm"

    heads = [k for k in sd if k not in model_sd and k.split(".", 1)[0] in _HEAD_ROOTS]
    dropped += heads
    for k in heads:
        del sd[k]

    from timm.models.swin_transformer import SwinTransformer

    if isinstance(model, SwinTransformer):
        # buffers of the original layout that timm recomputes from the window size
        buffers = [
            k for k in sd if k.endswith(("relative_position_index", "attn_mask")) and k not in model_sd
        ]
        dropped += buffers
        sd = _convert_swin({k: v for k, v in sd.items() if k not in buffers}, model)

    mismatched = [
        f"{k}: checkpoint {list(v.shape)} vs model {list(model_sd[k].shape)}"
        for k, v in sd.items()
        if k in model_sd and v.shape != model_sd[k].shape
    ]
    loadable = {k: v for k, v in sd.items() if k in model_sd and v.shape == model_sd[k].shape}
    missing = [k for k in model_sd if k not in sd]
    unexpected = [k for k in sd if k not in model_sd]
    from .numerics import NUMERICS, numerics_for_format

    bad_numerics = None
    implied, numerics_source = None, f"the checkpoint format {source_format!r}"
    if has_stored:
        if isinstance(stored_numerics, str) and stored_numerics in NUMERICS:
            implied, numerics_source = stored_numerics, f"the stored {NUMERICS_KEY!r} entry"
        else:
            bad_numerics = (
                f"{where}: the stored {NUMERICS_KEY!r} entry is {stored_numerics!r}, not one of {NUMERICS} (a "
                "damaged or hand-edited file, or one from a newer version)"
            )
    elif source_format in ("esvit", "dino"):
        implied = numerics_for_format(source_format, backbone.family)
    report = LoadReport(
        missing, unexpected, source_format, mismatched, dropped, loaded=len(loadable), expected=len(model_sd),
        suggested_numerics=implied or "timm", numerics=backbone.numerics,
    )
    report.where, report.implied_numerics, report.numerics_source = where, implied, numerics_source

    if strict and not report.ok:
        key_text = f", checkpoint_key {checkpoint_key!r}" if wrapper not in ("", *_WRAPPER_KEYS) else ""
        raise ValueError(
            f"{where} ({source_format}{key_text}) does not fit {backbone.name}: "
            f"{report.loaded} of {report.expected} model tensors would load; "
            + report.problems(_SHOWN)
            + ". Pass strict=False to load what fits and get a LoadReport."
        )
    model.load_state_dict(loadable, strict=False)
    return report, bad_numerics


# ---------------------------------------------------------------------------------------- export
def _to_original_swin(
    model: torch.nn.Module, sd: dict[str, torch.Tensor], include_buffers: bool
) -> dict[str, torch.Tensor]:
    """timm Swin keys -> original Swin keys: ``layers.{i}.downsample`` becomes ``layers.{i-1}.downsample``."""
    pattern = re.compile(r"^layers\.(\d+)\.downsample\.")
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        k = pattern.sub(lambda m: f"layers.{int(m.group(1)) - 1}.downsample.", k)
        out[k] = v
    if include_buffers:
        for name, buf in model.named_buffers():
            if name.endswith("attn.relative_position_index"):
                out[name] = buf.detach().to("cpu", copy=True)
    return out


def export_checkpoint(
    backbone: Backbone,
    path: str | os.PathLike[str] | None = None,
    *,
    layout: str = "timm",
    wrap_key: str | None = None,
    include_buffers: bool = True,
) -> dict[str, Any]:
    """The backbone's weights as a state dict in timm's or the original Swin (EsViT) layout.

    Args:
        backbone: the `Backbone` to export.
        path: if given, the result is also written there atomically (temporary file + rename).
        layout: ``"timm"`` (keys as in ``backbone.model``) or ``"esvit"`` (Swin only: the original Swin
            layout that EsViT/CMD code loads, patch merging at the end of stage i).
        wrap_key: wrap the state dict as ``{wrap_key: state_dict, "backbone_numerics": numerics}``
            (``"teacher"`` as DINO/EsViT save; their code reads ``["teacher"]`` and ignores the rest):
            `load_checkpoint` / `create_backbone` read the numerics back. Without it the bare state
            dict cannot record them: exporting a backbone whose numerics differ from what its layout
            implies (``"timm"`` layout: timm's; ``"esvit"``: EsViT's) warns.
        include_buffers: for ``"esvit"``, also write the ``relative_position_index`` buffers ``[A, A]``
            (A = window area) that original Swin keeps in its state dict. ``attn_mask`` buffers
            depend on the input resolution and are not written.

    Returns:
        The (optionally wrapped) state dict, CPU tensors that share no storage with the model.

    Warns:
        UserWarning: ``wrap_key`` is None and the backbone's numerics differ from those a reload
            would infer from the layout (e.g. a Swin with EsViT numerics in the ``"timm"`` layout).

    Example:
        >>> from cmd.backbones import create_backbone
        >>> bb = create_backbone("swin_tiny", embed_dim=24, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1),
        ...                      numerics="esvit")  # the layout EsViT code loads, with its numerics
        >>> sd = export_checkpoint(bb, layout="esvit")
        >>> "layers.0.downsample.reduction.weight" in sd, "layers.3.downsample.reduction.weight" in sd
        (True, False)
    """
    if not isinstance(backbone, Backbone):
        raise TypeError(f"backbone must be a cmd Backbone, got {type(backbone).__name__}")
    if layout not in ("timm", "esvit"):
        raise ValueError(f"layout must be 'timm' or 'esvit', got {layout!r}")
    sd = {k: v.detach().to("cpu", copy=True) for k, v in backbone.model.state_dict().items()}
    if layout == "esvit":
        from timm.models.swin_transformer import SwinTransformer

        if not isinstance(backbone.model, SwinTransformer):
            raise ValueError(
                f"layout='esvit' is for Swin (SwinTransformer) backbones; {backbone.name} is {backbone.family}"
            )
        sd = _to_original_swin(backbone.model, sd, include_buffers)
    numerics = backbone.numerics
    if wrap_key is None:
        # what a reload infers from a bare state dict: its layout's numerics (EsViT's for the Swin layout)
        implied = "esvit" if layout == "esvit" else "timm"
        if implied != numerics:
            warnings.warn(
                f"export_checkpoint: {backbone.name} computes {numerics!r} numerics, but a bare state dict in the "
                f"{layout!r} layout cannot record them: a backbone created from it computes {implied!r} numerics "
                f"unless built with numerics={numerics!r}"
                + (" (layout='esvit' implies 'esvit')" if numerics == "esvit" else "")
                + f"; pass wrap_key= (e.g. 'teacher') to record them as {NUMERICS_KEY!r}",
                stacklevel=2,
            )
    elif wrap_key == NUMERICS_KEY:
        raise ValueError(f"wrap_key {NUMERICS_KEY!r} is reserved for the numerics of a wrapped export")
    result: dict[str, Any] = {wrap_key: sd, NUMERICS_KEY: numerics} if wrap_key is not None else sd
    if path is not None:
        _atomic_save(result, os.fspath(path))
    return result


def _atomic_save(obj: Any, path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
