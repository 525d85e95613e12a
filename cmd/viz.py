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
    "loss_weights",
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
    colormap: str = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
) -> np.ndarray:
    """Blend the MIL weights of an image's region tokens over the image as a heat map.

    Each token is drawn as the block of pixels it covers (nearest-neighbour: the grid as it is, no
    smoothing). The colour scale runs from ``vmin`` to ``vmax`` (default: 0 to the image's largest
    weight); pass the same ``vmin`` / ``vmax`` for several images to compare them on one scale.

    Args:
        image: [3, H, W] tensor (ImageNet-normalised or in [0, 1]) or [H, W, 3] array.
        weights: [N] weights of the N = h * w region tokens (row-major over the grid).
        grid: (h, w) the token grid.
        alpha: opacity of the heat map.
        colormap: a matplotlib colormap name.
        vmin: weight drawn with the colormap's first colour (default 0).
        vmax: weight drawn with its last colour (default: the largest weight).

    Returns:
        [H, W, 3] float array in [0, 1] (show it with ``plt.imshow``).
    """
    h, w = grid
    wts = torch.as_tensor(np.asarray(weights) if not isinstance(weights, torch.Tensor) else weights)
    wts = wts.detach().float().cpu().flatten()
    if wts.numel() != h * w:
        raise ValueError(f"weights has {wts.numel()} entries but the grid {grid} has {h * w} tokens")
    base = _to_display_image(image)
    heat = F.interpolate(wts.reshape(1, 1, h, w), size=base.shape[:2], mode="nearest")[0, 0]
    lo = 0.0 if vmin is None else float(vmin)
    hi = float(heat.max()) if vmax is None else float(vmax)
    heat = ((heat - lo) / max(hi - lo, 1e-12)).clamp(0, 1)
    plt = _pyplot()
    colored = np.asarray(plt.get_cmap(colormap)(heat.numpy()))[..., :3]
    return (1 - alpha) * base + alpha * colored


# ------------------------------------------------------------------------------ training curves

# the loss terms of `cmd.CMDLoss` (unweighted in the logs) and the option giving each one's weight
_LOSS_TERMS = {"image": "image_weight", "region": "region_weight", "inter_level": "inter_weight",
               "swapped": "swapped_weight", "koleo": "koleo_weight"}
# logged beside the loss but never part of it
_DIAGNOSTICS = ("inter_level_teacher", "teacher_student_kl")
# the terms' former names (logs written before the rename): old -> new
_RENAMED = {"inter_student": "inter_level", "inter_teacher": "inter_level_teacher", "cross": "swapped"}
_ENTROPIES = {"teacher_entropy": "H(P_t): per-sample", "teacher_batch_entropy": "H(mean P_t): batch-mean",
              "teacher_region_entropy": "H(region P_t): per-token"}


def _run_args(log_path: str | Path) -> dict:
    """The options of the run that wrote ``log_path`` (its ``args.json``, latest start), or {}."""
    path = Path(log_path).with_name("args.json")
    try:
        runs = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if isinstance(runs, list):
        runs = runs[-1].get("args", {}) if runs and isinstance(runs[-1], dict) else {}
    return runs if isinstance(runs, dict) else {}


def loss_weights(args: dict) -> dict[str, float]:
    """The weight of each loss term of a run's options (``loss`` preset, then the explicit weights).

    Example:
        >>> loss_weights({"loss": "cmd", "inter_weight": 0.2})["inter_level"]
        0.2
    """
    from .losses import CMDLoss

    preset = dict(CMDLoss.PRESETS.get(str(args.get("loss", "cmd")), {}))
    out = {}
    for term, option in _LOSS_TERMS.items():
        value = args.get(option, args.get("cross_weight") if option == "swapped_weight" else None)
        value = preset.get(option, 0.0) if value is None else value
        out[term] = float(value)
    return out


def _measured_runs(points: list[tuple[float, float]]) -> list[list[tuple[float, float]]]:
    """Split (epoch, value) points into runs of consecutive epochs: a line joins only neighbours."""
    runs: list[list[tuple[float, float]]] = []
    for x, y in sorted(points):
        if runs and x - runs[-1][-1][0] <= 1:
            runs[-1].append((x, y))
        else:
            runs.append([(x, y)])
    return runs


