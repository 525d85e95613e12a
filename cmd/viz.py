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

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "instance_weight_overlay",
    "plot_training_log",
    "plot_step_curves",
    "plot_knn_over_epochs",
    "sample_across_classes",
    "save_attention_grid",
    "plot_embeddings",
]


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
        log_path: the ``log.jsonl`` written by ``cmd-fgvc pretrain`` (one JSON object per epoch;
            ``knn_top1_before`` on the first row is drawn at epoch 0).
        path: where to save the figure (PNG/PDF); None returns the figure without saving.

    Returns:
        The matplotlib figure.
    """
    records = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    if not records:
        raise ValueError(f"{log_path} holds no records")
    plt = _pyplot()
    epochs = [r.get("epoch", i + 1) for i, r in enumerate(records)]
    loss_keys = [k for k in ("loss", "image", "region", "inter_student", "inter_teacher", "cross")
                 if any(k in r for r in records)]
    panels = [("loss terms", loss_keys), ("teacher entropy", ["teacher_entropy"]), ("k-NN top-1 (%)", ["knn_top1"])]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (title, keys) in zip(axes, panels):
        plotted = False
        for key in keys:
            xs = [e for e, r in zip(epochs, records) if r.get(key) is not None]
            ys = [r[key] for r in records if r.get(key) is not None]
            if records[0].get(f"{key}_before") is not None:  # measured before training: epoch 0
                xs, ys = [0, *xs], [records[0][f"{key}_before"], *ys]
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


def _save(fig: Any, path: str | Path | None, plt: Any) -> Any:
    if path is not None:
        fig.savefig(path, dpi=100)
        plt.close(fig)
    return fig


def _read_jsonl(log_path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]


def plot_step_curves(
    csv_path: str | Path,
    path: str | Path | None = None,
    *,
    columns: Sequence[str] | None = None,
    n_cols: int = 3,
) -> Any:
    """Training curves per optimisation step from a CSV file, one panel per scalar.

    The CSV has a header row with a ``step`` column and named scalar columns (``loss``, ``lr``,
    ``teacher_temperature``, ...); empty cells (a scalar not logged at that step) are skipped.

    Args:
        csv_path: the CSV file.
        path: where to save the figure (PNG/PDF); None returns the figure without saving.
        columns: the scalars to draw, in order; None: every column but ``step``.
        n_cols: panels per row.

    Returns:
        The matplotlib figure.

    Raises:
        ValueError: no ``step`` column, no data row, an unknown column, or a non-numeric cell.

    Example:
        >>> import tempfile, pathlib
        >>> f = pathlib.Path(tempfile.mkdtemp()) / "steps.csv"
        >>> _ = f.write_text("step,loss,lr\\n1,5.0,0.1\\n2,4.5,0.2\\n")
        >>> len(plot_step_curves(f).axes)
        2
    """
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        rows = list(reader)
    if "step" not in header:
        raise ValueError(f"{csv_path} has no 'step' column (columns: {header})")
    if not rows:
        raise ValueError(f"{csv_path} holds no data rows")
    names = [c for c in header if c != "step"] if columns is None else list(columns)
    unknown = [c for c in names if c not in header]
    if unknown:
        raise ValueError(f"columns {unknown} are not in {csv_path} (columns: {header})")
    if not names:
        raise ValueError(f"{csv_path} has no scalar column besides 'step'")

    def number(value: str, column: str, line: int) -> float:
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{csv_path}, line {line}: {column} = {value!r} is not a number") from None

    series: dict[str, tuple[list[float], list[float]]] = {c: ([], []) for c in names}
    for line, row in enumerate(rows, start=2):
        if row.get("step") in (None, ""):
            continue
        step = number(row["step"], "step", line)
        for c in names:
            if row.get(c) not in (None, ""):
                series[c][0].append(step)
                series[c][1].append(number(row[c], c, line))
    plt = _pyplot()
    n_cols = max(1, min(n_cols, len(names)))
    n_rows = math.ceil(len(names) / n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(4.5 * n_cols, 3 * n_rows), squeeze=False)
    for ax in axes.flat[len(names) :]:
        ax.remove()
    for ax, name in zip(axes.flat, names):
        xs, ys = series[name]
        if ys:
            ax.plot(xs, ys, linewidth=1)
        else:
            ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path, plt)


def plot_knn_over_epochs(log_path: str | Path, path: str | Path | None = None, *, key: str = "knn_top1") -> Any:
    """k-NN accuracy over epochs from the rows of a ``log.jsonl`` that carry ``knn_top1``.

    Args:
        log_path: one JSON object per line (per epoch), with ``epoch`` and, on some rows, ``key``; a
            ``{key}_before`` on the first row (the value before training) is drawn at epoch 0.
        path: where to save the figure; None returns the figure without saving.
        key: the accuracy field (e.g. ``"knn_top1"``).

    Returns:
        The matplotlib figure.

    Raises:
        ValueError: when no row carries ``key``.
    """
    records = _read_jsonl(log_path)
    points = [(r.get("epoch", i + 1), r[key]) for i, r in enumerate(records) if r.get(key) is not None]
    if records and records[0].get(f"{key}_before") is not None:  # measured before training: epoch 0
        points.insert(0, (0, records[0][f"{key}_before"]))
    if not points:
        raise ValueError(f"no row of {log_path} has {key!r} (was the k-NN monitor on?)")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=4)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{key} (%)")
    ax.set_title("k-NN accuracy of the teacher")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path, plt)


def sample_across_classes(
    labels: torch.Tensor | np.ndarray | Sequence[int], *, per_class: int = 1, max_images: int = 16, seed: int = 0
) -> list[int]:
    """Indices of up to ``max_images`` samples spread across classes, ``per_class`` of each.

    When there are more classes than ``max_images // per_class``, the classes are taken evenly
    spaced over the sorted class list. Within a class the samples are a seeded random draw.

    Args:
        labels: [N] class indices of a dataset (e.g. ``dataset.targets``).
        per_class: samples per class (1 or 2 for a picture grid).
        max_images: most indices returned.
        seed: seed of the draw.

    Returns:
        Indices into ``labels``, grouped by class in increasing class order.

    Example:
        >>> sample_across_classes([0, 0, 1, 1, 2, 2], per_class=1)
        [0, 2, 5]
    """
    y = np.asarray(torch.as_tensor(labels).cpu())
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D [N], got shape {y.shape}")
    if per_class < 1 or max_images < 1:
        raise ValueError(f"per_class and max_images must be >= 1, got {per_class} and {max_images}")
    classes = np.unique(y)
    n_classes = max(1, min(len(classes), max_images // per_class))
    if len(classes) > n_classes:
        classes = classes[np.linspace(0, len(classes) - 1, n_classes).round().astype(int)]
    rng = np.random.default_rng(seed)
    out: list[int] = []
    for c in classes:
        members = np.flatnonzero(y == c)
        take = rng.choice(members, min(per_class, len(members)), replace=False)
        out.extend(sorted(int(i) for i in take))
    return out[:max_images]


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
    labels: torch.Tensor | Sequence[int] | None = None,
    class_names: Sequence[str] | None = None,
    part_masks: torch.Tensor | np.ndarray | None = None,
    n_cols: int = 4,
    colormap: str = "jet",
) -> Any:
    """Save a grid of images with the model's MIL region weights overlaid (which patches matter).

    Each image is shown next to its overlay; the image panel is titled with its class, a colorbar
    gives the scale of the overlay (weights min-max scaled per image), and where ``part_masks``
    are given the discriminative part is outlined in white on both panels. Pick the images across
    classes with `sample_across_classes`.

    Args:
        model: a `CMDNetwork` (e.g. the EMA teacher).
        images: [B, 3, H, W] normalised images on the model's device.
        path: output file; None returns the figure without saving.
        labels: [B] class indices (panel titles); None: untitled.
        class_names: names indexed by class (e.g. ``dataset.classes``); None: ``class {i}``.
        part_masks: [B, h, w] boolean part masks (e.g. `SyntheticFineGrained(return_part_mask=True)`),
            resized to the image size (nearest) when they differ; None: no outline.
        n_cols: images per row (each shown as image | overlay).
        colormap: matplotlib colormap of the overlay.

    Returns:
        The matplotlib figure.
    """
    b = images.shape[0]
    if labels is not None:
        labels = [int(v) for v in torch.as_tensor(labels).flatten().tolist()]
        if len(labels) != b:
            raise ValueError(f"labels has {len(labels)} entries for {b} images")
    masks = None
    if part_masks is not None:
        masks = torch.as_tensor(np.asarray(part_masks) if not isinstance(part_masks, torch.Tensor) else part_masks)
        if masks.ndim != 3 or masks.shape[0] != b:
            raise ValueError(f"part_masks must be [B={b}, h, w], got shape {tuple(masks.shape)}")
        size = tuple(images.shape[-2:])
        masks = masks.detach().float().cpu()
        if tuple(masks.shape[-2:]) != size:
            masks = F.interpolate(masks[:, None], size=size, mode="nearest")[:, 0]
        masks = masks.numpy() > 0.5
    weights, grid = region_weights(model, images)
    plt = _pyplot()
    n_cols = max(1, min(n_cols, b))
    n_rows = (b + n_cols - 1) // n_cols
    fig, axes = plt.subplots(n_rows, 2 * n_cols, figsize=(4 * n_cols + 1, 2.3 * n_rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(b):
        r, c = divmod(i, n_cols)
        left, right = axes[r, 2 * c], axes[r, 2 * c + 1]
        left.imshow(_to_display_image(images[i]))
        right.imshow(instance_weight_overlay(images[i], weights[i], grid, colormap=colormap))
        if labels is not None:
            name = class_names[labels[i]] if class_names is not None else f"class {labels[i]}"
            left.set_title(str(name), fontsize=9)
        if masks is not None and masks[i].any():
            for ax in (left, right):
                ax.contour(masks[i], levels=[0.5], colors="white", linewidths=1.2)
    mappable = plt.cm.ScalarMappable(norm=plt.Normalize(0.0, 1.0), cmap=colormap)
    bar = fig.colorbar(mappable, ax=axes.ravel().tolist(), fraction=0.02, pad=0.01)
    bar.set_label("MIL weight (per image, min to max)")
    if path is not None:
        fig.savefig(path, dpi=100, bbox_inches="tight")
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
    class_names: Sequence[str] | None = None,
) -> Any:
    """2-D embedding plot of features coloured by class (t-SNE as in the paper's figures, or PCA).

    Args:
        features: [N, D] features (e.g. the teacher's, from `extract_features`), N >= 3.
        labels: [N] class indices.
        path: output file; None returns the figure without saving.
        method: "tsne" (scikit-learn) or "pca".
        seed: random state of the embedding and of the subsample.
        max_points: at most this many points are embedded (seeded subsample).
        class_names: names indexed by class, for the legend (drawn up to 20 classes).

    Returns:
        The matplotlib figure.

    Raises:
        ValueError: for an unknown method, features not [N, D], a label count that differs from N,
            fewer than 3 points, or NaN / inf features.

    Example:
        >>> import torch
        >>> fig = plot_embeddings(torch.randn(30, 8), torch.arange(30) % 3, method="pca")
    """
    if method not in ("tsne", "pca"):
        raise ValueError(f"method must be 'tsne' or 'pca', got {method!r}")
    x = torch.as_tensor(np.asarray(features) if not isinstance(features, torch.Tensor) else features)
    x = x.detach().float().cpu().numpy()
    y = np.asarray(torch.as_tensor(labels).cpu())
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
        raise ValueError(f"features must be [N, D] with N == len(labels), got {x.shape} and labels {y.shape}")
    if len(x) < 3:
        raise ValueError(f"an embedding plot needs at least 3 points, got {len(x)}")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or inf")
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
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 6))
    classes = np.unique(y)
    palette = 10 if len(classes) <= 10 else 20  # tab10's colours are the more distinct
    cmap = plt.get_cmap(f"tab{palette}")
    for n, c in enumerate(classes):
        pts = xy[y == c]
        name = class_names[int(c)] if class_names is not None else f"class {int(c)}"
        ax.scatter(pts[:, 0], pts[:, 1], color=cmap(n % palette), s=8, label=str(name))
    if len(classes) <= 20:
        ax.legend(fontsize=7, markerscale=2, loc="best", frameon=False)
    ax.set_title(f"{'t-SNE' if method == 'tsne' else 'PCA'} of {len(x)} features, {len(classes)} classes")
    ax.set_xticks([])
    ax.set_yticks([])
    return _save(fig, path, plt)
