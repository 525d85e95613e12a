"""Pictures of what a model attends to and how training went (matplotlib, the ``viz`` extra).

matplotlib (and scikit-learn for t-SNE) are imported lazily, inside the functions, with a clear
message when missing: ``pip install "cmd-fgvc[viz]"``. Figures are rendered with the Agg backend
when saved to a path, so no display is needed.

Example:
    >>> import torch
    >>> from cmd.viz import instance_weight_overlay
    >>> image = torch.rand(3, 64, 64)                     # [3, H, W] in [0, 1]
    >>> weights = torch.softmax(torch.randn(16), 0)       # [N] MIL weights of a 4 x 4 token grid
    >>> instance_weight_overlay(image, weights, (4, 4)).shape
    (64, 64, 3)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["instance_weight_overlay", "plot_training_log", "save_attention_grid", "plot_embeddings"]


def _pyplot():
    try:
        import matplotlib

        if matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError('cmd.viz needs matplotlib: pip install "cmd-fgvc[viz]"') from err
    return plt


def _to_display_image(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """[3, H, W] (normalised or in [0, 1]) or [H, W, 3] -> float array [H, W, 3] in [0, 1]."""
    img = torch.as_tensor(np.asarray(image) if not isinstance(image, torch.Tensor) else image).detach().cpu()
    img = img.float()
    if img.ndim != 3:
        raise ValueError(f"image must be [3, H, W] or [H, W, 3], got shape {tuple(img.shape)}")
    if img.shape[0] in (1, 3) and img.shape[-1] not in (1, 3):
        img = img.permute(1, 2, 0)
    if img.shape[-1] == 1:
        img = img.expand(*img.shape[:2], 3)
    if img.max() > 1.0 + 1e-6 or img.min() < -1e-6:  # looks normalised (or uint8): undo for display
        if img.max() > 2.0 and img.min() >= 0:
            img = img / 255.0
        else:
            img = img * torch.tensor(IMAGENET_STD) + torch.tensor(IMAGENET_MEAN)
    return img.clamp(0, 1).numpy()


def instance_weight_overlay(
    image: torch.Tensor | np.ndarray,
    weights: torch.Tensor | np.ndarray,
    grid: tuple[int, int],
    *,
    alpha: float = 0.5,
    colormap: str = "jet",
) -> np.ndarray:
    """Blend the MIL weights of an image's region tokens over the image as a heat map.

    Args:
        image: [3, H, W] tensor (ImageNet-normalised or in [0, 1]) or [H, W, 3] array.
        weights: [N] weights of the N = h * w region tokens (row-major over the grid).
        grid: (h, w) the token grid.
        alpha: opacity of the heat map.
        colormap: a matplotlib colormap name.

    Returns:
        [H, W, 3] float array in [0, 1] (show it with ``plt.imshow``).
    """
    h, w = grid
    wts = torch.as_tensor(np.asarray(weights) if not isinstance(weights, torch.Tensor) else weights)
    wts = wts.detach().float().cpu().flatten()
    if wts.numel() != h * w:
        raise ValueError(f"weights has {wts.numel()} entries but the grid {grid} has {h * w} tokens")
    base = _to_display_image(image)
    heat = wts.reshape(1, 1, h, w)
    heat = F.interpolate(heat, size=base.shape[:2], mode="bilinear", align_corners=False)[0, 0]
    heat = (heat - heat.min()) / (heat.max() - heat.min()).clamp_min(1e-12)
    plt = _pyplot()
    colored = np.asarray(plt.get_cmap(colormap)(heat.numpy()))[..., :3]
    return (1 - alpha) * base + alpha * colored


def plot_training_log(log_path: str | Path, path: str | Path | None = None) -> Any:
    """Plot every loss term, k-NN accuracy and teacher entropy of a ``log.jsonl`` over epochs.

    Args:
        log_path: the ``log.jsonl`` written by ``examples/pretrain.py`` (one JSON object per epoch).
        path: where to save the figure (PNG/PDF); None returns the figure without saving.

    Returns:
        The matplotlib figure.
    """
    records = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    if not records:
        raise ValueError(f"{log_path} holds no records")
    plt = _pyplot()
    epochs = [r.get("epoch", i + 1) for i, r in enumerate(records)]
    loss_keys = [k for k in ("loss", "image", "region", "inter_student", "inter_teacher", "cross") if k in records[0]]
    panels = [("loss terms", loss_keys), ("teacher entropy", ["teacher_entropy"]), ("k-NN top-1 (%)", ["knn_top1"])]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (title, keys) in zip(axes, panels):
        plotted = False
        for key in keys:
            xs = [e for e, r in zip(epochs, records) if r.get(key) is not None]
            ys = [r[key] for r in records if r.get(key) is not None]
            if ys:
                ax.plot(xs, ys, marker="o", markersize=3, label=key)
                plotted = True
        if not plotted:
            ax.text(0.5, 0.5, f"{keys[0]} not logged", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        if len(keys) > 1:
            ax.legend(fontsize=8)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
        plt.close(fig)
    return fig


@torch.no_grad()
def region_weights(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """MIL weights [B, N] and the token grid of a `CMDNetwork`-like model for a batch [B, 3, H, W].

    The model needs ``model.backbone(images) -> BackboneOutput`` and
    ``model.head(tokens, pooled) -> CrossLevelOutput`` (as `CMDNetwork` has).
    """
    was_training = model.training
    model.eval()
    try:
        feats = model.backbone(images)
        out = model.head(feats.tokens, feats.pooled)
    finally:
        model.train(was_training)
    if out.mil_weights is None:
        raise ValueError("the model's head returned no MIL weights")
    return out.mil_weights.float(), tuple(feats.grid)


def save_attention_grid(
    model: torch.nn.Module,
    images: torch.Tensor,
    path: str | Path | None = None,
    *,
    n_cols: int = 4,
) -> Any:
    """Save a grid of images with the model's MIL region weights overlaid (which patches matter).

    Args:
        model: a `CMDNetwork` (e.g. the EMA teacher).
        images: [B, 3, H, W] normalised images on the model's device.
        path: output file; None returns the figure without saving.
        n_cols: images per row (each shown as image | overlay).

    Returns:
        The matplotlib figure.
    """
    weights, grid = region_weights(model, images)
    plt = _pyplot()
    b = images.shape[0]
    n_rows = (b + n_cols - 1) // n_cols
    fig, axes = plt.subplots(n_rows, 2 * n_cols, figsize=(4 * n_cols, 2.1 * n_rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(b):
        r, c = divmod(i, n_cols)
        axes[r, 2 * c].imshow(_to_display_image(images[i]))
        axes[r, 2 * c + 1].imshow(instance_weight_overlay(images[i], weights[i], grid))
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
        plt.close(fig)
    return fig


def plot_embeddings(
    features: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray | Sequence[int],
    path: str | Path | None = None,
    *,
    method: str = "tsne",
    seed: int = 0,
    max_points: int = 5000,
) -> Any:
    """2-D embedding plot of features coloured by class (t-SNE as in the paper's figures, or PCA).

    Args:
        features: [N, D] features.
        labels: [N] class indices.
        path: output file; None returns the figure without saving.
        method: "tsne" (scikit-learn) or "pca".
        seed: random state of the embedding and of the subsample.
        max_points: at most this many points are embedded (seeded subsample).

    Returns:
        The matplotlib figure.
    """
    x = torch.as_tensor(np.asarray(features) if not isinstance(features, torch.Tensor) else features)
    x = x.detach().float().cpu().numpy()
    y = np.asarray(torch.as_tensor(labels).cpu())
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"features must be [N, D] with N == len(labels), got {x.shape} and {len(y)} labels")
    rng = np.random.default_rng(seed)
    if len(x) > max_points:
        keep = rng.choice(len(x), max_points, replace=False)
        x, y = x[keep], y[keep]
    if method == "tsne":
        try:
            from sklearn.manifold import TSNE
        except ImportError as err:  # pragma: no cover
            raise ImportError('plot_embeddings(method="tsne") needs scikit-learn: pip install "cmd-fgvc[viz]"') from err
        perplexity = float(min(30, max(2, (len(x) - 1) // 3)))
        xy = TSNE(n_components=2, random_state=seed, perplexity=perplexity, init="pca").fit_transform(x)
    elif method == "pca":
        xc = x - x.mean(0, keepdims=True)
        _, _, vt = np.linalg.svd(xc, full_matrices=False)
        xy = xc @ vt[:2].T
    else:
        raise ValueError(f"method must be 'tsne' or 'pca', got {method!r}")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.scatter(xy[:, 0], xy[:, 1], c=y, cmap="tab20", s=6)
    ax.set_title(f"{method} of {len(x)} features")
    ax.axis("off")
    if path is not None:
        fig.savefig(path, dpi=100)
        plt.close(fig)
    return fig