def _plot_measured(ax: Any, points: list[tuple[float, float]], **style: Any) -> None:
    """Markers at every measurement; a line only between measurements at consecutive epochs."""
    label = style.pop("label", None)
    color = style.pop("color", None)
    for n, run in enumerate(_measured_runs(points)):
        (line,) = ax.plot([p[0] for p in run], [p[1] for p in run], marker="o", markersize=5,
                          linestyle="-" if len(run) > 1 else "none", color=color,
                          label=label if n == 0 else None, **style)
        color = line.get_color()


def _annotate(ax: Any, points: list[tuple[float, float]]) -> None:
    for x, y in points:
        ax.annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    ax.margins(x=0.08, y=0.15)


def _legend_below(ax: Any) -> None:
    """The legend under the axes (never over the curves)."""
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)


def _knn_points(records: list[dict], epochs: list[int], key: str) -> list[tuple[float, float]]:
    points = [(float(e), float(r[key])) for e, r in zip(epochs, records) if r.get(key) is not None]
    if records and records[0].get(f"{key}_before") is not None:  # measured before training: epoch 0
        points.insert(0, (0.0, float(records[0][f"{key}_before"])))
    return points


def _knn_note(points: list[tuple[float, float]], n_epochs: int) -> str:
    if len(_measured_runs(points)) > 1:
        where = ", ".join(f"{x:g}" for x, _ in points)
        return f"measured at epoch {where} only: no line between them"
    return ""


