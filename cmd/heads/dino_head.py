"""`DINOHead`: the projection head of DINO / EsViT, and `cancel_last_layer_gradients`.

``x [.., in_dim] -> MLP (GELU) -> [.., bottleneck_dim] -> L2-normalise -> weight-normalised linear
(no bias) -> logits [.., out_dim]``. Row ``k`` of the last layer's weight is ``g_k * v_k / ||v_k||``:
each logit is ``g_k`` times the cosine between the bottleneck feature and the prototype ``v_k``.

The weight normalisation uses ``torch.nn.utils.parametrizations.weight_norm`` (state-dict keys
``last_layer.parametrizations.weight.original0`` = g [K, 1] and ``...original1`` = v [K, bottleneck]),
which, unlike the deprecated ``torch.nn.utils.weight_norm``, survives ``copy.deepcopy`` (the EMA
teacher is a deep copy of the student). State dicts in the layout of DINO / EsViT checkpoints
(``mlp.0.weight``, ..., ``last_layer.weight_g``, ``last_layer.weight_v``) load directly through a
load pre-hook; `DINOHead.legacy_state_dict` exports that layout. A one-layer MLP (``n_layers=1``) is
``mlp.0.*`` here and a bare ``nn.Linear`` ``mlp.*`` in DINO: both load, and the legacy export uses
DINO's ``mlp.*``.

Example:
    >>> import torch
    >>> head = DINOHead(in_dim=16, out_dim=32, hidden_dim=8, bottleneck_dim=4)
    >>> head(torch.randn(3, 16)).shape
    torch.Size([3, 32])
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

__all__ = [
    "DINOHead",
    "cancel_last_layer_gradients",
    "legacy_to_parametrized_keys",
    "parametrized_to_legacy_keys",
]

# last-layer names: legacy (torch.nn.utils.weight_norm) <-> parametrized (torch.nn.utils.parametrizations)
_LEGACY_SUFFIX = {"weight_g": "parametrizations.weight.original0", "weight_v": "parametrizations.weight.original1"}
_PARAM_SUFFIX = {v: k for k, v in _LEGACY_SUFFIX.items()}
_LEGACY_RE = re.compile(r"^(.*last_layer\.)(weight_g|weight_v)$")
_PARAM_RE = re.compile(r"^(.*last_layer\.)(parametrizations\.weight\.original[01])$")


def legacy_to_parametrized_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename ``*last_layer.weight_g`` / ``*last_layer.weight_v`` to the parametrized names.

    Every other key is kept as is, so this converts a whole DINO / EsViT checkpoint section.

    Example:
        >>> import torch
        >>> sd = {"head.last_layer.weight_g": torch.ones(4, 1), "head.mlp.0.bias": torch.zeros(2)}
        >>> sorted(legacy_to_parametrized_keys(sd))
        ['head.last_layer.parametrizations.weight.original0', 'head.mlp.0.bias']
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        m = _LEGACY_RE.match(key)
        out[m.group(1) + _LEGACY_SUFFIX[m.group(2)] if m else key] = value
    return out


def parametrized_to_legacy_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `legacy_to_parametrized_keys`: export to DINO / EsViT's key layout.

    Example:
        >>> import torch
        >>> sd = {"last_layer.parametrizations.weight.original1": torch.ones(4, 2)}
        >>> list(parametrized_to_legacy_keys(sd))
        ['last_layer.weight_v']
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        m = _PARAM_RE.match(key)
        out[m.group(1) + _PARAM_SUFFIX[m.group(2)] if m else key] = value
    return out


class DINOHead(nn.Module):
    """DINO's projection head: MLP -> L2-normalise -> weight-normalised linear layer without bias.

    Args:
        in_dim: input dimension D (the backbone's embedding size).
        out_dim: K, the number of prototypes (output logits); 65536 in DINO / EsViT / CMD.
        hidden_dim: width of the hidden MLP layers (2048).
        bottleneck_dim: output width of the MLP, input of the last layer (256).
        n_layers: number of linear layers of the MLP (>= 1; 3 gives in -> hidden -> hidden -> bottleneck).
        use_bn: BatchNorm1d after each hidden linear layer (per-process statistics: wrap the model
            with ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` under DDP).
        norm_last_layer: fix the magnitudes ``g`` of the last layer at 1 and freeze them, so the
            logits are cosines between features and prototypes (DINO's default, stabler training).

    Shapes:
        ``forward(x [..., in_dim]) -> logits [..., out_dim]`` (any leading dimensions).

    Linear layers of the MLP and the prototypes ``v`` start from a truncated normal (std 0.02),
    biases from 0, the magnitudes ``g`` from 1.

    Example:
        >>> import torch
        >>> head = DINOHead(16, out_dim=32, hidden_dim=8, bottleneck_dim=4, n_layers=2)
        >>> head(torch.randn(2, 5, 16)).shape
        torch.Size([2, 5, 32])
        >>> sorted(head.legacy_state_dict())[:2]
        ['last_layer.weight_g', 'last_layer.weight_v']
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        n_layers: int = 3,
        use_bn: bool = False,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (
            ("in_dim", in_dim),
            ("out_dim", out_dim),
            ("hidden_dim", hidden_dim),
            ("bottleneck_dim", bottleneck_dim),
            ("n_layers", n_layers),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.bottleneck_dim = bottleneck_dim
        self.norm_last_layer = norm_last_layer
        self.mlp = self._build_mlp(in_dim, hidden_dim, bottleneck_dim, n_layers, use_bn)
        self.mlp.apply(_init_linear)
        last = nn.Linear(bottleneck_dim, out_dim, bias=False)
        _init_linear(last)
        self.last_layer = weight_norm(last, name="weight", dim=0)
        g = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            g.fill_(1.0)
        g.requires_grad_(not norm_last_layer)
        _register_pre_hook(self, _load_legacy_last_layer)

    @staticmethod
    def _build_mlp(in_dim: int, hidden_dim: int, bottleneck_dim: int, n_layers: int, use_bn: bool) -> nn.Sequential:
        # The Sequential indices give DINO's key layout: mlp.0 (, mlp.1 BN), GELU, mlp.2|3, ...
        if n_layers == 1:
            return nn.Sequential(nn.Linear(in_dim, bottleneck_dim))
        layers: list[nn.Module] = []
        dims = [in_dim] + [hidden_dim] * (n_layers - 1)
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            layers.append(nn.Linear(d_in, d_out))
            if use_bn:
                layers.append(nn.BatchNorm1d(d_out))
            layers.append(nn.GELU())
        layers.append(nn.Linear(hidden_dim, bottleneck_dim))
        return nn.Sequential(*layers)

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        """The L2-normalised MLP output ``[..., bottleneck_dim]`` (the input of the last layer)."""
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"input must have in_dim = {self.in_dim} channels, got shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        z = self.mlp(x.reshape(-1, self.in_dim))  # BatchNorm1d needs [rows, C]
        # eps scaled for half precision: 1e-12 underflows to 0 in fp16
        z = F.normalize(z, dim=-1, p=2, eps=1e-6 if z.dtype in (torch.float16, torch.bfloat16) else 1e-12)
        return z.reshape(*lead, self.bottleneck_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[..., out_dim]`` for inputs ``x [..., in_dim]``."""
        return self.last_layer(self.bottleneck(x))

    @property
    def prototypes(self) -> torch.Tensor:
        """The effective last-layer weight ``g * v / ||v||`` [out_dim, bottleneck_dim]."""
        return self.last_layer.weight

    def legacy_state_dict(self) -> dict[str, torch.Tensor]:
        """This head's state dict in DINO / EsViT's key layout (``last_layer.weight_g`` / ``weight_v``;
        ``mlp.weight`` / ``mlp.bias`` for a one-layer MLP)."""
        sd = parametrized_to_legacy_keys(self.state_dict())
        if len(self.mlp) == 1:
            sd = {("mlp." + k[len("mlp.0."):] if k.startswith("mlp.0.") else k): v for k, v in sd.items()}
        return sd

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, out_dim={self.out_dim}, norm_last_layer={self.norm_last_layer}"


def cancel_last_layer_gradients(module: nn.Module, epoch: int, freeze_last_layer: int = 1) -> None:
    """Drop the gradients of the heads' last layers during the first ``freeze_last_layer`` epochs.

    Every parameter of ``module`` whose name contains ``last_layer`` gets ``.grad = None`` while
    ``epoch < freeze_last_layer`` (DINO: this stabilises the start of training). Call it between
    ``loss.backward()`` and ``optimizer.step()``; optimizers skip parameters without a gradient.

    Args:
        module: the student network (or any module holding `DINOHead`s, DDP-wrapped or not).
        epoch: the current epoch, 0-based.
        freeze_last_layer: number of epochs during which the last layers are frozen.

    Example:
        >>> head = DINOHead(4, out_dim=8, hidden_dim=4, bottleneck_dim=2)
        >>> head(torch.randn(2, 4)).sum().backward()
        >>> cancel_last_layer_gradients(head, epoch=0)
        >>> [n for n, p in head.named_parameters() if p.grad is None]
        ['last_layer.parametrizations.weight.original0', 'last_layer.parametrizations.weight.original1']
    """
    if epoch >= freeze_last_layer:
        return
    for name, p in module.named_parameters():
        if "last_layer" in name:
            p.grad = None


# ---------------------------------------------------------------------- private helpers
def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def _register_pre_hook(module: nn.Module, hook) -> None:
    """``register_load_state_dict_pre_hook`` (public since torch 2.5), else its private predecessor."""
    if hasattr(module, "register_load_state_dict_pre_hook"):
        module.register_load_state_dict_pre_hook(hook)
    else:  # pragma: no cover - torch < 2.5
        module._register_load_state_dict_pre_hook(hook, with_module=True)


def _load_legacy_last_layer(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
    """Rename ``{prefix}last_layer.weight_g|weight_v`` in ``state_dict`` (in place) before loading.

    A plain ``{prefix}last_layer.weight`` (a head exported without weight normalisation) loads too:
    ``v = weight`` and ``g = ||weight||`` row-wise, so the effective weight is unchanged. For a
    one-layer MLP, DINO's ``{prefix}mlp.weight`` / ``mlp.bias`` become ``mlp.0.*``.
    """
    if len(module.mlp) == 1:
        for name in ("weight", "bias"):
            key = f"{prefix}mlp.{name}"
            if key in state_dict:
                state_dict[f"{prefix}mlp.0.{name}"] = state_dict.pop(key)
    for legacy, new in _LEGACY_SUFFIX.items():
        key = f"{prefix}last_layer.{legacy}"
        if key in state_dict:
            state_dict[f"{prefix}last_layer.{new}"] = state_dict.pop(key)
    plain = f"{prefix}last_layer.weight"
    if plain in state_dict:
        w = state_dict.pop(plain)
        state_dict[f"{prefix}last_layer.parametrizations.weight.original1"] = w
        state_dict[f"{prefix}last_layer.parametrizations.weight.original0"] = w.norm(dim=1, keepdim=True)