def plot_training_log(
    log_path: str | Path,
    path: str | Path | None = None,
    *,
    weights: dict[str, float] | None = None,
    out_dim: int | None = None,
) -> Any:
    """Plot the loss and its weighted terms, the diagnostics, the teacher's entropies and the k-NN of a ``log.jsonl``.

    Four panels over epochs: (1) the total loss and each weighted term ``lambda * term`` that sums
    to it; (2) the diagnostics logged beside the loss but never part of it (``inter_level_teacher``,
    ``teacher_student_kl``); (3) the teacher's entropies in nats with the ``log K`` line of a
    uniform teacher (`cmd.diagnose_collapse` reads them); (4) the k-NN top-1 (%), drawn only where
    it was measured: markers, and a line only between consecutive epochs (with the default
    ``--knn_every 0`` it is measured before training, drawn at epoch 0, and after the last epoch).

    Args:
        log_path: the ``log.jsonl`` written by ``cmd-fgvc pretrain`` (one JSON object per epoch;
            ``knn_top1_before`` on the first row is drawn at epoch 0).
        path: where to save the figure (PNG/PDF); None returns the figure without saving.
        weights: the weight of each term (``{"image": 0.5, ...}``); None: read from the run's
            ``args.json`` beside the log (`loss_weights`); unknown: the terms are drawn unweighted.
        out_dim: K, the number of prototypes (the ``log K`` line); None: from ``args.json``.

    Returns:
        The matplotlib figure.

    Raises:
        ValueError: the log holds no records.
    """
    records = _read_jsonl(log_path)
    if not records:
        raise ValueError(f"{log_path} holds no records")
    args = _run_args(log_path) if weights is None or out_dim is None else {}
    if weights is None and args:
        weights = loss_weights(args)
    if out_dim is None and args.get("out_dim"):
        out_dim = int(args["out_dim"])
    plt = _pyplot()
    epochs = [r.get("epoch", i + 1) for i, r in enumerate(records)]

    def series(key: str, scale: float = 1.0) -> tuple[list, list]:
        pairs = [(e, scale * r[key]) for e, r in zip(epochs, records) if r.get(key) is not None]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    fig, axes = plt.subplots(1, 4, figsize=(20, 5))
    ax = axes[0]
    ax.plot(*series("loss"), marker="o", markersize=3, color="black", linewidth=2, label="loss (total)")
    for term in _LOSS_TERMS:
        if not any(r.get(term) is not None for r in records):
            continue
        w = 1.0 if weights is None else weights.get(term, 0.0)
        if w == 0:
            continue
        label = f"{term} (unweighted)" if weights is None else f"{w:g} x {term}"
        ax.plot(*series(term, w), marker="o", markersize=3, label=label)
    ax.set_title("loss = sum of the weighted terms" if weights is not None else "loss and its terms (weights unknown)")
    ax.set_ylabel("loss (nats)")
    ax.set_ylim(bottom=0)
    _legend_below(ax)

    ax = axes[1]
    drawn = False
    for key in _DIAGNOSTICS:
        if any(r.get(key) is not None for r in records):
            ax.plot(*series(key), marker="o", markersize=3, label=key)
            drawn = True
    if drawn:
        _legend_below(ax)
    else:
        ax.text(0.5, 0.5, "no diagnostics logged", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("diagnostics (not part of the loss)")
    ax.set_ylabel("KL (nats)")

    ax = axes[2]
    drawn = False
    for key, label in _ENTROPIES.items():
        if any(r.get(key) is not None for r in records):
            ax.plot(*series(key), marker="o", markersize=3, label=label)
            drawn = True
    if out_dim:
        ax.axhline(math.log(out_dim), color="grey", linestyle="--", label=f"log K = {math.log(out_dim):.2f} (uniform)")
    if drawn or out_dim:
        _legend_below(ax)
    if not drawn:
        ax.text(0.5, 0.5, "teacher_entropy not logged", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylim(bottom=0)
    ax.set_title("teacher entropy")
    ax.set_ylabel("entropy (nats)")

    ax = axes[3]
    points = _knn_points(records, epochs, "knn_top1")
    note = ""
    if points:
        _plot_measured(ax, points, label="teacher k-NN top-1")
        _annotate(ax, points)
        note = _knn_note(points, len(records))
    else:
        ax.text(0.5, 0.5, "knn_top1 not logged", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("k-NN top-1 of the teacher" + (f"\n({note})" if note else ""))
    ax.set_ylabel("top-1 accuracy (%)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path, plt)


def _save(fig: Any, path: str | Path | None, plt: Any) -> Any:
    if path is not None:
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
    return fig


def _read_jsonl(log_path: str | Path) -> list[dict]:
    """The rows of a JSON-lines log, the terms' former names read as the current ones."""
    rows = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    return [{_RENAMED.get(k, k): v for k, v in row.items()} for row in rows]


# panels that draw several per-step scalars together (same units), and each scalar's axis label
_STEP_GROUPS = {
    "loss terms (unweighted)": ("loss", *_LOSS_TERMS),
    "diagnostics (not part of the loss)": _DIAGNOSTICS,
    "teacher entropies": tuple(_ENTROPIES),
}
_STEP_UNITS = {"loss terms (unweighted)": "loss (nats)", "diagnostics (not part of the loss)": "KL (nats)",
               "teacher entropies": "entropy (nats)", "lr": "learning rate", "weight_decay": "weight decay",
               "teacher_momentum": "EMA momentum", "teacher_temp": "temperature",
               "teacher_temperature": "temperature", "images_per_s": "images / s"}


def plot_step_curves(
    csv_path: str | Path,
    path: str | Path | None = None,
    *,
    columns: Sequence[str] | None = None,
    n_cols: int = 3,
    out_dim: int | None = None,
    epoch_steps: Sequence[int] | None = None,
) -> Any:
    """Training curves per optimisation step from a CSV file: grouped panels, constants left out.

    The CSV has a header row with a ``step`` column and named scalar columns (``loss``, ``lr``,
    ``teacher_temp``, ...); empty cells (a scalar not logged at that step) are skipped. Scalars
    that never change are not drawn (the figure's title lists them with their value); the loss
    and its terms share one panel, as do the diagnostics and the teacher's entropies (with the
    ``log K`` line when ``out_dim`` is known); every other scalar gets its own panel.

    Args:
        csv_path: the CSV file.
        path: where to save the figure (PNG/PDF); None returns the figure without saving.
        columns: the scalars to draw, in order; None: every column but ``step``.
        n_cols: panels per row.
        out_dim: K, for the ``log K`` line of the entropy panel; None: from the ``args.json`` beside
            the CSV, if any.
        epoch_steps: the global step at the end of each epoch (dotted epoch boundaries); None: the
            ``step`` of each row of the ``log.jsonl`` beside the CSV, if any.

    Returns:
        The matplotlib figure.

    Raises:
        ValueError: no ``step`` column, no data row, an unknown column, or a non-numeric cell.

    Example:
        >>> import tempfile, pathlib
        >>> f = pathlib.Path(tempfile.mkdtemp()) / "steps.csv"
        >>> _ = f.write_text("step,loss,lr\\n1,5.0,0.1\\n2,4.5,0.2\\n")
        >>> [ax.get_title() for ax in plot_step_curves(f).axes]
        ['loss terms (unweighted)', 'lr']
    """
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        header = [_RENAMED.get(c, c) for c in reader.fieldnames or []]
        rows = [{_RENAMED.get(k, k): v for k, v in row.items()} for row in reader]
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
    constant = {c: ys[0] for c, (_, ys) in series.items() if len(ys) > 1 and min(ys) == max(ys)}
    varying = [c for c in names if c not in constant]
    panels: list[tuple[str, list[str]]] = []
    for c in varying:
        group = next((g for g, members in _STEP_GROUPS.items() if c in members), None)
        if group is None:
            panels.append((c, [c]))
        elif group not in [p[0] for p in panels]:
            panels.append((group, [m for m in varying if m in _STEP_GROUPS[group]]))
    if not panels:
        panels = [(c, [c]) for c in names]  # everything constant: draw it anyway
        constant = {}
    if out_dim is None and columns is None:
        out_dim = _run_args(csv_path).get("out_dim")
    if epoch_steps is None:
        try:
            epoch_steps = [r["step"] for r in _read_jsonl(Path(csv_path).with_name("log.jsonl")) if "step" in r]
        except (OSError, ValueError):
            epoch_steps = []
    plt = _pyplot()
    n_cols = max(1, min(n_cols, len(panels)))
    n_rows = math.ceil(len(panels) / n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(4.8 * n_cols, 3.8 * n_rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.remove()
    for ax, (title, members) in zip(axes.flat, panels):
        for name in members:
            xs, ys = series[name]
            if ys:
                ax.plot(xs, ys, linewidth=1, label=_ENTROPIES.get(name, name))
            else:
                ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes)
        if title == "teacher entropies" and out_dim:
            ax.axhline(math.log(out_dim), color="grey", linestyle="--",
                       label=f"log K = {math.log(out_dim):.2f} (uniform)")
        for n, boundary in enumerate(epoch_steps or []):
            ax.axvline(boundary, color="grey", linestyle=":", linewidth=0.8,
                       label="epoch boundary" if n == 0 and len(members) > 1 else None)
        if len(members) > 1 or title == "teacher entropies":
            _legend_below(ax)
        ax.set_title(title)
        ax.set_ylabel(_STEP_UNITS.get(title, title))
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if constant:
        fig.suptitle("constant over the run (not drawn): " + ", ".join(f"{k} = {v:g}" for k, v in constant.items()),
                     fontsize=9)
    fig.tight_layout()
    return _save(fig, path, plt)


def plot_knn_over_epochs(log_path: str | Path, path: str | Path | None = None, *, key: str = "knn_top1") -> Any:
    """k-NN accuracy over epochs from the rows of a ``log.jsonl`` that carry ``knn_top1``.

    Only the measurements are drawn (markers); a line joins measurements at consecutive epochs
    only, so two measurements far apart (``--knn_every 0``: before training and after the last
    epoch) are not joined by a line that would suggest steady progress in between.

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
    epochs = [r.get("epoch", i + 1) for i, r in enumerate(records)]
    points = _knn_points(records, epochs, key)
    if not points:
        raise ValueError(f"no row of {log_path} has {key!r} (was the k-NN monitor on?)")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    _plot_measured(ax, points)
    _annotate(ax, points)
    note = _knn_note(points, len(records))
    ax.set_xlabel("epoch")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("k-NN accuracy of the teacher" + (f"\n({note})" if note else ""), fontsize=10)
    ax.margins(y=0.15)
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
        >>> labels = [0, 0, 1, 1, 2, 2]
        >>> [labels[i] for i in sample_across_classes(labels, per_class=1)]  # one (seeded) sample per class
        [0, 1, 2]
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
    colormap: str = "viridis",
    alpha: float = 0.6,
    title: str | None = None,
) -> Any:
    """Save a grid of images with the model's MIL region weights overlaid (which patches matter).

    Each image is shown next to its overlay. The overlay draws the token grid as it is (each token
    a block of pixels, nearest-neighbour), with one colour scale shared by every image (0 to the
    largest weight of the batch), so a near-uniform image looks flat; the colorbar marks the
    uniform level ``1 / N`` (N tokens). The image panel is titled with its class; where
    ``part_masks`` are given the discriminative part is outlined on both panels, and the legend
    says so. Pick the images across classes with `sample_across_classes`.

    Args:
        model: a `CMDNetwork` (e.g. the EMA teacher).
        images: [B, 3, H, W] normalised images on the model's device.
        path: output file; None returns the figure without saving.
        labels: [B] class indices (panel titles); None: untitled.
        class_names: names indexed by class (e.g. ``dataset.classes``); None: ``class {i}``.
        part_masks: [B, h, w] boolean part masks (e.g. `SyntheticFineGrained(return_part_mask=True)`),
            resized to the image size (nearest) when they differ; None: no outline.
        n_cols: images per row (each shown as image | overlay).
        colormap: matplotlib colormap of the overlay (a perceptually uniform one by default).
        alpha: opacity of the overlay.
        title: the figure's title (e.g. how the images were chosen); None: none.

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
    weights = weights.cpu()
    n_tokens = grid[0] * grid[1]
    vmax = max(float(weights.max()), 1.0 / n_tokens)  # one scale for every image
    plt = _pyplot()
    from matplotlib.lines import Line2D

    n_cols = max(1, min(n_cols, b))
    n_rows = (b + n_cols - 1) // n_cols
    fig, axes = plt.subplots(n_rows, 2 * n_cols, figsize=(4 * n_cols + 1, 2.3 * n_rows + 0.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    outline = "#ff2d2d"
    for i in range(b):
        r, c = divmod(i, n_cols)
        left, right = axes[r, 2 * c], axes[r, 2 * c + 1]
        left.imshow(_to_display_image(images[i]))
        right.imshow(instance_weight_overlay(images[i], weights[i], grid, colormap=colormap, alpha=alpha,
                                             vmin=0.0, vmax=vmax))
        if labels is not None:
            name = class_names[labels[i]] if class_names is not None else f"class {labels[i]}"
            left.set_title(str(name), fontsize=9)
        right.set_title(f"max {weights[i].max() * n_tokens:.1f} x 1/N", fontsize=8)
        if masks is not None and masks[i].any():
            for ax in (left, right):
                ax.contour(masks[i], levels=[0.5], colors=outline, linewidths=1.2)
    mappable = plt.cm.ScalarMappable(norm=plt.Normalize(0.0, vmax), cmap=colormap)
    bar = fig.colorbar(mappable, ax=axes.ravel().tolist(), fraction=0.02, pad=0.03)
    bar.set_label(f"MIL weight (one scale for all images; {grid[0]} x {grid[1]} = {n_tokens} tokens)")
    bar.ax.axhline(1.0 / n_tokens, color="white", linewidth=2)
    bar.ax.axhline(1.0 / n_tokens, color="black", linewidth=1, linestyle="--")
    bar.ax.set_yticks([1.0 / n_tokens], labels=["1/N"], minor=True)  # the uniform level, left of the bar
    bar.ax.tick_params(which="minor", left=True, labelleft=True, right=False, labelright=False, length=4,
                       labelsize=8)
    handles = []
    if masks is not None:
        handles.append(Line2D([], [], color=outline, linewidth=1.5, label="discriminative part (the dataset's mask)"))
    handles.append(Line2D([], [], color="black", linestyle="--", label="uniform weight 1/N (on the colorbar)"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, -0.02))
    if title:
        fig.suptitle(title, fontsize=10)
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
    classes = np.unique(y)
    legend = len(classes) <= 20
    fig, ax = plt.subplots(figsize=(8.5 if legend else 6, 6))
    palette = 10 if len(classes) <= 10 else 20  # tab10's colours are the more distinct
    cmap = plt.get_cmap(f"tab{palette}")
    for n, c in enumerate(classes):
        pts = xy[y == c]
        name = class_names[int(c)] if class_names is not None else f"class {int(c)}"
        ax.scatter(pts[:, 0], pts[:, 1], color=cmap(n % palette), s=8, label=str(name))
    if legend:  # outside the data, to the right of the axes
        ax.legend(fontsize=8, markerscale=2, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_title(f"{'t-SNE' if method == 'tsne' else 'PCA'} of {len(x)} features, {len(classes)} classes")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    return _save(fig, path, plt)
